//! `meshtool`: a blocking, std-only TCP peer for end-to-end tests.
//!
//! It is deliberately simple (threads, blocking sockets, timeouts on every
//! operation) so that when a test fails, the suspect is the data plane and
//! not the test peer. Subcommands:
//!
//! - `serve --listen <ip:port> --name <name>`: greets each connection with
//!   `<name> <peer-ip>:<peer-port>\n` (the peer as the server sees it, which
//!   shows whether a proxy sat in between), then echoes until EOF.
//! - `hello --to <ip:port> --count <n> [--timeout-ms <ms>]`: n sequential
//!   connections, one JSON line per attempt.
//! - `transfer --to <ip:port> --bytes <n> [--timeout-ms <ms>] [--pace-ms <ms>]`:
//!   streams a deterministic byte stream through the echo while reading it
//!   back, then half-closes and checks the full echo still arrives.
//!   `--pace-ms`: a pause after each chunk, for a long-lived stream.
//!
//! Exit codes: 0 done (hello: even if attempts failed, the caller judges;
//! transfer: the echo matched), 1 failure, 2 bad arguments.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Most connections `serve` handles at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// A server-side connection idle for this long is dropped, so a vanished
/// client cannot pin a thread forever.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Size of I/O buffers and of the generated stream's chunks.
const CHUNK: usize = 64 * 1024;
/// Longest greeting line accepted.
const MAX_GREETING: u64 = 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        return usage("missing subcommand");
    };
    let opts = match Opts::parse(rest) {
        Ok(opts) => opts,
        Err(msg) => return usage(&msg),
    };
    let result = match command.as_str() {
        "serve" => serve(&opts),
        "hello" => hello(&opts),
        "transfer" => transfer(&opts),
        "hold" => hold(&opts),
        other => Err(Failure::Usage(format!("unknown subcommand {other:?}"))),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => usage(&msg),
        Err(Failure::Io(msg)) => {
            eprintln!("meshtool {command}: {msg}");
            ExitCode::from(1)
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "meshtool: {msg}\nusage:\n  meshtool serve --listen <ip:port> --name <name>\n  \
         meshtool hello --to <ip:port> --count <n> [--timeout-ms <ms>]\n  \
         meshtool transfer --to <ip:port> --bytes <n> [--timeout-ms <ms>]\n  \
         meshtool hold --to <ip:port> --count <n> --hold-ms <ms> [--timeout-ms <ms>]"
    );
    ExitCode::from(2)
}

/// Why a subcommand failed: bad arguments (exit 2) or an I/O problem
/// (exit 1).
enum Failure {
    Usage(String),
    Io(String),
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Failure {
        Failure::Io(err.to_string())
    }
}

/// `--key value` options; each key at most once.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let Some(name) = key.strip_prefix("--") else {
                return Err(format!("unexpected argument {key:?}"));
            };
            let value = it.next().ok_or_else(|| format!("{key} needs a value"))?;
            if map.insert(name.to_owned(), value.clone()).is_some() {
                return Err(format!("{key} given twice"));
            }
        }
        Ok(Opts(map))
    }

    /// A required option parsed as `T`.
    fn get<T: std::str::FromStr>(&self, key: &str) -> Result<T, Failure> {
        let value = self
            .0
            .get(key)
            .ok_or_else(|| Failure::Usage(format!("--{key} is required")))?;
        value
            .parse()
            .map_err(|_| Failure::Usage(format!("--{key}: invalid value {value:?}")))
    }

    /// An optional option parsed as `T`, `default` when absent.
    fn get_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, Failure> {
        match self.0.contains_key(key) {
            true => self.get(key),
            false => Ok(default),
        }
    }

    /// Rejects options this subcommand does not know (catches typos).
    fn only(&self, allowed: &[&str]) -> Result<(), Failure> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) => Err(Failure::Usage(format!("unknown option --{key}"))),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------- serve

