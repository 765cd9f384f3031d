//! Leaky bucket as GCRA (the Generic Cell Rate Algorithm of ATM / RFC 2697-style policers).
//!
//! Requests drain at one per emission interval T = 1/R. The state is a single instant, the
//! theoretical arrival time (TAT): the next free slot. A request arriving at `now` is scheduled
//! at `slot = max(now, TAT)`, and TAT advances by T. The bucket holds at most `capacity`
//! scheduled-but-not-yet-drained requests, i.e. a request fits if `slot - now <= capacity * T`.
//!
//! Two modes, chosen by the config's `action`:
//! - shaper (`action: delay`): a request proceeds at its slot: Allow if the slot is now,
//!   otherwise Delay until it (bounded also by maxWait). Output is smooth: exactly 1/R apart.
//! - meter (`action: reject`): a request that fits is forwarded at once (GCRA policing with
//!   burst tolerance `capacity * T`), so up to `capacity + 1` back-to-back requests pass after
//!   an idle period; long-run throughput is R either way.

use std::time::{Duration, Instant};

use super::algorithm::{Admission, MAX_SPAN, later, secs_ceil};

#[derive(Debug, Clone)]
pub(crate) struct LeakyBucket {
    interval: Duration,
    /// `capacity * interval`: how far ahead of `now` a slot may be.
    tolerance: Duration,
    /// Theoretical arrival time: the next free slot.
    tat: Instant,
    shaping: bool,
}

impl LeakyBucket {
    pub(crate) fn new(rate: f64, capacity: u32, shaping: bool, now: Instant) -> LeakyBucket {
        let interval = secs_ceil(1.0 / rate);
        let tolerance = interval
            .checked_mul(capacity)
            .unwrap_or(MAX_SPAN)
            .min(MAX_SPAN);
        LeakyBucket {
            interval,
            tolerance,
            tat: now,
            shaping,
        }
    }

    /// `now` must not go backwards (the `Limiter` wrapper guarantees it).
    pub(crate) fn acquire(&mut self, now: Instant, max_wait: Duration) -> Admission {
        let slot = self.tat.max(now);
        let wait = slot.saturating_duration_since(now);
        let admission = if self.shaping {
            Admission::for_wait(wait, self.tolerance.min(max_wait))
        } else {
            Admission::for_wait(wait.saturating_sub(self.tolerance), Duration::ZERO)
        };
        if !admission.is_denied() {
            self.tat = later(slot, self.interval);
        }
        admission
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn shaper_schedules_consecutive_slots_within_capacity() {
        let t0 = Instant::now();
        let mut b = LeakyBucket::new(10.0, 3, true, t0);
        let max_wait = Duration::from_secs(10);
        assert_eq!(b.acquire(t0, max_wait), Admission::Now);
        assert_eq!(b.acquire(t0, max_wait), Admission::After(100 * MS));
        assert_eq!(b.acquire(t0, max_wait), Admission::After(200 * MS));
        assert_eq!(b.acquire(t0, max_wait), Admission::After(300 * MS));
        // Capacity 3 reached: the next slot (400ms) is beyond 3 * T.
        let denied = Admission::Denied {
            retry_after: 100 * MS,
        };
        assert_eq!(b.acquire(t0, max_wait), denied);
        // One slot drained: room for one more, at the end of the queue.
        assert_eq!(
            b.acquire(t0 + 100 * MS, max_wait),
            Admission::After(300 * MS)
        );
    }

    #[test]
    fn shaper_is_also_bounded_by_max_wait() {
        let t0 = Instant::now();
        let mut b = LeakyBucket::new(10.0, 100, true, t0);
        let max_wait = 150 * MS;
        assert_eq!(b.acquire(t0, max_wait), Admission::Now);
        assert_eq!(b.acquire(t0, max_wait), Admission::After(100 * MS));
        let denied = Admission::Denied {
            retry_after: 50 * MS,
        };
        assert_eq!(b.acquire(t0, max_wait), denied);
        // A slot that is exactly now is admitted without delay.
        assert_eq!(b.acquire(t0 + 200 * MS, max_wait), Admission::Now);
    }

    #[test]
    fn meter_admits_capacity_plus_one_at_once_then_paces() {
        let t0 = Instant::now();
        let mut b = LeakyBucket::new(10.0, 2, false, t0);
        for _ in 0..3 {
            assert_eq!(b.acquire(t0, Duration::from_secs(1)), Admission::Now);
        }
        let denied = Admission::Denied {
            retry_after: 100 * MS,
        };
        assert_eq!(b.acquire(t0, Duration::ZERO), denied);
        assert_eq!(b.acquire(t0 + 100 * MS, Duration::ZERO), Admission::Now);
        assert!(b.acquire(t0 + 150 * MS, Duration::ZERO).is_denied());
    }

    #[test]
    fn idle_time_does_not_accumulate_beyond_capacity() {
        let t0 = Instant::now();
        let mut b = LeakyBucket::new(10.0, 1, false, t0);
        let idle = t0 + Duration::from_secs(60);
        assert_eq!(b.acquire(idle, Duration::ZERO), Admission::Now);
        assert_eq!(b.acquire(idle, Duration::ZERO), Admission::Now);
        assert!(b.acquire(idle, Duration::ZERO).is_denied());
    }
}
