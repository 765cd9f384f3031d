//! Fixed window: at most `limit` requests per window, windows aligned to the limiter's start.
//!
//! Windows are aligned to the limiter's creation (its first request, or the pod's first request
//! with `perPod`) rather than to wall-clock seconds: there is no wall clock here (`Instant` only),
//! and per-pod limiters then do not all reset on the same tick. The known weakness of fixed
//! windows is kept on purpose (it is what the algorithm is chosen for: exact, cheap counting):
//! up to 2 * limit requests can pass around a boundary; use `slidingWindow` to smooth it.

use std::time::{Duration, Instant};

use super::algorithm::{Admission, Windows};

#[derive(Debug, Clone)]
pub(crate) struct FixedWindow {
    windows: Windows,
    limit: u64,
    /// Latest window holding admitted or reserved requests. Reservations fill windows in order,
    /// so every window between the current one and `cursor` is already full.
    cursor: u64,
    /// Requests counted in window `cursor`.
    count: u64,
}

impl FixedWindow {
    pub(crate) fn new(limit: u64, window: Duration, now: Instant) -> FixedWindow {
        FixedWindow {
            windows: Windows::new(now, window),
            limit: limit.max(1),
            cursor: 0,
            count: 0,
        }
    }

    /// `now` must not go backwards (the `Limiter` wrapper guarantees it).
    pub(crate) fn acquire(&mut self, now: Instant, max_wait: Duration) -> Admission {
        let current = self.windows.index_of(now);
        if self.cursor < current {
            self.cursor = current;
            self.count = 0;
        }
        let (index, count) = if self.count < self.limit {
            (self.cursor, self.count)
        } else {
            (self.cursor.saturating_add(1), 0)
        };
        let wait = if index <= current {
            Duration::ZERO
        } else {
            self.windows.at(index, 0.0).saturating_duration_since(now)
        };
        let admission = Admission::for_wait(wait, max_wait);
        if !admission.is_denied() {
            self.cursor = index;
            self.count = count.saturating_add(1);
        }
        admission
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn counts_per_window_and_resets_on_the_boundary() {
        let t0 = Instant::now();
        let mut w = FixedWindow::new(3, Duration::from_secs(1), t0);
        for i in 0..3 {
            assert_eq!(w.acquire(t0 + i * 100 * MS, Duration::ZERO), Admission::Now);
        }
        let denied = Admission::Denied {
            retry_after: 600 * MS,
        };
        assert_eq!(w.acquire(t0 + 400 * MS, Duration::ZERO), denied);
        assert!(w.acquire(t0 + 999 * MS, Duration::ZERO).is_denied());
        // A full window again right at the boundary: the fixed-window burst.
        for _ in 0..3 {
            assert_eq!(w.acquire(t0 + 1000 * MS, Duration::ZERO), Admission::Now);
        }
        assert!(w.acquire(t0 + 1000 * MS, Duration::ZERO).is_denied());
    }

    #[test]
    fn windows_are_aligned_to_the_limiter_start_not_to_requests() {
        let t0 = Instant::now();
        let mut w = FixedWindow::new(1, Duration::from_secs(1), t0);
        assert_eq!(w.acquire(t0 + 900 * MS, Duration::ZERO), Admission::Now);
        // 200ms later, but in the next window (starting at t0 + 1s): admitted.
        assert_eq!(w.acquire(t0 + 1100 * MS, Duration::ZERO), Admission::Now);
        // Idle windows are skipped without replay.
        assert_eq!(w.acquire(t0 + 5500 * MS, Duration::ZERO), Admission::Now);
        let denied = Admission::Denied {
            retry_after: 500 * MS,
        };
        assert_eq!(w.acquire(t0 + 5500 * MS, Duration::ZERO), denied);
    }

    #[test]
    fn delay_reserves_the_next_window_and_fills_it_in_order() {
        let t0 = Instant::now();
        let mut w = FixedWindow::new(2, Duration::from_secs(1), t0);
        let max_wait = 800 * MS;
        let at = t0 + 300 * MS;
        assert_eq!(w.acquire(at, max_wait), Admission::Now);
        assert_eq!(w.acquire(at, max_wait), Admission::Now);
        assert_eq!(w.acquire(at, max_wait), Admission::After(700 * MS));
        assert_eq!(w.acquire(at, max_wait), Admission::After(700 * MS));
        // Window 1 is now full of reservations; window 2 is 1.7s away.
        let denied = Admission::Denied {
            retry_after: 900 * MS,
        };
        assert_eq!(w.acquire(at, max_wait), denied);
        // Arriving inside window 1, the reservations still count.
        assert!(w.acquire(t0 + 1500 * MS, Duration::ZERO).is_denied());
    }
}
