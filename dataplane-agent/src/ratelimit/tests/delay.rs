//! The delay action: reservations, maxWait, maxQueued and the queue-slot guard.

use super::{MS, NO_POD, limiter};
use crate::ratelimit::{ClassStats, Decision};
use std::time::Instant;

#[test]
fn leaky_bucket_with_delay_schedules_slots_one_interval_apart_up_to_capacity() {
    let rl = limiter("{algorithm: leakyBucket, requestsPerSecond: 50, burst: 3, action: delay}");
    let t0 = Instant::now();
    let decisions: Vec<Decision> = (0..5).map(|_| rl.check(&NO_POD, t0)).collect();
    assert!(decisions[0].is_allow());
    let waits: Vec<_> = decisions[1..4].iter().map(Decision::delay).collect();
    assert_eq!(waits, [Some(20 * MS), Some(40 * MS), Some(60 * MS)]);
    assert_eq!(
        decisions[4].retry_after(),
        Some(20 * MS),
        "capacity 3 exceeded"
    );
}

#[test]
fn delay_is_bounded_by_max_wait() {
    let rl = limiter("{requestsPerSecond: 10, burst: 1, action: delay, delay: {maxWait: 250ms}}");
    let t0 = Instant::now();
    assert!(rl.check(&NO_POD, t0).is_allow());
    assert_eq!(rl.check(&NO_POD, t0).delay(), Some(100 * MS));
    assert_eq!(rl.check(&NO_POD, t0).delay(), Some(200 * MS));
    // The next slot is 300ms away: rejected, to come back when its wait would be 250ms.
    assert_eq!(rl.check(&NO_POD, t0).retry_after(), Some(50 * MS));
}

#[test]
fn delay_is_bounded_by_max_queued_and_slots_are_released_on_drop() {
    let rl = limiter(
        "{requestsPerSecond: 10, burst: 1, action: delay, delay: {maxWait: 10s, maxQueued: 2}}",
    );
    let t0 = Instant::now();
    assert!(rl.check(&NO_POD, t0).is_allow());
    let first = rl.check(&NO_POD, t0);
    let second = rl.check(&NO_POD, t0);
    assert_eq!(
        (first.delay(), second.delay()),
        (Some(100 * MS), Some(200 * MS))
    );
    assert_eq!(rl.stats(0).map(|s| s.queued), Some(2));
    // Queue full: rejected, with the time until it would be admitted without queueing.
    assert_eq!(rl.check(&NO_POD, t0).retry_after(), Some(300 * MS));
    drop(first);
    assert_eq!(rl.stats(0).map(|s| s.queued), Some(1));
    // A freed place admits the next one, behind the reservations already made.
    let third = rl.check(&NO_POD, t0);
    assert_eq!(third.delay(), Some(300 * MS));
    drop((second, third));
    let stats = ClassStats {
        allowed: 1,
        delayed: 3,
        rejected: 1,
        queued: 0,
    };
    assert_eq!(rl.stats(0), Some(stats));
}

#[test]
fn a_full_queue_still_admits_requests_that_need_no_wait() {
    let rl = limiter("{requestsPerSecond: 10, burst: 1, action: delay, delay: {maxQueued: 1}}");
    let t0 = Instant::now();
    assert!(rl.check(&NO_POD, t0).is_allow());
    let held = rl.check(&NO_POD, t0);
    assert_eq!(held.delay(), Some(100 * MS));
    // Still held (the integrator has not dropped it), but a token is free again at 200ms.
    assert!(rl.check(&NO_POD, t0 + 200 * MS).is_allow());
    drop(held);
}

#[test]
fn a_request_that_needs_no_wait_does_not_keep_a_queue_place() {
    let rl = limiter("{requestsPerSecond: 100, action: delay, delay: {maxQueued: 1}}");
    let t0 = Instant::now();
    for i in 0..50 {
        assert!(rl.check(&NO_POD, t0 + i * MS).is_allow());
    }
    assert_eq!(rl.stats(0).map(|s| s.queued), Some(0));
}
