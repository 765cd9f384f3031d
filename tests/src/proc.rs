//! Child processes that cannot outlive the test that started them.
//!
//! A test that panics half-way must not leave a server listening in a
//! namespace or a load generator running, so [`Proc`] kills (SIGKILL) and
//! reaps its process on drop. Every wait here has a deadline: a stuck
//! child fails the test instead of hanging CI.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// How long drop and teardown wait for a SIGKILLed child to be reaped.
/// SIGKILL cannot be caught, so this is only hit by a process stuck in the
/// kernel; we then give up (and say so) rather than hang.
pub(crate) const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Interval of the `try_wait` polling loops.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// While collecting output, how often we check whether the child exited.
const EXIT_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// After the child exited with a pipe still open (held by a background
/// grandchild), how long we keep reading what it had already written.
const EXIT_GRACE: Duration = Duration::from_millis(50);

/// The child is shared with the [`crate::SimNode`] that spawned it (through
/// a `Weak`), so that tearing the node down can reap processes whose
/// `Proc` the test still holds: std caches the exit status, so a later
/// `kill`/`wait` on this `Proc` is harmless and can never signal a
/// recycled pid.
pub(crate) type SharedChild = Arc<Mutex<Child>>;

/// A running child process; dropping it kills (SIGKILL) and reaps it.
///
/// Stdio is whatever the caller configured on the `Command`.
#[derive(Debug)]
pub struct Proc {
    child: SharedChild,
    pid: u32,
    what: String,
    stdout: Option<LineReader>,
}

impl Proc {
    /// Wraps a freshly spawned child; `what` names it in error messages.
    pub fn new(child: Child, what: impl Into<String>) -> Proc {
        Proc {
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            what: what.into(),
            stdout: None,
        }
    }

    /// A handle that lets the owner of the namespaces reap this child.
    pub(crate) fn handle(&self) -> Weak<Mutex<Child>> {
        Arc::downgrade(&self.child)
    }

    /// The process id (as seen from the initial pid namespace).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Exclusive access to the `std::process::Child`, e.g. to take its
    /// stdin/stdout/stderr. Do not keep the guard across a teardown.
    pub fn child_mut(&mut self) -> MutexGuard<'_, Child> {
        lock(&self.child)
    }

    /// Takes the child's stdout pipe (if it was piped and not yet taken).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child_mut().stdout.take()
    }

    /// Takes the child's stderr pipe (if it was piped and not yet taken).
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child_mut().stderr.take()
    }

    /// Sends SIGKILL and reaps the process. Killing an already exited
    /// process is not an error.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        kill_and_reap(&mut lock(&self.child), REAP_TIMEOUT)
            .with_context(|| format!("killing {} (pid {})", self.what, self.pid))
    }

    /// Non-blocking check whether the process has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let pid = self.pid;
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("waiting for pid {pid}"))
    }

    /// Waits for the process to exit, at most `timeout`. On timeout the
    /// process keeps running (the caller decides; drop kills it).
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let what = format!("{} (pid {})", self.what, self.pid);
        match wait_until(&mut lock(&self.child), Instant::now() + timeout) {
            Ok(Some(status)) => Ok(status),
            Ok(None) => bail!("{what} still running after {timeout:?}"),
            Err(err) => Err(err).with_context(|| format!("waiting for {what}")),
        }
    }

    /// Reads stdout line by line until a line satisfies `pred` and returns
    /// it; fails on EOF or after `timeout`. Used to wait for readiness
    /// messages such as `listening <addr>`. Stdout must be piped.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let found = self
            .stdout_reader()
            .and_then(|reader| find_line(reader, deadline, &mut pred));
        found.with_context(|| format!("{} (pid {})", self.what, self.pid))
    }

    /// Collects stdout and stderr (where piped) and waits for exit, all
    /// within `timeout`. On timeout the process is killed and the error
    /// shows what it printed so far.
    pub fn output_timeout(mut self, timeout: Duration) -> anyhow::Result<Output> {
        let deadline = Instant::now() + timeout;
        let what = format!("{} (pid {})", self.what, self.pid);
        let mut child = lock(&self.child);
        let mut capture = Capture::new(self.stdout.take(), &mut child);
        let status = capture
            .collect(&mut child, deadline)
            .with_context(|| format!("collecting output of {what}"))?;
        let Capture { stdout, stderr, .. } = capture;
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => {
                let killed = kill_and_reap(&mut child, REAP_TIMEOUT);
                bail!(
                    "{what} did not finish within {timeout:?} (killed: {killed:?}); stdout: {:?}; stderr: {:?}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                )
            }
        }
    }

    fn stdout_reader(&mut self) -> anyhow::Result<&mut LineReader> {
        if self.stdout.is_none() {
            let pipe = self
                .take_stdout()
                .context("stdout is not piped (or was taken)")?;
            self.stdout = Some(LineReader::new(pipe));
        }
        self.stdout.as_mut().context("stdout reader missing")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(err) = kill_and_reap(&mut lock(&self.child), REAP_TIMEOUT) {
            eprintln!(
                "dataplane-tests: could not reap {} (pid {}): {err:#}",
                self.what, self.pid
            );
        }
    }
}

/// Reads lines until one satisfies `pred`; the error lists the lines seen.
fn find_line(
    reader: &mut LineReader,
    deadline: Instant,
    pred: &mut impl FnMut(&str) -> bool,
) -> anyhow::Result<String> {
    let mut seen = Vec::new();
    loop {
        match reader.next_line(deadline) {
            Ok(Some(line)) if pred(&line) => return Ok(line),
            Ok(Some(line)) => seen.push(line),
            Ok(None) => bail!("stdout closed before the expected line; saw {seen:?}"),
            Err(err) => return Err(anyhow!(err).context(format!("saw {seen:?}"))),
        }
    }
}

