//! The four admission algorithms behind one enum, plus the time arithmetic they share.
//!
//! Every algorithm is a pure `&mut self` state machine driven by the caller's `now`. They all
//! answer the same question: "when is the earliest slot at which one more request fits, given
//! everything already admitted or reserved?" A slot of `now` is admitted at once; a later slot is
//! *reserved* if it is within `max_wait` (the request proceeds at its slot without asking again,
//! so delayed requests still count against R), otherwise the request is denied and nothing
//! changes. Reservations are FIFO: a new request never gets a slot before an earlier reservation.

use std::time::{Duration, Instant};

use super::config::Algorithm;
use super::fixed_window::FixedWindow;
use super::leaky_bucket::LeakyBucket;
use super::sliding_window::SlidingWindow;
use super::token_bucket::TokenBucket;

/// Outcome of asking an algorithm for capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Capacity taken; proceed now.
    Now,
    /// Capacity reserved at `now + wait`, `0 < wait <= max_wait`.
    After(Duration),
    /// Nothing reserved; a request arriving `retry_after` from now (with the same `max_wait`)
    /// would be admitted, possibly with a delay.
    Denied { retry_after: Duration },
}

impl Admission {
    /// The shared decision for a request whose earliest slot is `wait` away.
    pub(crate) fn for_wait(wait: Duration, max_wait: Duration) -> Admission {
        if wait.is_zero() {
            Admission::Now
        } else if wait <= max_wait {
            Admission::After(wait)
        } else {
            Admission::Denied {
                retry_after: wait - max_wait,
            }
        }
    }

    pub(crate) fn is_denied(self) -> bool {
        matches!(self, Admission::Denied { .. })
    }
}

/// Everything needed to build one limiter of a class (rates already scaled by the class share).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LimiterSpec {
    pub algorithm: Algorithm,
    /// Requests per second, finite and > 0.
    pub rate: f64,
    /// Token bucket size or leaky bucket queue capacity, >= 1.
    pub burst: u32,
    pub window: Duration,
    /// Leaky bucket only: shape (delay to the slot) rather than meter (admit within capacity).
    pub shaping: bool,
}

/// One limiter: an algorithm plus a monotonic view of time.
///
/// Threads of the proxy read the clock before taking the class lock, so `now` may arrive slightly
/// out of order. Clamping it to the latest instant seen keeps every algorithm monotonic (no
/// spurious rejections, no time travel refills); the error is the lock hand-off time.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    latest: Instant,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    TokenBucket(TokenBucket),
    FixedWindow(FixedWindow),
    SlidingWindow(SlidingWindow),
    LeakyBucket(LeakyBucket),
}

impl Limiter {
    /// A fresh limiter whose buckets are full and whose windows start at `now`.
    pub(crate) fn new(spec: &LimiterSpec, now: Instant) -> Limiter {
        let burst = spec.burst.max(1);
        let kind = match spec.algorithm {
            Algorithm::TokenBucket => Kind::TokenBucket(TokenBucket::new(spec.rate, burst, now)),
            Algorithm::FixedWindow => {
                let limit = window_limit(spec.rate, spec.window);
                Kind::FixedWindow(FixedWindow::new(limit, spec.window, now))
            }
            Algorithm::SlidingWindow => {
                let limit = window_limit(spec.rate, spec.window);
                Kind::SlidingWindow(SlidingWindow::new(limit, spec.window, now))
            }
            Algorithm::LeakyBucket => {
                Kind::LeakyBucket(LeakyBucket::new(spec.rate, burst, spec.shaping, now))
            }
        };
        Limiter { latest: now, kind }
    }

    /// Takes or reserves capacity for one request (see the module docs).
    pub(crate) fn acquire(&mut self, now: Instant, max_wait: Duration) -> Admission {
        let now = now.max(self.latest);
        self.latest = now;
        match &mut self.kind {
            Kind::TokenBucket(b) => b.acquire(now, max_wait),
            Kind::FixedWindow(w) => w.acquire(now, max_wait),
            Kind::SlidingWindow(w) => w.acquire(now, max_wait),
            Kind::LeakyBucket(b) => b.acquire(now, max_wait),
        }
    }
}

