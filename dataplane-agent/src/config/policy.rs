//! Per-service traffic policy, with Istio DestinationRule names where they
//! exist. Each policy's own settings live with the policy's code.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::balance::LoadBalancerConfig;
use crate::health::OutlierDetectionConfig;
use crate::ratelimit::RateLimitConfig;
use crate::resilience::{ConnectionPool, RetryPolicy};

/// Everything the proxy applies to one service's traffic.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: LoadBalancerConfig,
    /// On with its defaults when absent (Linkerd's failure accrual is on by
    /// default too; Istio's is off); `outlierDetection: null` turns it off.
    #[serde(default = "default_outlier_detection")]
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// HTTP retries (`attempts: 0` is fail-fast).
    #[serde(default)]
    pub retries: RetryPolicy,
    /// Circuit breakers.
    #[serde(default)]
    pub connection_pool: ConnectionPool,
    /// Local rate limit: requests per second for HTTP, new connections per
    /// second for TCP. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Served instead of a bare 503 when no endpoint is usable or a
    /// circuit breaker trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        Self {
            load_balancer: LoadBalancerConfig::default(),
            outlier_detection: default_outlier_detection(),
            retries: RetryPolicy::default(),
            connection_pool: ConnectionPool::default(),
            rate_limit: None,
            timeouts: Timeouts::default(),
            fallback: None,
        }
    }
}

fn default_outlier_detection() -> Option<OutlierDetectionConfig> {
    Some(OutlierDetectionConfig::default())
}

impl TrafficPolicy {
    /// The timeout of one try: `retries.perTryTimeout` when set (`0s`:
    /// none), otherwise the request timeout shared by the first try and
    /// every retry (`request / (attempts + 1)`), so a hanging endpoint is
    /// left in time for the retries to run before the request times out.
    /// The proxy applies the derived one only to requests it may retry.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        match self.retries.per_try_timeout {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None if self.timeouts.request.is_zero() => None,
            None => Some(self.timeouts.request / self.retries.attempts.saturating_add(1)),
        }
    }
}

/// The default `idle` timeout (also what sidecar mode's inbound TCP
/// connections get, having no service of their own).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// Timeouts; `request`, `idle` and `headerRead` of zero disable them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    try_from = "RawTimeouts"
)]
pub struct Timeouts {
    /// To connect to one endpoint; the next one is tried after it.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// A whole HTTP request, retries included, until the response headers.
    #[serde(with = "humantime_serde")]
    pub request: Duration,
    /// An HTTP connection (either side) with no request in flight; zero
    /// disables it.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// From the first byte of a request to the end of its headers (against
    /// slowloris clients); zero disables it.
    #[serde(with = "humantime_serde")]
    pub header_read: Duration,
    /// `protocol: auto`: how long to wait for the client's first bytes
    /// before treating the connection as opaque TCP.
    #[serde(with = "humantime_serde")]
    pub protocol_detection: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(15),
            idle: DEFAULT_IDLE,
            header_read: Duration::from_secs(10),
            protocol_detection: Duration::from_millis(100),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTimeouts {
    #[serde(default, with = "humantime_serde")]
    connect: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    request: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    header_read: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    protocol_detection: Option<Duration>,
}

const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

impl TryFrom<RawTimeouts> for Timeouts {
    type Error = String;

    fn try_from(raw: RawTimeouts) -> Result<Self, String> {
        let d = Timeouts::default();
        let t = Timeouts {
            connect: raw.connect.unwrap_or(d.connect),
            request: raw.request.unwrap_or(d.request),
            idle: raw.idle.unwrap_or(d.idle),
            header_read: raw.header_read.unwrap_or(d.header_read),
            protocol_detection: raw.protocol_detection.unwrap_or(d.protocol_detection),
        };
        if t.connect.is_zero() || t.connect > MAX_CONNECT_TIMEOUT {
            return Err(format!(
                "timeouts.connect: {:?} is outside (0s, {}s]",
                t.connect,
                MAX_CONNECT_TIMEOUT.as_secs()
            ));
        }
        if t.protocol_detection.is_zero() || t.protocol_detection > MAX_CONNECT_TIMEOUT {
            return Err("timeouts.protocolDetection: must be in (0s, 60s]".into());
        }
        Ok(t)
    }
}

/// A configured response served instead of a bare 503.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    try_from = "RawFallback"
)]
pub struct Fallback {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFallback {
    #[serde(default = "default_fallback_status")]
    status: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: String,
}

fn default_fallback_status() -> u16 {
    503
}

impl TryFrom<RawFallback> for Fallback {
    type Error = String;

    fn try_from(raw: RawFallback) -> Result<Self, String> {
        if http::StatusCode::from_u16(raw.status).is_err() || raw.status < 200 {
            return Err(format!("status: {} is not a final HTTP status", raw.status));
        }
        for (name, value) in &raw.headers {
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers: {name:?} is not a valid header name"))?;
            http::HeaderValue::from_str(value)
                .map_err(|_| format!("headers.{name}: not a valid header value"))?;
        }
        Ok(Self {
            status: raw.status,
            headers: raw.headers,
            body: raw.body,
        })
    }
}
