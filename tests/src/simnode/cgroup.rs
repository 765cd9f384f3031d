//! cgroup v2 plumbing for the simulated node.
//!
//! The mount point differs between machines (`/sys/fs/cgroup` on unified
//! hosts, `/sys/fs/cgroup/unified` on hybrid ones), so it is always read
//! from `/proc/mounts`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Deepest cgroup nesting we walk when tearing down; ours is 4 levels, the
/// rest is headroom for directories tests create below pods.
const MAX_DEPTH: usize = 16;

/// Where the cgroup2 hierarchy is mounted (first `cgroup2` entry in
/// `/proc/mounts`).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .next()
        .context("no cgroup2 filesystem in /proc/mounts (cgroup v2 is required)")
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates one cgroup directory; an existing one is an error because it
/// would mean two nodes share names.
pub(crate) fn create(path: &Path) -> anyhow::Result<()> {
    fs::create_dir(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// The pids listed in a cgroup's `cgroup.procs`.
pub fn procs(cgroup: &Path) -> anyhow::Result<Vec<u32>> {
    let path = cgroup.join("cgroup.procs");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| {
            l.trim()
                .parse::<u32>()
                .with_context(|| format!("bad pid {l:?} in {}", path.display()))
        })
        .collect()
}

/// `root` and every cgroup below it, children before their parent (the
/// order in which they can be removed).
pub(crate) fn tree_deepest_first(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, 0, &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if depth > MAX_DEPTH {
        bail!("cgroup tree deeper than {MAX_DEPTH} at {}", dir.display());
    }
    let entries = fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), depth + 1, out)?;
        }
    }
    out.push(dir.to_path_buf());
    Ok(())
}

/// Kills every process in `root`'s subtree and waits (at most `timeout`)
/// until no cgroup in it lists a process.
///
/// `cgroup.kill` (Linux 5.14+) kills the whole subtree atomically, also
/// processes forking meanwhile; on older kernels we fall back to SIGKILL
/// per listed pid, repeated on every poll round.
pub(crate) fn kill_tree(root: &Path, timeout: Duration) -> anyhow::Result<()> {
    let has_kill = fs::write(root.join("cgroup.kill"), "1").is_ok();
    let deadline = Instant::now() + timeout;
    loop {
        let mut remaining = Vec::new();
        for cgroup in tree_deepest_first(root)? {
            remaining.extend(procs(&cgroup)?);
        }
        if remaining.is_empty() {
            return Ok(());
        }
        if !has_kill {
            remaining.iter().for_each(|&pid| sigkill(pid));
        }
        if Instant::now() >= deadline {
            bail!(
                "processes {remaining:?} still in {} after {timeout:?}",
                root.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigkill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The pid was
    // listed in one of our cgroups a moment ago.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Removes `root` and every cgroup below it, deepest first. A missing
/// `root` is not an error (teardown is idempotent).
pub(crate) fn remove_tree(root: &Path) -> anyhow::Result<()> {
    if !root.exists() {
        return Ok(());
    }
    for cgroup in tree_deepest_first(root)? {
        match fs::remove_dir(&cgroup) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing cgroup {}", cgroup.display()));
            }
        }
    }
    Ok(())
}