/// Locks a shared child, ignoring poisoning: a panic elsewhere must not
/// prevent the process from being killed.
pub(crate) fn lock(child: &SharedChild) -> MutexGuard<'_, Child> {
    child.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SIGKILLs `child` (a no-op if it was already reaped) and reaps it,
/// waiting at most `timeout`.
pub(crate) fn kill_and_reap(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // ESRCH cannot happen before reaping; other errors are worth reporting
    // but the wait below still decides.
    let kill = child.kill();
    match wait_until(child, Instant::now() + timeout)? {
        Some(status) => Ok(status),
        None => bail!("not reaped {timeout:?} after SIGKILL (kill: {kill:?})"),
    }
}

/// Polls `try_wait` until the child exits or `deadline` passes.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(WAIT_POLL.min(deadline - now));
    }
}

/// Captured stdout/stderr of a child, read without threads so that every
/// wait has a deadline.
struct Capture {
    out: Option<ChildStdout>,
    err: Option<ChildStderr>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Capture {
    /// Takes the child's pipes; keeps what a [`LineReader`] already
    /// buffered, so no output is lost.
    fn new(reader: Option<LineReader>, child: &mut Child) -> Capture {
        let (out, stdout) = match reader {
            Some(r) => (Some(r.pipe), r.buf),
            None => (child.stdout.take(), Vec::new()),
        };
        Capture {
            out,
            err: child.stderr.take(),
            stdout,
            stderr: Vec::new(),
        }
    }

    /// Reads until both pipes are at EOF and the child exited, or until
    /// `deadline` (then `None`). A child that exits while a background
    /// grandchild keeps a pipe open is done after a short grace period.
    fn collect(&mut self, child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        loop {
            let slice = deadline.min(Instant::now() + EXIT_CHECK_INTERVAL);
            if self.drain(slice)? {
                return wait_until(child, deadline);
            }
            if let Some(status) = child.try_wait()? {
                self.drain(Instant::now() + EXIT_GRACE)?;
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// Reads what arrives until both pipes are at EOF (returns true) or
    /// `deadline` passes (returns false).
    fn drain(&mut self, deadline: Instant) -> io::Result<bool> {
        while self.out.is_some() || self.err.is_some() {
            let fds = [
                self.out.as_ref().map(|p| p.as_raw_fd()),
                self.err.as_ref().map(|p| p.as_raw_fd()),
            ];
            let Some(ready) = poll_readable(&fds, deadline)? else {
                return Ok(false);
            };
            if ready[0] && read_some(&mut self.out, &mut self.stdout)? {
                self.out = None;
            }
            if ready[1] && read_some(&mut self.err, &mut self.stderr)? {
                self.err = None;
            }
        }
        Ok(true)
    }
}

/// Reads once from a readable pipe into `buf`; returns true at EOF.
fn read_some<R: Read>(pipe: &mut Option<R>, buf: &mut Vec<u8>) -> io::Result<bool> {
    let Some(pipe) = pipe.as_mut() else {
        return Ok(true);
    };
    let mut chunk = [0u8; 16 * 1024];
    match pipe.read(&mut chunk) {
        Ok(0) => Ok(true),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// `poll(2)` for readability (data, EOF or error) on up to two optional
/// fds until `deadline`. Returns `None` on timeout, else which fds are
/// ready (at least one).
fn poll_readable(fds: &[Option<i32>; 2], deadline: Instant) -> io::Result<Option<[bool; 2]>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            // A negative fd is ignored by poll(2).
            fd: fd.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(None);
        }
        let ms = i32::try_from(remaining.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: `pfds` is a valid, exclusively borrowed array of
        // `pfds.len()` pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n > 0 {
            return Ok(Some([pfds[0].revents != 0, pfds[1].revents != 0]));
        }
    }
}

/// Line-oriented reader over a child's stdout with deadlines.
#[derive(Debug)]
struct LineReader {
    pipe: ChildStdout,
    buf: Vec<u8>,
    eof: bool,
}

impl LineReader {
    fn new(pipe: ChildStdout) -> LineReader {
        LineReader {
            pipe,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// The next line (without the newline), `None` at EOF, an error after
    /// `deadline`.
    fn next_line(&mut self, deadline: Instant) -> io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line[..pos]).into_owned();
                return Ok(Some(text));
            }
            if self.eof {
                let rest = std::mem::take(&mut self.buf);
                return Ok((!rest.is_empty()).then(|| String::from_utf8_lossy(&rest).into_owned()));
            }
            let fd = Some(self.pipe.as_raw_fd());
            if poll_readable(&[fd, None], deadline)?.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out reading stdout",
                ));
            }
            let mut pipe = Some(&mut self.pipe);
            self.eof = read_some(&mut pipe, &mut self.buf)?;
        }
    }
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured,
/// killing it if it takes longer than `timeout`. Does not judge the exit
/// status: callers decide what failure means.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    Proc::new(child, what).output_timeout(timeout)
}

/// A short human-readable rendering of a command line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Raises this process's soft open-file limit to its hard limit (children
/// inherit it): a load generator holds a descriptor per connection, and the
/// usual soft limit of 1024 would cap a round below a thousand. Best
/// effort: a refused raise shows up as failed connects.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
