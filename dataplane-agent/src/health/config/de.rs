//! Deserialization helpers: per-field validators (located errors) and the
//! raw mirror of [`OutlierDetectionConfig`] for the cross-field rules.

use serde::Deserialize;
use serde::de::{Deserializer, Error};
use std::time::Duration;

use super::{
    ConfigError, FailurePercentageConfig, HalfOpenConfig, OutlierDetectionConfig,
    SuccessRateConfig, default_max_ejection_time,
};

/// Upper bound for every duration: keeps `Instant + duration` far from
/// overflow and catches unit typos ("30000000s").
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn check_duration(d: Duration) -> Result<Duration, &'static str> {
    if d.is_zero() {
        Err("must be > 0")
    } else if d > MAX_DURATION {
        Err("must be <= 365d")
    } else {
        Ok(d)
    }
}

fn check_percent(v: f64) -> Result<f64, &'static str> {
    if !(v.is_finite() && v >= 0.0) {
        Err("must be a number >= 0")
    } else if v > 100.0 {
        Err("must be <= 100")
    } else {
        Ok(v)
    }
}

/// serde_yaml_ng names only the enclosing mapping (and for nested ones the
/// line) of an error raised by a field, so the message names the field.
fn located<T, E: Error>(field: &'static str, r: Result<T, &'static str>) -> Result<T, E> {
    r.map_err(|reason| E::custom(ConfigError { field, reason }))
}

pub(super) fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    located("interval", check_duration(humantime_serde::deserialize(d)?))
}

pub(super) fn base_ejection_time<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    located(
        "baseEjectionTime",
        check_duration(humantime_serde::deserialize(d)?),
    )
}

/// Absent stays `None`: its default depends on `baseEjectionTime`.
pub(super) fn max_ejection_time<'de, D>(d: D) -> Result<Option<Duration>, D::Error>
where
    D: Deserializer<'de>,
{
    let v: Option<Duration> = humantime_serde::deserialize(d)?;
    located("maxEjectionTime", v.map(check_duration).transpose())
}

pub(super) fn probe_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    located(
        "probeTimeout",
        check_duration(humantime_serde::deserialize(d)?),
    )
}

pub(super) fn max_ejection_percent<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    located("maxEjectionPercent", check_percent(f64::deserialize(d)?))
}

pub(super) fn threshold<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    located("threshold", check_percent(f64::deserialize(d)?))
}

pub(super) fn stdev_factor<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    let ok = v.is_finite() && v >= 0.0;
    located(
        "stdevFactor",
        if ok {
            Ok(v)
        } else {
            Err("must be a number >= 0")
        },
    )
}

pub(super) fn probe_requests<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    located(
        "probeRequests",
        if v >= 1 { Ok(v) } else { Err("must be >= 1") },
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawOutlierDetectionConfig {
    consecutive_5xx_errors: u32,
    consecutive_gateway_errors: u32,
    consecutive_local_origin_failures: u32,
    #[serde(deserialize_with = "interval")]
    interval: Duration,
    #[serde(deserialize_with = "base_ejection_time")]
    base_ejection_time: Duration,
    #[serde(deserialize_with = "max_ejection_time")]
    max_ejection_time: Option<Duration>,
    #[serde(deserialize_with = "max_ejection_percent")]
    max_ejection_percent: f64,
    always_eject_one_host: bool,
    success_rate: Option<SuccessRateConfig>,
    failure_percentage: Option<FailurePercentageConfig>,
    half_open: HalfOpenConfig,
}

impl Default for RawOutlierDetectionConfig {
    fn default() -> Self {
        let d = OutlierDetectionConfig::default();
        Self {
            consecutive_5xx_errors: d.consecutive_5xx_errors,
            consecutive_gateway_errors: d.consecutive_gateway_errors,
            consecutive_local_origin_failures: d.consecutive_local_origin_failures,
            interval: d.interval,
            base_ejection_time: d.base_ejection_time,
            max_ejection_time: None,
            max_ejection_percent: d.max_ejection_percent,
            always_eject_one_host: d.always_eject_one_host,
            success_rate: d.success_rate,
            failure_percentage: d.failure_percentage,
            half_open: d.half_open,
        }
    }
}

impl TryFrom<RawOutlierDetectionConfig> for OutlierDetectionConfig {
    type Error = ConfigError;

    fn try_from(r: RawOutlierDetectionConfig) -> Result<Self, ConfigError> {
        let max_ejection_time = r
            .max_ejection_time
            .unwrap_or_else(|| default_max_ejection_time(r.base_ejection_time));
        if max_ejection_time < r.base_ejection_time {
            return Err(ConfigError {
                field: "maxEjectionTime",
                reason: "must be >= baseEjectionTime",
            });
        }
        Ok(Self {
            consecutive_5xx_errors: r.consecutive_5xx_errors,
            consecutive_gateway_errors: r.consecutive_gateway_errors,
            consecutive_local_origin_failures: r.consecutive_local_origin_failures,
            interval: r.interval,
            base_ejection_time: r.base_ejection_time,
            max_ejection_time,
            max_ejection_percent: r.max_ejection_percent,
            always_eject_one_host: r.always_eject_one_host,
            success_rate: r.success_rate,
            failure_percentage: r.failure_percentage,
            half_open: r.half_open,
        })
    }
}
