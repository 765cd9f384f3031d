//! Configuration of the local rate limiter of one service.
//!
//! Shape follows Envoy's `local_ratelimit` filter (a token bucket per route/listener) extended with
//! the algorithms, per-pod keying, a delay action and priority classes this node proxy offers.
//! Every field has a default, so `{}` is a valid config (a 100 req/s token bucket that rejects).
//! Validation runs while deserializing (via `try_from`), so the YAML parser reports the path and
//! line of the enclosing mapping (serde_yaml_ng gives neither for a config at the document root),
//! and again in `RateLimiter::new`, because the fields are public and can be set by code.

use std::time::Duration;

use serde::{Deserialize, Serialize};

mod validate;

pub use validate::ConfigError;

/// Which admission algorithm a limiter runs. All are O(1) in time and memory per limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Algorithm {
    /// Bucket of `burst` tokens refilled at R/s (Envoy `local_ratelimit` semantics).
    #[default]
    TokenBucket,
    /// At most R * window requests per window; windows aligned to the limiter's first request.
    FixedWindow,
    /// Sliding-window counter: previous window's count weighted by its overlap.
    SlidingWindow,
    /// GCRA: requests get consecutive slots 1/R apart; `burst` slots may be pending.
    LeakyBucket,
}

/// What happens to a request the limiter cannot admit right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// Answer 429 with `Retry-After` (Envoy local rate limit behaviour).
    #[default]
    Reject,
    /// Hold the request in a bounded queue until its reserved slot, then forward it.
    Delay,
}

/// Bounds of the delay queue (used with `action: delay`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DelayConfig {
    /// Longest a request may be held; a request that would wait longer is rejected.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Most requests held at once per priority class (the integrator's memory bound).
    pub max_queued: u32,
}

impl Default for DelayConfig {
    fn default() -> Self {
        DelayConfig {
            max_wait: Duration::from_millis(200),
            max_queued: 100,
        }
    }
}

/// Exact match on one request header (Istio `HTTPMatchRequest.headers` with `exact`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HeaderMatch {
    /// Header name; matched case-insensitively (it is lowercased before lookup).
    pub name: String,
    /// Required value, compared exactly (case-sensitive).
    pub value: String,
}

/// A class of privileged callers with its own reserved share of the service's rate.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    default,
    try_from = "RawPriorityClass"
)]
pub struct PriorityClass {
    /// Unique name, used in stats; `default` is reserved for unmatched requests.
    pub name: String,
    /// Match requests carrying this header (HTTP only). Exactly one matcher must be set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_header: Option<HeaderMatch>,
    /// Match requests from these calling pods (pod ids as the integrator passes them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub match_pods: Vec<String>,
    /// Percent of `requestsPerSecond` reserved for this class, in (0, 100).
    pub share: f64,
}

/// Unvalidated mirror of [`PriorityClass`]; exists only so serde can run validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawPriorityClass {
    name: String,
    match_header: Option<HeaderMatch>,
    match_pods: Vec<String>,
    share: f64,
}

impl Default for RawPriorityClass {
    fn default() -> Self {
        let d = PriorityClass::default();
        RawPriorityClass {
            name: d.name,
            match_header: d.match_header,
            match_pods: d.match_pods,
            share: d.share,
        }
    }
}

impl TryFrom<RawPriorityClass> for PriorityClass {
    type Error = ConfigError;
    fn try_from(raw: RawPriorityClass) -> Result<Self, ConfigError> {
        let class = PriorityClass {
            name: raw.name,
            match_header: raw.match_header,
            match_pods: raw.match_pods,
            share: raw.share,
        };
        class.validate()?;
        Ok(class)
    }
}

/// Local rate limit of one service (see the module docs for semantics of each field).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    default,
    try_from = "RawRateLimitConfig"
)]
pub struct RateLimitConfig {
    pub algorithm: Algorithm,
    /// Rate R: requests (or, for TCP, new connections) per second. Finite and > 0.
    pub requests_per_second: f64,
    /// Token bucket size / leaky bucket queue capacity. `None` means R rounded up (min 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Window length for `fixedWindow` / `slidingWindow`; the limit per window is R * window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// One limiter per calling pod instead of one per service.
    pub per_pod: bool,
    /// Bound on per-pod limiters per class; the least recently used is evicted.
    pub max_tracked_pods: u32,
    pub action: Action,
    pub delay: DelayConfig,
    /// Checked in order; the first match wins. Unmatched requests use the `default` class.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub priority_classes: Vec<PriorityClass>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            algorithm: Algorithm::default(),
            requests_per_second: 100.0,
            burst: None,
            window: Duration::from_secs(1),
            per_pod: false,
            max_tracked_pods: 10_000,
            action: Action::default(),
            delay: DelayConfig::default(),
            priority_classes: Vec::new(),
        }
    }
}

/// Unvalidated mirror of [`RateLimitConfig`]; exists only so serde can run validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawRateLimitConfig {
    algorithm: Algorithm,
    requests_per_second: f64,
    burst: Option<u32>,
    #[serde(with = "humantime_serde")]
    window: Duration,
    per_pod: bool,
    max_tracked_pods: u32,
    action: Action,
    delay: DelayConfig,
    priority_classes: Vec<PriorityClass>,
}

impl Default for RawRateLimitConfig {
    fn default() -> Self {
        let d = RateLimitConfig::default();
        RawRateLimitConfig {
            algorithm: d.algorithm,
            requests_per_second: d.requests_per_second,
            burst: d.burst,
            window: d.window,
            per_pod: d.per_pod,
            max_tracked_pods: d.max_tracked_pods,
            action: d.action,
            delay: d.delay,
            priority_classes: d.priority_classes,
        }
    }
}

impl TryFrom<RawRateLimitConfig> for RateLimitConfig {
    type Error = ConfigError;
    fn try_from(raw: RawRateLimitConfig) -> Result<Self, ConfigError> {
        let cfg = RateLimitConfig {
            algorithm: raw.algorithm,
            requests_per_second: raw.requests_per_second,
            burst: raw.burst,
            window: raw.window,
            per_pod: raw.per_pod,
            max_tracked_pods: raw.max_tracked_pods,
            action: raw.action,
            delay: raw.delay,
            priority_classes: raw.priority_classes,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
