//! Retry-After: the exact time until admission, and the header value.

use std::time::{Duration, Instant};

use super::{ALGORITHMS, MS, NO_POD, SEC, limiter};
use crate::ratelimit::retry_after_header;

#[test]
fn retry_after_is_the_time_until_admission() {
    let rl = limiter("{requestsPerSecond: 4, burst: 1}");
    let t0 = Instant::now();
    assert!(rl.check(&NO_POD, t0).is_allow());
    let retry = rl.check(&NO_POD, t0 + 50 * MS).retry_after();
    assert_eq!(retry, Some(200 * MS));
    assert!(!rl.check(&NO_POD, t0 + 249 * MS).is_allow());
    assert!(rl.check(&NO_POD, t0 + 250 * MS).is_allow());
}

/// The Retry-After contract, for every algorithm over many rates and random arrivals at about
/// 2R: a request arriving exactly `retry_after` later is admitted, and one 1µs earlier is not.
#[test]
fn retry_after_is_exact_for_every_algorithm() {
    let mut rng = fastrand::Rng::with_seed(7);
    for algorithm in ALGORITHMS {
        for rate in [0.3f64, 1.0, 3.0, 7.0, 9.9, 33.3, 90.0, 1000.0] {
            // Windows of about 5 requests, so that window algorithms reject often too.
            let window_ms = (5000.0 / rate).round();
            let rl = limiter(&format!(
                "{{algorithm: {algorithm}, requestsPerSecond: {rate}, burst: 3, \
                  window: {window_ms}ms}}"
            ));
            let max_gap = (1e6 / rate) as u64;
            let (mut now, mut rejections) = (Instant::now(), 0);
            for _ in 0..1000 {
                now += Duration::from_micros(rng.u64(0..max_gap));
                let Some(retry) = rl.check(&NO_POD, now).retry_after() else {
                    continue;
                };
                rejections += 1;
                let early = now + retry - Duration::from_micros(1);
                assert!(
                    !rl.check(&NO_POD, early).is_allow(),
                    "{algorithm} {rate}: early"
                );
                now += retry;
                assert!(
                    rl.check(&NO_POD, now).is_allow(),
                    "{algorithm} {rate}: on time"
                );
            }
            assert!(
                rejections > 10,
                "{algorithm} {rate}: only {rejections} rejections"
            );
        }
    }
}

#[test]
fn retry_after_header_rounds_up_to_whole_seconds() {
    assert_eq!(retry_after_header(200 * MS), "1");
    assert_eq!(retry_after_header(SEC), "1");
    assert_eq!(retry_after_header(SEC + Duration::from_nanos(1)), "2");
    assert_eq!(retry_after_header(2500 * MS), "3");
    assert_eq!(retry_after_header(Duration::ZERO), "1");
    assert_eq!(retry_after_header(Duration::MAX), u64::MAX.to_string());
}
