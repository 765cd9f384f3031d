//! Thin wrapper around iproute2's `ip`.
//!
//! We drive `ip` rather than netlink directly: it is what an operator
//! would type, its error messages are clear, and it keeps this crate free
//! of netlink dependencies. Every call is bounded in time.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::proc::{describe, run_with_timeout};

/// Generous bound for a single `ip` invocation (they take milliseconds).
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip <args>` and fails with its stderr unless it exits 0.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    checked(cmd, IP_TIMEOUT)
}

/// Runs `cmd` (bounded by `timeout`) and turns a non-zero exit into an
/// error that quotes the command and its stderr.
pub(crate) fn checked(cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(&cmd);
    let out = run_with_timeout(cmd, timeout).with_context(|| format!("running `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Names of all named network namespaces (`ip netns list`).
pub fn netns_list() -> anyhow::Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines look like `name` or `name (id: 3)`.
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Sets sysctls inside a network namespace (`key=value` items).
pub(crate) fn netns_sysctl(netns: &str, settings: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "sysctl", "-qw"])
        .args(settings);
    checked(cmd, IP_TIMEOUT).map(drop)
}
