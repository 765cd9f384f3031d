//! Exponential backoff with full jitter between retries.
//!
//! This is Envoy's `JitteredBackOffStrategy` (route `retry_policy.retry_back_off`): the ceiling for
//! retry `n` (0-based) is `min(baseInterval * 2^n, maxInterval)` and the delay is drawn uniformly
//! from `[0, ceiling)`. It is also AWS's "full jitter" variant, which spreads synchronized clients
//! best: after an endpoint blip, every client that saw the failure retries at a different moment
//! instead of all of them hitting the recovering endpoint on the same tick.
//!
//! Envoy's defaults apply: `baseInterval` 25ms, and `maxInterval` 10 × `baseInterval` when omitted.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Envoy's default `base_interval` (runtime key `upstream.base_retry_backoff_ms`).
pub const DEFAULT_BASE_INTERVAL: Duration = Duration::from_millis(25);

/// Envoy caps the interval at this multiple of `baseInterval` when `maxInterval` is omitted.
const DEFAULT_MAX_FACTOR: u32 = 10;

/// How the delay is drawn below the exponential ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Jitter {
    /// Uniform in `[0, ceiling)`: Envoy's behaviour, the production setting.
    #[default]
    Full,
    /// Exactly the ceiling. Deterministic, for tests and debugging only: in production it
    /// re-synchronizes clients that failed together, which is what jitter exists to prevent.
    None,
}

/// Backoff configuration; also the (stateless) strategy itself.
///
/// ```yaml
/// baseInterval: 25ms
/// maxInterval: 250ms   # default: 10 x baseInterval
/// jitter: full         # or `none` (tests only)
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", try_from = "RawBackoff")]
pub struct Backoff {
    /// Ceiling of the first retry's delay; doubles with each further retry. Must be > 0.
    #[serde(with = "humantime_serde")]
    pub base_interval: Duration,
    /// Upper bound of every delay. Must be >= `base_interval`.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Jitter mode.
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_interval: DEFAULT_BASE_INTERVAL,
            max_interval: DEFAULT_BASE_INTERVAL.saturating_mul(DEFAULT_MAX_FACTOR),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry, i.e. the number of retries
    /// already made). Never panics or overflows: huge attempts simply yield `max_interval`.
    pub fn delay(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => {
                // Saturate to u64 nanoseconds (~584 years); an empty range would panic in fastrand.
                let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
                if nanos == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_nanos(rng.u64(..nanos))
                }
            }
        }
    }

    /// The exponential ceiling `min(base_interval * 2^attempt, max_interval)` for retry `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        2u32.checked_pow(attempt)
            .and_then(|factor| self.base_interval.checked_mul(factor))
            .unwrap_or(Duration::MAX)
            .min(self.max_interval)
    }
}

/// Wire form of [`Backoff`]: `maxInterval` is optional so its default can follow `baseInterval`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBackoff {
    #[serde(default = "default_base_interval", with = "humantime_serde")]
    base_interval: Duration,
    #[serde(default, with = "humantime_serde")]
    max_interval: Option<Duration>,
    #[serde(default)]
    jitter: Jitter,
}

fn default_base_interval() -> Duration {
    DEFAULT_BASE_INTERVAL
}

impl TryFrom<RawBackoff> for Backoff {
    type Error = String;

    fn try_from(raw: RawBackoff) -> Result<Self, Self::Error> {
        // Envoy rejects a zero base_interval (proto validation: gt 0); a zero ceiling would also
        // turn the backoff into a hot retry loop.
        if raw.base_interval.is_zero() {
            return Err("baseInterval: must be > 0".into());
        }
        let max_interval = raw
            .max_interval
            .unwrap_or_else(|| raw.base_interval.saturating_mul(DEFAULT_MAX_FACTOR));
        if max_interval < raw.base_interval {
            return Err(format!(
                "maxInterval: must be >= baseInterval ({:?} < {:?})",
                max_interval, raw.base_interval
            ));
        }
        Ok(Self {
            base_interval: raw.base_interval,
            max_interval,
            jitter: raw.jitter,
        })
    }
}
