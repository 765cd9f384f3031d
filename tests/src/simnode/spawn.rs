//! Starting a process inside a network namespace and a cgroup.
//!
//! The process must be in its pod's cgroup *before* it runs a single
//! instruction of the target program: the agent's `connect4` program is
//! attached to a cgroup, and a connect made before the move would escape
//! capture. So the move happens in the forked child, before `exec`, with
//! file descriptors opened by the parent (nothing in the child allocates).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::proc::{Proc, describe};

/// Spawns `cmd` in the named network namespace (`/run/netns/<netns>`, as
/// created by `ip netns add`) and in `cgroup`.
pub(crate) fn spawn_in(netns: &str, cgroup: &Path, mut cmd: Command) -> anyhow::Result<Proc> {
    let what = describe(&cmd);
    let ns_path = Path::new("/run/netns").join(netns);
    // std opens files with O_CLOEXEC: the fds reach the forked child (which
    // uses them before exec) but never the program it executes.
    let ns = File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    // SAFETY: the closure runs between fork and exec and only makes the
    // async-signal-safe syscalls write(2) and setns(2) on fds that stay
    // open in the parent until `spawn` has returned.
    unsafe {
        cmd.pre_exec(move || enter(ns_fd, procs_fd));
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "spawning `{what}` in netns {netns}, cgroup {}",
            cgroup.display()
        )
    })?;
    drop((ns, procs));
    Ok(Proc::new(child, what))
}

/// Runs in the forked child: joins the cgroup (writing "0" to
/// `cgroup.procs` moves the writer) and the network namespace.
fn enter(ns_fd: RawFd, procs_fd: RawFd) -> io::Result<()> {
    // SAFETY: writes one byte from a static buffer to an open fd.
    let written = unsafe { libc::write(procs_fd, b"0".as_ptr().cast(), 1) };
    if written != 1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setns(2) on an open namespace fd; affects only this process.
    if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
