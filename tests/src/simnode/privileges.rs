//! Deciding whether privileged tests can run here.
//!
//! Namespaces, cgroups and BPF need root. The privileged tests carry
//! `#[ignore = "needs root..."]`, so a plain `cargo test` without root
//! reports them as ignored (never as passed); `cargo xtask test` includes
//! them when it runs as root or with `CI=true`. Run anyway without the
//! means (e.g. `--include-ignored` as a user), a test prints why it skips;
//! CI must never skip silently, because a test that skips in CI tests
//! nothing.

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use super::cgroup::cgroup2_mount;
use super::ipcmd::checked;

static NEXT_PROBE: AtomicU64 = AtomicU64::new(0);

/// Returns true when privileged tests can run (root, a writable cgroup2
/// hierarchy, a working `ip`). Otherwise: under `CI=true` it panics with
/// the reason; elsewhere it prints `skipping <test>: <reason>` to stderr
/// and returns false, and the caller returns early. Only reached when an
/// ignored privileged test was asked for explicitly.
pub fn require_privileges(test: &str) -> bool {
    let Err(reason) = check() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: privileged test cannot run under CI=true: {reason:#}");
    }
    eprintln!("skipping {test}: {reason:#}");
    false
}

/// The actual checks; the error is the human-readable reason.
fn check() -> anyhow::Result<()> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("needs root (euid is {euid})");
    }
    let mount = cgroup2_mount()?;
    // Creating a cgroup proves the hierarchy is writable (not a read-only
    // container mount); it is removed at once.
    let probe = mount.join(format!(
        "dataplane-probe-{}-{}",
        std::process::id(),
        NEXT_PROBE.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&probe)
        .with_context(|| format!("cgroup2 at {} is not writable", mount.display()))?;
    fs::remove_dir(&probe).with_context(|| format!("removing probe cgroup {}", probe.display()))?;
    let mut ip = Command::new("ip");
    ip.args(["netns", "list"]);
    checked(ip, Duration::from_secs(10)).context("iproute2 `ip` is not usable")?;
    Ok(())
}
