//! Validation of [`RateLimitConfig`] and [`PriorityClass`], plus the few values derived from them.
//!
//! Error strings start with the (camelCase) field name, e.g. `burst: must be >= 1`; errors found
//! inside a priority class are prefixed with its path (`priorityClasses[1].share: ...`) when the
//! whole config is validated by code, while serde reports the path itself when parsing.

use super::{Action, Algorithm, PriorityClass, RateLimitConfig};
use crate::ratelimit::algorithm::window_limit;

/// A config value the rate limiter refuses; `field` is the camelCase path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// Name of the implicit class of requests that match no priority class.
pub const DEFAULT_CLASS: &str = "default";

impl PriorityClass {
    /// Checks this class on its own (the share sum is checked by [`RateLimitConfig::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        if self.name == DEFAULT_CLASS {
            return Err(ConfigError::new(
                "name",
                "`default` is reserved for unmatched requests",
            ));
        }
        match (&self.match_header, self.match_pods.is_empty()) {
            (Some(_), false) | (None, true) => {
                let reason = "exactly one of matchHeader and matchPods must be set";
                return Err(ConfigError::new("matchHeader", reason));
            }
            (Some(h), true) if h.name.is_empty() => {
                return Err(ConfigError::new("matchHeader.name", "must not be empty"));
            }
            _ => {}
        }
        if self.match_pods.iter().any(String::is_empty) {
            return Err(ConfigError::new("matchPods", "pod ids must not be empty"));
        }
        if !(self.share > 0.0 && self.share < 100.0) {
            return Err(ConfigError::new("share", "must be > 0 and < 100"));
        }
        Ok(())
    }
}

impl RateLimitConfig {
    /// Checks every field; `RateLimiter::new` calls this, so code-built configs are safe too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = self.requests_per_second;
        if !(r.is_finite() && r > 0.0) {
            return Err(ConfigError::new(
                "requestsPerSecond",
                "must be a finite number > 0",
            ));
        }
        if self.burst == Some(0) {
            return Err(ConfigError::new("burst", "must be >= 1"));
        }
        if self.window.is_zero() {
            return Err(ConfigError::new("window", "must be > 0"));
        }
        if self.max_tracked_pods == 0 {
            return Err(ConfigError::new("maxTrackedPods", "must be >= 1"));
        }
        if self.action == Action::Delay {
            if self.delay.max_wait.is_zero() {
                return Err(ConfigError::new(
                    "delay.maxWait",
                    "must be > 0 with action delay",
                ));
            }
            if self.delay.max_queued == 0 {
                return Err(ConfigError::new(
                    "delay.maxQueued",
                    "must be >= 1 with action delay",
                ));
            }
        }
        self.validate_classes()?;
        self.validate_window_limits()
    }

    fn validate_classes(&self) -> Result<(), ConfigError> {
        for (i, class) in self.priority_classes.iter().enumerate() {
            class
                .validate()
                .map_err(|e| e.within(&format!("priorityClasses[{i}]")))?;
            if self.priority_classes[..i]
                .iter()
                .any(|c| c.name == class.name)
            {
                let reason = format!("duplicate class name `{}`", class.name);
                return Err(ConfigError::new(
                    &format!("priorityClasses[{i}].name"),
                    reason,
                ));
            }
        }
        let sum: f64 = self.priority_classes.iter().map(|c| c.share).sum();
        if sum >= 100.0 {
            let reason = format!("shares must sum to less than 100 (got {sum})");
            return Err(ConfigError::new("priorityClasses", reason));
        }
        Ok(())
    }

    /// Window algorithms count whole requests: every class must get at least one per window,
    /// otherwise it would reject everything forever.
    fn validate_window_limits(&self) -> Result<(), ConfigError> {
        if !matches!(
            self.algorithm,
            Algorithm::FixedWindow | Algorithm::SlidingWindow
        ) {
            return Ok(());
        }
        for (name, share) in self.class_shares() {
            let rate = self.requests_per_second * share / 100.0;
            if window_limit(rate, self.window) == 0 {
                let reason = format!(
                    "requestsPerSecond * window gives class `{name}` less than 1 request per window"
                );
                return Err(ConfigError::new("window", reason));
            }
        }
        Ok(())
    }

    /// `(name, percent of R)` of every class in classification order, `default` last.
    pub(crate) fn class_shares(&self) -> impl Iterator<Item = (&str, f64)> {
        let named = self
            .priority_classes
            .iter()
            .map(|c| (c.name.as_str(), c.share));
        named.chain(std::iter::once((DEFAULT_CLASS, self.default_share())))
    }

    /// Percent of R left to unmatched requests: 100 minus the reserved shares.
    pub(crate) fn default_share(&self) -> f64 {
        100.0 - self.priority_classes.iter().map(|c| c.share).sum::<f64>()
    }

    /// `burst`, defaulting to one second's worth of requests: R rounded up, at least 1.
    pub(crate) fn effective_burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.requests_per_second.ceil().clamp(1.0, u32::MAX as f64) as u32)
    }
}