fn serve(opts: &Opts) -> Result<ExitCode, Failure> {
    opts.only(&["listen", "name"])?;
    let listen: SocketAddr = opts.get("listen")?;
    let name: String = opts.get("name")?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(Failure::Usage("--name must be one non-empty word".into()));
    }
    let listener = TcpListener::bind(listen)?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening {}", listener.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);
    let name = Arc::new(name);
    let active = Arc::new(AtomicUsize::new(0));
    // Runs until killed: the process that started us bounds our lifetime.
    loop {
        match listener.accept() {
            Ok((stream, peer)) => admit(stream, peer, &name, &active),
            Err(err) => {
                eprintln!("meshtool serve: accept: {err}");
                // E.g. EMFILE: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Starts a connection thread unless [`MAX_CONNECTIONS`] are active, in
/// which case the connection is closed at once.
fn admit(stream: TcpStream, peer: SocketAddr, name: &Arc<String>, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::SeqCst);
        eprintln!("meshtool serve: too many connections, closing {peer}");
        return;
    }
    let (name, slot) = (Arc::clone(name), Arc::clone(active));
    let spawned = thread::Builder::new().spawn(move || {
        if let Err(err) = handle(stream, peer, &name) {
            eprintln!("meshtool serve: {peer}: {err}");
        }
        slot.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(err) = spawned {
        // The closure, and the decrement in it, was dropped unrun.
        active.fetch_sub(1, Ordering::SeqCst);
        eprintln!("meshtool serve: cannot start thread: {err}");
    }
}

/// Greets, echoes until EOF, then half-closes our side.
fn handle(mut stream: TcpStream, peer: SocketAddr, name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(format!("{name} {peer}\n").as_bytes())?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => stream.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.shutdown(Shutdown::Write)
}

// ---------------------------------------------------------------- hello

#[derive(Serialize)]
#[serde(untagged)]
enum HelloLine {
    Ok {
        ok: bool,
        backend: String,
        peer: String,
        elapsed_us: u128,
    },
    Err {
        ok: bool,
        error: String,
        kind: &'static str,
        elapsed_us: u128,
    },
}

fn hello(opts: &Opts) -> Result<ExitCode, Failure> {
    opts.only(&["to", "count", "timeout-ms"])?;
    let to: SocketAddr = opts.get("to")?;
    let count: u32 = opts.get("count")?;
    let timeout = timeout_opt(opts, 2000)?;
    let mut stdout = io::stdout().lock();
    for _ in 0..count {
        let start = Instant::now();
        let line = hello_line(greet(to, timeout), start);
        let json = serde_json::to_string(&line).map_err(|e| Failure::Io(e.to_string()))?;
        writeln!(stdout, "{json}")?;
        stdout.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON line of one hello attempt that began at `start`.
fn hello_line(result: io::Result<(String, String)>, start: Instant) -> HelloLine {
    let elapsed_us = start.elapsed().as_micros();
    match result {
        Ok((backend, peer)) => HelloLine::Ok {
            ok: true,
            backend,
            peer,
            elapsed_us,
        },
        Err(err) => HelloLine::Err {
            ok: false,
            kind: kind_of(&err),
            error: err.to_string(),
            elapsed_us,
        },
    }
}

/// `hold`: opens `count` connections one after the other and keeps every
/// one that got its greeting open until all were tried and `hold-ms` has
/// passed; then prints one hello line per connection. For connection
/// limits: connections beyond a limit fail while the others are held.
fn hold(opts: &Opts) -> Result<ExitCode, Failure> {
    opts.only(&["to", "count", "hold-ms", "timeout-ms"])?;
    let to: SocketAddr = opts.get("to")?;
    let count: u32 = opts.get("count")?;
    let hold_for = Duration::from_millis(opts.get_or("hold-ms", 500)?.min(30_000));
    let timeout = timeout_opt(opts, 2000)?;
    let mut held = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..count {
        let start = Instant::now();
        let deadline = start + timeout;
        let attempt = TcpStream::connect_timeout(&to, timeout).and_then(|stream| {
            let mut reader = BufReader::new(stream);
            let greeting = read_greeting(&mut reader, deadline)?;
            Ok((reader, greeting))
        });
        let greeting = attempt.map(|(reader, greeting)| {
            held.push(reader);
            greeting
        });
        lines.push(hello_line(greeting, start));
    }
    std::thread::sleep(hold_for);
    drop(held);
    let mut stdout = io::stdout().lock();
    for line in &lines {
        let json = serde_json::to_string(line).map_err(|e| Failure::Io(e.to_string()))?;
        writeln!(stdout, "{json}")?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `--timeout-ms`, which must be positive (a zero timeout means "none" to
/// std and would allow unbounded waits).
fn timeout_opt(opts: &Opts, default_ms: u64) -> Result<Duration, Failure> {
    match opts.get_or("timeout-ms", default_ms)? {
        0 => Err(Failure::Usage("--timeout-ms must be positive".into())),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// One hello: connect, read the greeting, close. Returns (backend, peer).
fn greet(to: SocketAddr, timeout: Duration) -> io::Result<(String, String)> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&to, timeout)?;
    let mut reader = BufReader::new(stream);
    read_greeting(&mut reader, deadline)
}

/// Reads `<name> <peer>\n` from the server, bounded by `deadline`.
fn read_greeting(
    reader: &mut BufReader<TcpStream>,
    deadline: Instant,
) -> io::Result<(String, String)> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "timed out before greeting",
        ));
    }
    reader.get_ref().set_read_timeout(Some(remaining))?;
    let mut line = String::new();
    reader.by_ref().take(MAX_GREETING).read_line(&mut line)?;
    let Some(line) = line.strip_suffix('\n') else {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before greeting",
        ));
    };
    let (backend, peer) = line.split_once(' ').ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("bad greeting {line:?}"))
    })?;
    Ok((backend.to_owned(), peer.to_owned()))
}

