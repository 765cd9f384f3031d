//! The nested sections of [`super::LoadBalancerConfig`]: hash source, locality, peak EWMA.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The request attribute whose hash `ringHash` / `maglev` consume (Istio `consistentHash`).
/// The balancer never reads it: the integrator computes `hash_key(..)` of that attribute.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(
    try_from = "RawHashConfig",
    deny_unknown_fields,
    rename_all = "camelCase"
)]
pub struct HashConfig {
    /// Request header name (case-insensitive, as HTTP header names are).
    pub header: Option<String>,
    /// Hash the downstream source IP address.
    pub source_ip: bool,
}

/// The single configured hash source, see [`HashConfig::source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashSource<'a> {
    Header(&'a str),
    SourceIp,
}

impl HashConfig {
    /// The configured source, `None` when hashing is not configured.
    pub fn source(&self) -> Option<HashSource<'_>> {
        match (&self.header, self.source_ip) {
            (Some(h), _) => Some(HashSource::Header(h)),
            (None, true) => Some(HashSource::SourceIp),
            (None, false) => None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawHashConfig {
    header: Option<String>,
    source_ip: bool,
}

impl TryFrom<RawHashConfig> for HashConfig {
    type Error = String;

    fn try_from(r: RawHashConfig) -> Result<Self, String> {
        if let Some(h) = &r.header {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if h.is_empty() || !h.bytes().all(token) {
                return Err("header: must be a non-empty HTTP header name".into());
            }
            if r.source_ip {
                return Err("header: mutually exclusive with sourceIp".into());
            }
        }
        Ok(Self {
            header: r.header,
            source_ip: r.source_ip,
        })
    }
}

/// Locality-aware priority levels (Istio `localityLbSetting`, Envoy priority load).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    try_from = "RawLocalityConfig",
    deny_unknown_fields,
    rename_all = "camelCase"
)]
pub struct LocalityConfig {
    /// Off by default: without outlier detection Istio does not fail over by locality either,
    /// and pinning traffic to the caller's zone is a capacity decision the operator must make.
    pub enabled: bool,
    /// Percent (Envoy `overprovisioning_factor` / 100, default 140 = 1.4). A priority level
    /// keeps all its traffic while `healthy% * factor / 100 >= 100`. Not capped at 100.
    pub overprovisioning_factor: f64,
}

impl Default for LocalityConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            overprovisioning_factor: 140.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawLocalityConfig {
    enabled: bool,
    overprovisioning_factor: f64,
}

impl Default for RawLocalityConfig {
    fn default() -> Self {
        let d = LocalityConfig::default();
        Self {
            enabled: d.enabled,
            overprovisioning_factor: d.overprovisioning_factor,
        }
    }
}

impl TryFrom<RawLocalityConfig> for LocalityConfig {
    type Error = String;

    fn try_from(r: RawLocalityConfig) -> Result<Self, String> {
        let f = r.overprovisioning_factor;
        if !f.is_finite() || f <= 0.0 || f > 10_000.0 {
            return Err("overprovisioningFactor: must be a percentage > 0 and <= 10000".into());
        }
        Ok(Self {
            enabled: r.enabled,
            overprovisioning_factor: f,
        })
    }
}

/// Peak-EWMA tuning (linkerd2-proxy defaults: decay 10s, default RTT 30ms).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    try_from = "RawPeakEwmaConfig",
    deny_unknown_fields,
    rename_all = "camelCase"
)]
pub struct PeakEwmaConfig {
    /// Time constant of the exponential decay.
    #[serde(with = "humantime_serde")]
    pub decay: Duration,
    /// Latency assumed for an endpoint with no sample yet: low enough that new endpoints get
    /// traffic, high enough that they do not take everything.
    #[serde(with = "humantime_serde")]
    pub default_rtt: Duration,
}

impl Default for PeakEwmaConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawPeakEwmaConfig {
    #[serde(with = "humantime_serde")]
    decay: Duration,
    #[serde(with = "humantime_serde")]
    default_rtt: Duration,
}

impl Default for RawPeakEwmaConfig {
    fn default() -> Self {
        let d = PeakEwmaConfig::default();
        Self {
            decay: d.decay,
            default_rtt: d.default_rtt,
        }
    }
}

impl TryFrom<RawPeakEwmaConfig> for PeakEwmaConfig {
    type Error = String;

    fn try_from(r: RawPeakEwmaConfig) -> Result<Self, String> {
        if r.decay.is_zero() {
            return Err("decay: must be > 0".into());
        }
        Ok(Self {
            decay: r.decay,
            default_rtt: r.default_rtt,
        })
    }
}
