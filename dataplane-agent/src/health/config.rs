//! Outlier detection config: Istio `DestinationRule.trafficPolicy.outlierDetection`
//! names where Istio has them, Envoy `OutlierDetection` fields otherwise, and
//! `halfOpen`, which neither has. Every field has a default, so `{}` is valid.
//!
//! Single-field rules are checked while the field is deserialized
//! (`config/de.rs`): serde_yaml_ng then prefixes the enclosing section and,
//! for nested fields, the line ("halfOpen: probeRequests: must be >= 1 at
//! line 3 column 3"). Errors from a container's `try_from` carry no location
//! at all, so only the cross-field rule (`maxEjectionTime >=
//! baseEjectionTime`) lives there. Messages name the field themselves, as
//! the library does not.

mod de;

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A config value rejected after parsing; the message starts with the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: &'static str,
}

/// Outlier detection for one service. See the `health` module docs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    try_from = "de::RawOutlierDetectionConfig",
    deny_unknown_fields,
    rename_all = "camelCase",
    default
)]
pub struct OutlierDetectionConfig {
    /// Consecutive HTTP 5xx before ejection; 0 disables. Istio default 5.
    pub consecutive_5xx_errors: u32,
    /// Consecutive 502/503/504 or local failures; 0 disables (Envoy default).
    pub consecutive_gateway_errors: u32,
    /// Consecutive local-origin failures (connect/reset); 0 disables.
    pub consecutive_local_origin_failures: u32,
    /// Period of the success-rate / failure-percentage sweep and of decay.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Ejection time per ejection (multiplied by the backoff count). 5 s by
    /// default (Istio: 30 s): half-open probing decides whether the host
    /// comes back, so a short first ejection costs a still-bad host only a
    /// few probes, while a host that recovered is not kept out for half a
    /// minute (when a second endpoint fails meanwhile, it could not be
    /// ejected while the first is still counted out).
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Cap on one ejection. If unset: max(300s, baseEjectionTime) (Envoy).
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// An ejection happens only if, counting it, at most this % of the
    /// endpoints are ejected or half-open (Envoy: `(active+1)/n <= max`).
    pub max_ejection_percent: f64,
    /// Envoy's `always_eject_one_host`: allow one ejection when none is
    /// active whatever `maxEjectionPercent` says. On by default (Envoy:
    /// off), so small services eject their bad endpoint.
    pub always_eject_one_host: bool,
    /// Success-rate ejection; absent disables it.
    pub success_rate: Option<SuccessRateConfig>,
    /// Failure-percentage ejection; absent disables it.
    pub failure_percentage: Option<FailurePercentageConfig>,
    /// Probing after an ejection (not in Envoy).
    pub half_open: HalfOpenConfig,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        let base_ejection_time = Duration::from_secs(5);
        Self {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            consecutive_local_origin_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection_time,
            max_ejection_time: default_max_ejection_time(base_ejection_time),
            max_ejection_percent: 10.0,
            always_eject_one_host: true,
            success_rate: None,
            failure_percentage: None,
            half_open: HalfOpenConfig::default(),
        }
    }
}

/// Envoy: "If not specified, the default value (300000ms or 300s) or
/// base_ejection_time value is applied, whatever is larger."
fn default_max_ejection_time(base: Duration) -> Duration {
    base.max(Duration::from_secs(300))
}

/// Envoy's success-rate detector (`success_rate_*`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SuccessRateConfig {
    /// Hosts with `requestVolume` needed before anything is ejected.
    pub minimum_hosts: u32,
    /// Requests in the interval for a host to be considered.
    pub request_volume: u64,
    /// Eject if success rate < mean - stdevFactor * stdev (Envoy: 1900/1000).
    #[serde(deserialize_with = "de::stdev_factor")]
    pub stdev_factor: f64,
}

impl Default for SuccessRateConfig {
    fn default() -> Self {
        Self {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        }
    }
}

/// Envoy's failure-percentage detector (`failure_percentage_*`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FailurePercentageConfig {
    /// Eject if the host's failure % in the interval is >= this.
    #[serde(deserialize_with = "de::threshold")]
    pub threshold: f64,
    pub minimum_hosts: u32,
    pub request_volume: u64,
}

impl Default for FailurePercentageConfig {
    fn default() -> Self {
        Self {
            threshold: 85.0,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

/// What happens when an ejection time ends (Envoy restores full traffic).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HalfOpenConfig {
    /// Probes allowed in flight at once (>= 1).
    #[serde(deserialize_with = "de::probe_requests")]
    pub probe_requests: u32,
    /// Consecutive probe successes that restore the host; 0 skips half-open
    /// and restores directly, as Envoy does.
    pub successes_to_close: u32,
    /// A probe slot with no outcome after this long is given back, so a lost
    /// `record` cannot wedge a host in half-open forever.
    #[serde(
        serialize_with = "humantime_serde::serialize",
        deserialize_with = "de::probe_timeout"
    )]
    pub probe_timeout: Duration,
}

impl Default for HalfOpenConfig {
    fn default() -> Self {
        Self {
            probe_requests: 3,
            successes_to_close: 3,
            probe_timeout: Duration::from_secs(30),
        }
    }
}