/// Longest span the arithmetic works with (~115 days): keeps `Instant + Duration` from
/// overflowing for absurd rates such as 1e-300 req/s, whose answers are "not in this uptime".
pub(crate) const MAX_SPAN: Duration = Duration::from_secs(10_000_000);

/// `secs` as a Duration rounded up to the nanosecond (so that waiting it is always enough),
/// clamped to `[0, MAX_SPAN]`; NaN counts as zero.
pub(crate) fn secs_ceil(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    if secs >= MAX_SPAN.as_secs_f64() {
        return MAX_SPAN;
    }
    Duration::from_nanos(ceil_nanos(secs * 1e9))
}

/// Rounds a non-negative nanosecond count up, ignoring float noise below 0.001 ns.
fn ceil_nanos(nanos: f64) -> u64 {
    (nanos - 1e-3).ceil().max(0.0) as u64
}

/// `t + d` without the panic on overflow (unreachable with spans <= MAX_SPAN; then stays at `t`).
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

/// Whole requests per window at `rate`: floor(rate * window), tolerant of float error
/// (100/s * 10ms must give 1, not 0.99999).
pub(crate) fn window_limit(rate: f64, window: Duration) -> u64 {
    let exact = rate * window.as_secs_f64();
    if exact.is_nan() || exact <= 0.0 {
        return 0;
    }
    (exact + 1e-9).floor() as u64
}

/// Window bookkeeping shared by the fixed and sliding window: index `i` covers
/// `[start + i*w, start + (i+1)*w)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows {
    start: Instant,
    nanos: u64,
}

impl Windows {
    pub(crate) fn new(start: Instant, window: Duration) -> Windows {
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1);
        Windows { start, nanos }
    }

    /// Index of the window containing `t` (instants before the start count as window 0).
    pub(crate) fn index_of(&self, t: Instant) -> u64 {
        let elapsed = t.saturating_duration_since(self.start).as_nanos();
        u64::try_from(elapsed / u128::from(self.nanos)).unwrap_or(u64::MAX)
    }

    /// Start of window `index` plus `fraction` (in [0, 1]) of a window, rounded up.
    pub(crate) fn at(&self, index: u64, fraction: f64) -> Instant {
        let base = u128::from(index).saturating_mul(u128::from(self.nanos));
        let extra = u128::from(ceil_nanos(self.nanos as f64 * fraction.clamp(0.0, 1.0)));
        let nanos = u64::try_from(base.saturating_add(extra)).unwrap_or(u64::MAX);
        later(self.start, Duration::from_nanos(nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limit_tolerates_float_error_and_floors() {
        // 90/s * 0.7s is 62.99999999999999 in f64.
        assert_eq!(window_limit(90.0, Duration::from_millis(700)), 63);
        assert_eq!(window_limit(10.0, Duration::from_millis(250)), 2);
        assert_eq!(window_limit(10.0, Duration::from_millis(50)), 0);
        assert_eq!(window_limit(f64::NAN, Duration::from_secs(1)), 0);
        assert_eq!(window_limit(1e300, Duration::from_secs(1)), u64::MAX);
    }

    #[test]
    fn secs_ceil_rounds_up_clamps_and_ignores_float_noise() {
        assert_eq!(secs_ceil(0.5000000000000001), Duration::from_millis(500));
        assert_eq!(secs_ceil(1.5e-9), Duration::from_nanos(2));
        assert_eq!(secs_ceil(-1.0), Duration::ZERO);
        assert_eq!(secs_ceil(f64::NAN), Duration::ZERO);
        assert_eq!(secs_ceil(1e300), MAX_SPAN);
    }

    #[test]
    fn windows_index_and_start() {
        let t0 = Instant::now();
        let w = Windows::new(t0, Duration::from_secs(2));
        assert_eq!(w.index_of(t0), 0);
        assert_eq!(w.index_of(t0 + Duration::from_millis(3999)), 1);
        assert_eq!(w.index_of(t0 + Duration::from_secs(4)), 2);
        assert_eq!(w.at(3, 0.25), t0 + Duration::from_millis(6500));
    }
}