/// The error class the caller asserts on.
fn kind_of(err: &io::Error) -> &'static str {
    use io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused => "refused",
        // EPERM: what a connect hook's refusal looks like.
        K::PermissionDenied => "denied",
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
        K::TimedOut | K::WouldBlock => "timeout",
        K::UnexpectedEof => "eof",
        K::HostUnreachable | K::NetworkUnreachable => "unreachable",
        _ => match err.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => "unreachable",
            _ => "other",
        },
    }
}

// ------------------------------------------------------------- transfer

#[derive(Serialize)]
struct TransferLine {
    sent: u64,
    received: u64,
    #[serde(rename = "match")]
    matched: bool,
    backend: String,
    elapsed_ms: u128,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn transfer(opts: &Opts) -> Result<ExitCode, Failure> {
    opts.only(&["to", "bytes", "timeout-ms", "pace-ms"])?;
    let to: SocketAddr = opts.get("to")?;
    let bytes: u64 = opts.get("bytes")?;
    let timeout = timeout_opt(opts, 60_000)?;
    let pace = Duration::from_millis(opts.get_or("pace-ms", 0)?);
    let start = Instant::now();
    let line = match run_transfer(to, bytes, timeout, pace) {
        Ok(line) => line,
        Err(err) => TransferLine {
            sent: 0,
            received: 0,
            matched: false,
            backend: String::new(),
            elapsed_ms: 0,
            error: Some(err),
        },
    };
    let line = TransferLine {
        elapsed_ms: start.elapsed().as_millis(),
        ..line
    };
    let json = serde_json::to_string(&line).map_err(|e| Failure::Io(e.to_string()))?;
    println!("{json}");
    Ok(if line.matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Connects, reads the greeting, streams `bytes` out on a writer thread
/// while reading the echo here, and compares count and hash.
fn run_transfer(
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
    pace: Duration,
) -> Result<TransferLine, String> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut reader =
        BufReader::with_capacity(CHUNK, stream.try_clone().map_err(|e| e.to_string())?);
    let (backend, _peer) =
        read_greeting(&mut reader, deadline).map_err(|e| format!("greeting: {e}"))?;
    let writer_stream = stream.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::spawn(move || send_stream(writer_stream, bytes, pace));
    let received = read_echo(&mut reader, deadline);
    if received.is_err() {
        // Unblock the writer (it may wait for window space we never free).
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = writer
        .join()
        .map_err(|_| "writer thread panicked".to_string())?;
    let (sent, sent_hash) = sent.map_err(|e| format!("send: {e}"))?;
    let (received, received_hash) = received.map_err(|e| format!("receive: {e}"))?;
    Ok(TransferLine {
        sent,
        received,
        matched: sent == received && sent_hash == received_hash,
        backend,
        elapsed_ms: 0,
        error: None,
    })
}

/// Writes `bytes` of the deterministic stream, then half-closes: the
/// echo must still arrive in full after our FIN.
fn send_stream(mut stream: TcpStream, bytes: u64, pace: Duration) -> io::Result<(u64, u64)> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut hash = Fnv::new();
    let mut chunk = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = usize::try_from(bytes - sent).map_or(CHUNK, |left| left.min(CHUNK));
        rng.fill(&mut chunk[..n]);
        stream.write_all(&chunk[..n])?;
        hash.update(&chunk[..n]);
        sent += n as u64;
        if !pace.is_zero() {
            thread::sleep(pace);
        }
    }
    stream.shutdown(Shutdown::Write)?;
    Ok((sent, hash.0))
}

/// Reads the echo until EOF (bounded by `deadline`); returns count and hash.
fn read_echo(reader: &mut BufReader<TcpStream>, deadline: Instant) -> io::Result<(u64, u64)> {
    let mut hash = Fnv::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {received} bytes"),
            ));
        }
        reader.get_ref().set_read_timeout(Some(remaining))?;
        match reader.read(&mut buf) {
            Ok(0) => return Ok((received, hash.0)),
            Ok(n) => {
                hash.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// xorshift64: a fast deterministic stream, so sender and checker agree
/// without storing the data.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            word.copy_from_slice(&self.0.to_le_bytes()[..word.len()]);
        }
    }
}

/// FNV-1a 64: order-sensitive, so reordered or corrupted echo is caught.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
