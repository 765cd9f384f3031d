//! Priority classes: classification of requests and each class's own limiter state.
//!
//! Each class (the configured ones plus the implicit `default`, last) owns its limiter(s), lock,
//! delay queue and counters, so a flood in one class neither consumes another's rate nor
//! contends on its lock. Comparable to Envoy `local_ratelimit` descriptors, where a request
//! matching a descriptor is limited by that descriptor's own token bucket; we differ in that
//! classes are carved out of R (shares), so the service as a whole still admits about R.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::algorithm::{Admission, Limiter, LimiterSpec};
use super::config::{Action, PriorityClass, RateLimitConfig};
use super::lru::PodLru;
use super::{Decision, Request};

/// Counters of one class. `queued` is a gauge (requests currently held), the rest are totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassStats {
    pub allowed: u64,
    pub delayed: u64,
    pub rejected: u64,
    pub queued: u32,
}

#[derive(Debug)]
enum Matcher {
    /// Lowercased name, exact value.
    Header {
        name: Box<str>,
        value: Box<str>,
    },
    Pods(HashSet<Box<str>>),
    /// The default class.
    Any,
}

#[derive(Debug)]
enum Limiters {
    /// One limiter for the whole class, created at the first request.
    Shared(Option<Limiter>),
    /// One limiter per calling pod; requests without a pod id share `anonymous`.
    PerPod {
        pods: PodLru<Limiter>,
        anonymous: Option<Limiter>,
    },
}

#[derive(Debug)]
pub(crate) struct Class {
    name: Box<str>,
    matcher: Matcher,
    spec: LimiterSpec,
    limiters: Mutex<Limiters>,
    queued: Arc<AtomicU32>,
    allowed: AtomicU64,
    delayed: AtomicU64,
    rejected: AtomicU64,
}

/// All classes of a validated config in classification order, `default` last.
pub(crate) fn build(cfg: &RateLimitConfig) -> Box<[Class]> {
    let matchers = cfg
        .priority_classes
        .iter()
        .map(matcher_of)
        .chain(std::iter::once(Matcher::Any));
    cfg.class_shares()
        .zip(matchers)
        .map(|((name, share), matcher)| Class::new(cfg, name, share, matcher))
        .collect()
}

fn matcher_of(class: &PriorityClass) -> Matcher {
    match &class.match_header {
        Some(h) => Matcher::Header {
            name: h.name.to_ascii_lowercase().into(),
            value: h.value.as_str().into(),
        },
        None => Matcher::Pods(class.match_pods.iter().map(|p| p.as_str().into()).collect()),
    }
}

impl Class {
    /// A class with `share` percent of R. `burst` (token bucket size, leaky bucket capacity)
    /// scales with the share too (rounded, at least 1), so that all classes together burst about
    /// as much as one service-wide limiter would. `delay.maxQueued` is per class, unscaled.
    fn new(cfg: &RateLimitConfig, name: &str, share: f64, matcher: Matcher) -> Class {
        let fraction = share / 100.0;
        let burst = (f64::from(cfg.effective_burst()) * fraction).round();
        let spec = LimiterSpec {
            algorithm: cfg.algorithm,
            rate: cfg.requests_per_second * fraction,
            burst: burst.clamp(1.0, f64::from(u32::MAX)) as u32,
            window: cfg.window,
            shaping: cfg.action == Action::Delay,
        };
        let limiters = if cfg.per_pod {
            Limiters::PerPod {
                pods: PodLru::new(cfg.max_tracked_pods),
                anonymous: None,
            }
        } else {
            Limiters::Shared(None)
        };
        Class {
            name: name.into(),
            matcher,
            spec,
            limiters: Mutex::new(limiters),
            queued: Arc::new(AtomicU32::new(0)),
            allowed: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Does `req` belong to this class? Allocation-free.
    pub(crate) fn matches(&self, req: &Request<'_>) -> bool {
        match &self.matcher {
            Matcher::Header { name, value } => req.headers.header(name) == Some(&**value),
            Matcher::Pods(pods) => req.pod.is_some_and(|p| pods.contains(p)),
            Matcher::Any => true,
        }
    }

    /// The class's delay-queue counter (see `QueueSlot`).
    pub(crate) fn queue(&self) -> &Arc<AtomicU32> {
        &self.queued
    }

    /// Runs the limiter of `pod` (or the class's shared one) under the class lock.
    pub(crate) fn acquire(&self, pod: Option<&str>, now: Instant, max_wait: Duration) -> Admission {
        let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        let spec = &self.spec;
        let limiter = match (&mut *limiters, pod) {
            (Limiters::Shared(shared), _) => shared.get_or_insert_with(|| Limiter::new(spec, now)),
            (Limiters::PerPod { pods, .. }, Some(pod)) => {
                pods.get_or_insert_with(pod, || Limiter::new(spec, now))
            }
            (Limiters::PerPod { anonymous, .. }, None) => {
                anonymous.get_or_insert_with(|| Limiter::new(spec, now))
            }
        };
        limiter.acquire(now, max_wait)
    }

    /// Number of per-pod limiters currently held (0 without `perPod`).
    pub(crate) fn tracked_pods(&self) -> usize {
        match &*self.limiters.lock().unwrap_or_else(PoisonError::into_inner) {
            Limiters::Shared(_) => 0,
            Limiters::PerPod { pods, .. } => pods.len(),
        }
    }

    pub(crate) fn record(&self, decision: &Decision) {
        let counter = match decision {
            Decision::Allow => &self.allowed,
            Decision::Delay { .. } => &self.delayed,
            Decision::Reject { .. } => &self.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> ClassStats {
        ClassStats {
            allowed: self.allowed.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }
}
