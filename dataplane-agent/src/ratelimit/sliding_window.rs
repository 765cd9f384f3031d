//! Sliding window counter (the approximation popularised by Cloudflare and used by
//! envoyproxy/ratelimit-style deployments), not a request log.
//!
//! The number of requests in the last `window` is estimated as
//! `previous * (1 - elapsed_fraction_of_current_window) + current`, assuming the previous
//! window's requests were spread evenly. A request is admitted while `estimate + 1 <= limit`.
//! This removes the fixed window's 2x burst at boundaries with O(1) state (a log would need
//! O(limit) memory per limiter, too much for thousands of per-pod limiters). Its error is
//! bounded by the unevenness of the previous window, which is fine for overload protection.

use std::time::{Duration, Instant};

use super::algorithm::{Admission, Windows};

#[derive(Debug, Clone)]
pub(crate) struct SlidingWindow {
    windows: Windows,
    limit: u64,
    /// Window that `current` counts; `previous` counts window `index - 1`.
    index: u64,
    previous: u64,
    current: u64,
}

impl SlidingWindow {
    pub(crate) fn new(limit: u64, window: Duration, now: Instant) -> SlidingWindow {
        SlidingWindow {
            windows: Windows::new(now, window),
            limit: limit.max(1),
            index: 0,
            previous: 0,
            current: 0,
        }
    }

    /// `now` must not go backwards (the `Limiter` wrapper guarantees it).
    ///
    /// A reservation rolls the counters forward to its (future) window, and the fraction a
    /// window needs only grows as its counts grow, so reservations come out FIFO without
    /// remembering the last slot: a later request can never fit before an earlier reservation.
    pub(crate) fn acquire(&mut self, now: Instant, max_wait: Duration) -> Admission {
        self.roll_to(self.windows.index_of(now));
        let (slot, index) = self.earliest_slot(now);
        let admission = Admission::for_wait(slot.saturating_duration_since(now), max_wait);
        if !admission.is_denied() {
            self.roll_to(index);
            self.current = self.current.saturating_add(1);
        }
        admission
    }

    /// Advances the counters to window `index`; an older index (a request arriving before a
    /// reservation's window) leaves them alone.
    fn roll_to(&mut self, index: u64) {
        if index == self.index.saturating_add(1) {
            self.previous = self.current;
            self.current = 0;
        } else if index > self.index {
            self.previous = 0;
            self.current = 0;
        }
        self.index = self.index.max(index);
    }

    /// Earliest instant `>= from` at which one more request fits, and its window index.
    /// Three windows always suffice: once the current window is full, the next one starts with
    /// `previous <= limit`, and the one after that with an empty previous window.
    fn earliest_slot(&self, from: Instant) -> (Instant, u64) {
        let (mut index, mut previous, mut current) = (self.index, self.previous, self.current);
        for _ in 0..3 {
            if let Some(fraction) = self.fraction_needed(previous, current) {
                return (self.windows.at(index, fraction).max(from), index);
            }
            index = index.saturating_add(1);
            previous = current;
            current = 0;
        }
        (self.windows.at(index, 0.0).max(from), index)
    }

    /// Smallest elapsed fraction f in [0, 1) of a window with these counts at which
    /// `previous * (1 - f) + current + 1 <= limit`, or None if the window has no room left.
    fn fraction_needed(&self, previous: u64, current: u64) -> Option<f64> {
        if current >= self.limit {
            return None;
        }
        let room = (self.limit - current - 1) as f64;
        if previous == 0 || room >= previous as f64 {
            return Some(0.0);
        }
        let fraction = 1.0 - room / previous as f64;
        (fraction < 1.0).then_some(fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn full_first_window(limit: u64) -> (Instant, SlidingWindow) {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(limit, Duration::from_secs(1), t0);
        for _ in 0..limit {
            assert_eq!(w.acquire(t0 + 900 * MS, Duration::ZERO), Admission::Now);
        }
        (t0, w)
    }

    #[test]
    fn previous_window_weighs_by_overlap() {
        let (t0, mut w) = full_first_window(10);
        // At the boundary the previous window weighs fully: nothing fits.
        let denied = Admission::Denied {
            retry_after: 100 * MS,
        };
        assert_eq!(w.acquire(t0 + 1000 * MS, Duration::ZERO), denied);
        // At 1.5s: 10 * 0.5 + n + 1 <= 10 holds for n = 0..=4: five more.
        let at = t0 + 1500 * MS;
        for _ in 0..5 {
            assert_eq!(w.acquire(at, Duration::ZERO), Admission::Now);
        }
        // The sixth needs 10 * (1 - f) + 5 + 1 <= 10, f >= 0.6: at 1.6s.
        let denied = Admission::Denied {
            retry_after: 100 * MS,
        };
        assert_eq!(w.acquire(at, Duration::ZERO), denied);
        assert_eq!(w.acquire(t0 + 1600 * MS, Duration::ZERO), Admission::Now);
    }

    #[test]
    fn an_idle_window_in_between_forgets_the_old_counts() {
        let (t0, mut w) = full_first_window(10);
        // Window 1 saw nothing, so window 2's previous window is empty: a full 10 at once.
        for _ in 0..10 {
            assert_eq!(w.acquire(t0 + 2000 * MS, Duration::ZERO), Admission::Now);
        }
        assert!(w.acquire(t0 + 2000 * MS, Duration::ZERO).is_denied());
    }

    #[test]
    fn full_current_window_waits_for_the_next_one() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(2, Duration::from_secs(1), t0);
        assert_eq!(w.acquire(t0, Duration::ZERO), Admission::Now);
        assert_eq!(w.acquire(t0, Duration::ZERO), Admission::Now);
        // Next window: previous = 2, so 2 * (1 - f) + 1 <= 2 needs f >= 0.5 -> 1.5s.
        let denied = Admission::Denied {
            retry_after: 1500 * MS,
        };
        assert_eq!(w.acquire(t0, Duration::ZERO), denied);
    }

    #[test]
    fn limit_one_skips_to_the_window_after_next() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(1, Duration::from_secs(1), t0);
        assert_eq!(w.acquire(t0 + 500 * MS, Duration::ZERO), Admission::Now);
        // In window 1 the previous request weighs until f = 1, i.e. the start of window 2.
        let denied = Admission::Denied {
            retry_after: 1500 * MS,
        };
        assert_eq!(w.acquire(t0 + 500 * MS, Duration::ZERO), denied);
    }

    #[test]
    fn delay_reservations_are_fifo_and_counted() {
        let (t0, mut w) = full_first_window(10);
        let max_wait = 300 * MS;
        let at = t0 + 950 * MS;
        // Earliest fits: 1.0s + 0.1s each (10 * (1 - f) + k + 1 <= 10).
        assert_eq!(w.acquire(at, max_wait), Admission::After(150 * MS));
        assert_eq!(w.acquire(at, max_wait), Admission::After(250 * MS));
        let denied = Admission::Denied {
            retry_after: 50 * MS,
        };
        assert_eq!(w.acquire(at, max_wait), denied);
        // The reservations count for later arrivals without delay allowance.
        assert!(w.acquire(t0 + 1250 * MS, Duration::ZERO).is_denied());
        assert_eq!(w.acquire(t0 + 1300 * MS, Duration::ZERO), Admission::Now);
    }
}
