//! Bounded waiting.
//!
//! Tests wait for things that happen asynchronously (a listener bound, a
//! map entry written by the agent). Sleeping a fixed time is either flaky
//! or slow, so we poll, and we always give up after a deadline so that a
//! broken test fails instead of hanging CI.

use std::time::{Duration, Instant};

use anyhow::anyhow;

/// How long [`eventually`] sleeps between attempts.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `f` until it returns `Ok`, every [`POLL_INTERVAL`], for at most
/// `timeout` (at least one attempt is always made).
///
/// The error names `what` and carries the last error of `f`, because "timed
/// out" alone does not tell which condition never came true or why.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        let err = match f() {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(anyhow!(
                "timed out after {timeout:?} ({attempts} attempts) waiting for {what}: last error: {err:#}"
            ));
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// A test's timeline from now: `at(s)` sleeps until `s` seconds after
/// this call (at once if that has passed), so that scripted events keep
/// their schedule however long each step took.
pub fn timeline() -> impl Fn(u64) {
    let started = Instant::now();
    move |second| {
        let due = started + Duration::from_secs(second);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
}
