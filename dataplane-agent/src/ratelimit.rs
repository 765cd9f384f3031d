//! Local rate limiting of the node proxy: per service, optionally per calling pod, with
//! priority classes that reserve a share of the rate for privileged callers.
//!
//! Semantics follow Envoy's `envoy.filters.http.local_ratelimit` (token bucket, 429 on
//! exhaustion, buckets start full) with these additions: four algorithms (see
//! [`Algorithm`]), per-pod keying with an LRU bound, a `delay` action that holds requests in a
//! bounded queue instead of rejecting them, and priority classes. Unlike Envoy's local limiter,
//! which sends no `Retry-After`, every rejection carries the exact time until admission.
//! Like Envoy's default (token bucket shared across workers), one `RateLimiter` is shared by
//! all threads of the node proxy: limits are per service per node.
//!
//! For TCP services the integrator calls the same [`RateLimiter::check`] once per new
//! connection (with [`Request::tcp`]), so R means "new connections per second"; a rejected
//! connection is closed, a delayed one is accepted after the wait. Existing connections and
//! their bytes are never limited here.
//!
//! Everything is pure: time comes in as `now`, nothing sleeps; `Delay` tells the caller how
//! long to hold the request.

mod algorithm;
mod classes;
pub mod config;
mod decision;
mod fixed_window;
mod leaky_bucket;
mod lru;
mod sliding_window;
mod token_bucket;

#[cfg(test)]
mod tests;

use std::fmt;
use std::time::{Duration, Instant};

pub use classes::ClassStats;
pub use config::{
    Action, Algorithm, ConfigError, DelayConfig, HeaderMatch, PriorityClass, RateLimitConfig,
};
pub use decision::{Decision, QueueSlot, retry_after_header};

use algorithm::Admission;
use classes::Class;

/// Read access to a request's headers, implemented by the integrator for its header map.
/// Names are passed lowercased (HTTP/2 style); implementations should compare them
/// case-insensitively and return the first value of a repeated header.
pub trait HeaderLookup {
    fn header(&self, name: &str) -> Option<&str>;
}

/// No headers: TCP connections.
impl HeaderLookup for () {
    fn header(&self, _name: &str) -> Option<&str> {
        None
    }
}

/// A fixed list of `(name, value)` pairs (tests, small static header sets).
impl<const N: usize> HeaderLookup for [(&str, &str); N] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// What the limiter needs to know about one request or new connection. Borrowed, so building
/// it allocates nothing.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Id of the calling pod (e.g. its UID from the peer identity); `None` if unknown. With
    /// `perPod`, all requests without an id share one limiter per class.
    pub pod: Option<&'a str>,
    pub headers: &'a dyn HeaderLookup,
}

impl<'a> Request<'a> {
    /// An HTTP request.
    pub fn http(pod: Option<&'a str>, headers: &'a dyn HeaderLookup) -> Request<'a> {
        Request { pod, headers }
    }

    /// A new TCP connection: no headers, so only `matchPods` classes can match.
    pub fn tcp(pod: Option<&'a str>) -> Request<'a> {
        Request { pod, headers: &() }
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

/// The local rate limiter of one service. `Send + Sync`; share it behind an `Arc`.
/// Each priority class has its own lock, held only for one O(1) limiter update.
#[derive(Debug)]
pub struct RateLimiter {
    /// Never empty: the `default` class is always last.
    classes: Box<[Class]>,
    /// `Some((maxWait, maxQueued))` with `action: delay`.
    delay: Option<(Duration, u32)>,
}

impl RateLimiter {
    /// Builds the limiter; fails only on an invalid config (see [`RateLimitConfig::validate`]).
    pub fn new(cfg: &RateLimitConfig) -> Result<RateLimiter, ConfigError> {
        cfg.validate()?;
        let delay =
            (cfg.action == Action::Delay).then_some((cfg.delay.max_wait, cfg.delay.max_queued));
        Ok(RateLimiter {
            classes: classes::build(cfg),
            delay,
        })
    }

    /// Decides about one request (or new connection) arriving at `now`.
    pub fn check(&self, req: &Request<'_>, now: Instant) -> Decision {
        let Some(class) = self.classes.get(self.classify(req)) else {
            return Decision::Allow; // unreachable: classify() returns a valid index
        };
        // Take the queue place first, so a reservation is only ever made with a place to
        // wait in; it is released right away (on drop) if the request needs no wait.
        let slot = self
            .delay
            .and_then(|(_, max_queued)| QueueSlot::try_acquire(class.queue(), max_queued));
        let max_wait = match (&slot, self.delay) {
            (Some(_), Some((max_wait, _))) => max_wait,
            _ => Duration::ZERO,
        };
        let decision = match (class.acquire(req.pod, now, max_wait), slot) {
            (Admission::Now, _) => Decision::Allow,
            (Admission::After(wait), Some(slot)) => Decision::Delay { wait, slot },
            // Unreachable: algorithms only reserve future slots within max_wait (0 here).
            (Admission::After(retry_after), None) => Decision::Reject { retry_after },
            (Admission::Denied { retry_after }, _) => Decision::Reject { retry_after },
        };
        class.record(&decision);
        decision
    }

    /// Index of the class `req` belongs to: the first configured class that matches (config
    /// order), else the `default` class, whose index is `priorityClasses.len()`.
    pub fn classify(&self, req: &Request<'_>) -> usize {
        let last = self.classes.len().saturating_sub(1);
        self.classes[..last]
            .iter()
            .position(|c| c.matches(req))
            .unwrap_or(last)
    }

    /// Names of the classes by index (`default` last).
    pub fn class_names(&self) -> impl Iterator<Item = &str> {
        self.classes.iter().map(Class::name)
    }

    /// Counters of the class with this index, if it exists.
    pub fn stats(&self, class: usize) -> Option<ClassStats> {
        self.classes.get(class).map(Class::stats)
    }

    /// Per-pod limiters currently held, over all classes (each class is bounded by
    /// `maxTrackedPods`).
    pub fn tracked_pods(&self) -> usize {
        self.classes.iter().map(Class::tracked_pods).sum()
    }
}
