//! Behaviour of `RateLimiter` as the integrator sees it: throughput of every algorithm under
//! overload, bursts, the delay action, Retry-After and robustness. Classes, per-pod keying and
//! config parsing are in the submodules.

mod classes;
mod config;
mod delay;
mod retry_after;
mod validation;

use std::time::{Duration, Instant};

use super::*;

pub(super) const MS: Duration = Duration::from_millis(1);
pub(super) const SEC: Duration = Duration::from_secs(1);
pub(super) const NO_POD: Request<'static> = Request {
    pod: None,
    headers: &(),
};

pub(super) fn limiter(yaml: &str) -> RateLimiter {
    let cfg: RateLimitConfig = serde_yaml_ng::from_str(yaml).expect("valid config");
    RateLimiter::new(&cfg).expect("valid limiter")
}

/// Admissions of a constant-rate flood, counted by the time the request is forwarded.
#[derive(Debug, Default)]
pub(super) struct Flood {
    /// Forwarded (at once, or at the end of their delay) before the end of the run.
    pub forwarded: u32,
    pub allowed: u32,
    pub delayed: u32,
    pub rejected: u32,
}

/// Sends `per_sec` evenly spaced requests for `secs` seconds; delayed requests hold their queue
/// slot until their forward time, as an integrator would.
pub(super) fn flood(
    rl: &RateLimiter,
    req: &Request<'_>,
    t0: Instant,
    per_sec: u32,
    secs: u32,
) -> Flood {
    let step = SEC / per_sec;
    let end = t0 + SEC * secs;
    let mut held: Vec<(Instant, QueueSlot)> = Vec::new();
    let mut out = Flood::default();
    for i in 0..per_sec * secs {
        let now = t0 + step * i;
        held.retain(|(until, _)| *until > now);
        match rl.check(req, now) {
            Decision::Allow => {
                out.allowed += 1;
                out.forwarded += 1;
            }
            Decision::Delay { wait, slot } => {
                out.delayed += 1;
                out.forwarded += u32::from(now + wait < end);
                held.push((now + wait, slot));
            }
            Decision::Reject { .. } => out.rejected += 1,
        }
    }
    out
}

fn assert_within_10_percent(got: u32, expected: u32, what: &str) {
    let (lo, hi) = (expected * 9 / 10, expected * 11 / 10);
    assert!(
        (lo..=hi).contains(&got),
        "{what}: {got} not within 10% of {expected}"
    );
}

pub(super) const ALGORITHMS: [&str; 4] =
    ["tokenBucket", "fixedWindow", "slidingWindow", "leakyBucket"];

#[test]
fn every_algorithm_admits_r_under_a_5x_flood_with_reject() {
    for algorithm in ALGORITHMS {
        let rl = limiter(&format!(
            "{{algorithm: {algorithm}, requestsPerSecond: 100, burst: 20}}"
        ));
        let f = flood(&rl, &NO_POD, Instant::now(), 500, 5);
        assert_within_10_percent(f.forwarded, 500, algorithm);
        assert_eq!(f.delayed, 0, "{algorithm}: action reject never delays");
        assert_eq!(f.allowed + f.rejected, 2500);
    }
}

#[test]
fn every_algorithm_admits_r_under_a_5x_flood_with_delay() {
    for algorithm in ALGORITHMS {
        let rl = limiter(&format!(
            "{{algorithm: {algorithm}, requestsPerSecond: 100, burst: 20, action: delay}}"
        ));
        let f = flood(&rl, &NO_POD, Instant::now(), 500, 5);
        // Delayed requests reserve capacity: forwarding stays at R although some waited.
        assert_within_10_percent(f.forwarded, 500, algorithm);
        assert!(f.delayed > 0, "{algorithm}: the delay action was used");
    }
}

#[test]
fn bursts_are_as_configured() {
    let back_to_back = |yaml: &str| {
        let rl = limiter(yaml);
        let t0 = Instant::now();
        (0..1000)
            .take_while(|_| rl.check(&NO_POD, t0).is_allow())
            .count()
    };
    assert_eq!(back_to_back("{requestsPerSecond: 100, burst: 20}"), 20);
    assert_eq!(
        back_to_back("{requestsPerSecond: 100}"),
        100,
        "burst defaults to R"
    );
    assert_eq!(back_to_back("{requestsPerSecond: 2.5}"), 3, "R rounded up");
    assert_eq!(back_to_back("{requestsPerSecond: 0.1}"), 1, "at least 1");
    // GCRA meter: the request draining now plus `burst` in the bucket.
    assert_eq!(back_to_back("{algorithm: leakyBucket, burst: 20}"), 21);
    assert_eq!(
        back_to_back("{algorithm: fixedWindow, requestsPerSecond: 10, window: 3s}"),
        30
    );
}

#[test]
fn sliding_window_smooths_the_fixed_window_boundary_burst() {
    let passed_around_boundary = |algorithm: &str| {
        let rl = limiter(&format!(
            "{{algorithm: {algorithm}, requestsPerSecond: 10}}"
        ));
        let t0 = Instant::now();
        assert!(
            rl.check(&NO_POD, t0).is_allow(),
            "first request aligns the windows"
        );
        let late = (0..20)
            .filter(|_| rl.check(&NO_POD, t0 + 990 * MS).is_allow())
            .count();
        let early = (0..20)
            .filter(|_| rl.check(&NO_POD, t0 + 1010 * MS).is_allow())
            .count();
        late + early
    };
    // Fixed: 9 left in window 0 plus a fresh 10 just after the boundary: 19 in 20ms.
    assert_eq!(passed_around_boundary("fixedWindow"), 19);
    // Sliding: window 0's 10 still weigh ~99% just after the boundary.
    assert_eq!(passed_around_boundary("slidingWindow"), 9);
}

#[test]
fn out_of_order_instants_neither_panic_nor_refill() {
    let rl = limiter("{requestsPerSecond: 10, burst: 2}");
    let t0 = Instant::now() + SEC;
    assert!(rl.check(&NO_POD, t0).is_allow());
    assert!(
        rl.check(&NO_POD, t0 - 500 * MS).is_allow(),
        "one token left"
    );
    assert!(
        !rl.check(&NO_POD, t0 - SEC).is_allow(),
        "going back earns nothing"
    );
    // Refill counts from t0, the latest instant seen, not from the earlier ones: one token.
    assert!(rl.check(&NO_POD, t0 + 100 * MS).is_allow());
    assert!(!rl.check(&NO_POD, t0 + 100 * MS).is_allow());
}

#[test]
fn extreme_configs_do_not_panic() {
    let t0 = Instant::now();
    for yaml in [
        "{requestsPerSecond: 1.0e-300}",
        "{requestsPerSecond: 1.0e300, burst: 4294967295}",
        "{algorithm: leakyBucket, requestsPerSecond: 1.0e-300, burst: 4294967295}",
        "{algorithm: fixedWindow, requestsPerSecond: 1.0e300, window: 1000000h}",
        "{algorithm: slidingWindow, requestsPerSecond: 1.0e-6, window: 100000000h}",
        "{action: delay, delay: {maxWait: 1000000000h, maxQueued: 4294967295}}",
    ] {
        let rl = limiter(yaml);
        for i in 0..5u32 {
            let _ = rl.check(&NO_POD, t0 + SEC * i * 1000);
        }
    }
}

#[test]
fn rate_limiter_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RateLimiter>();
    assert_send_sync::<QueueSlot>();
}
