//! Token bucket: `capacity` tokens, refilled continuously at `rate` per second, one per request.
//!
//! Envoy's `local_ratelimit` refills `tokens_per_fill` every `fill_interval`; we refill
//! continuously (equivalent to an infinitesimal fill interval), which avoids the thundering
//! herd at each fill tick. Like Envoy the bucket starts full. A delayed request borrows a token
//! from the future: the level goes negative and later requests wait for the debt to be repaid,
//! which is what keeps admitted-after-delay traffic at R.

use std::time::{Duration, Instant};

use super::algorithm::{Admission, secs_ceil};

#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    capacity: f64,
    /// May be negative: tokens already promised to delayed requests.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, capacity: u32, now: Instant) -> TokenBucket {
        let capacity = f64::from(capacity.max(1));
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// `now` must not go backwards (the `Limiter` wrapper guarantees it).
    pub(crate) fn acquire(&mut self, now: Instant, max_wait: Duration) -> Admission {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
        // Time until a whole token is available. A deficit worth less than 0.001 ns of refill is
        // float noise (waiting exactly a computed retry-after can leave 0.9999999999999999
        // tokens) and rounds to no wait.
        let wait = secs_ceil((1.0 - self.tokens) / self.rate);
        let admission = Admission::for_wait(wait, max_wait);
        if !admission.is_denied() {
            self.tokens -= 1.0;
        }
        admission
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn starts_full_and_admits_exactly_capacity_back_to_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5, t0);
        for _ in 0..5 {
            assert_eq!(b.acquire(t0, Duration::ZERO), Admission::Now);
        }
        assert!(b.acquire(t0, Duration::ZERO).is_denied());
    }

    #[test]
    fn refills_at_rate_and_retry_after_is_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 1, t0);
        assert_eq!(b.acquire(t0, Duration::ZERO), Admission::Now);
        let denied = b.acquire(t0 + 40 * MS, Duration::ZERO);
        assert_eq!(
            denied,
            Admission::Denied {
                retry_after: 60 * MS
            }
        );
        assert_eq!(b.acquire(t0 + 100 * MS, Duration::ZERO), Admission::Now);
    }

    #[test]
    fn refill_is_capped_at_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.acquire(later, Duration::ZERO), Admission::Now);
        assert_eq!(b.acquire(later, Duration::ZERO), Admission::Now);
        assert!(b.acquire(later, Duration::ZERO).is_denied());
    }

    #[test]
    fn delay_reserves_future_tokens_in_fifo_order() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 1, t0);
        let max_wait = 250 * MS;
        assert_eq!(b.acquire(t0, max_wait), Admission::Now);
        assert_eq!(b.acquire(t0, max_wait), Admission::After(100 * MS));
        assert_eq!(b.acquire(t0, max_wait), Admission::After(200 * MS));
        // The third slot (300ms) is beyond max_wait: denied, and the denial reserves nothing.
        let denied = Admission::Denied {
            retry_after: 50 * MS,
        };
        assert_eq!(b.acquire(t0, max_wait), denied);
        assert_eq!(
            b.acquire(t0 + 50 * MS, max_wait),
            Admission::After(250 * MS)
        );
    }
}
