//! Retry policy: which failures are retried, how often, and how long each try may take.
//!
//! `retryOn` names and meanings are Envoy's `x-envoy-retry-on` / `x-envoy-retry-grpc-on` values
//! (Istio merges both into one `retryOn` list); matching follows Envoy's `RetryStateImpl`
//! (`wouldRetryFromHeaders` / `wouldRetryFromReset`), see [`RetryOn`].
//!
//! Defaults start from Istio's mesh-wide default retry policy (`attempts: 2`, `retryOn:
//! connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`) and add `reset`
//! and `gateway-error`, so that one failing endpoint of several (answering 502/503/504, resetting,
//! killed, or timing out behind a `perTryTimeout`) costs the caller nothing. That is safe because
//! of the idempotency rule below: a failure after which the upstream may have acted on the request
//! is retried only for idempotent methods (RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and
//! for gRPC status conditions (gRPC's own retry rules); a POST or PATCH is retried only when it
//! surely was not processed (connect failure, HTTP/2 `REFUSED_STREAM`), unless
//! `retryNonIdempotent: true`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::budget::BudgetConfig;

mod state;

pub use state::{GiveUpReason, RetryDecision, RetryState};

/// How one attempt failed, as observed by the integrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The TCP/TLS connection to the endpoint could not be established (refused, connect
    /// timeout, TLS handshake failure). The request was never sent.
    ConnectFailure,
    /// HTTP/2 stream reset with `REFUSED_STREAM`: the upstream guarantees it did not process it.
    RefusedStream,
    /// Disconnect or stream reset after the request was (possibly) sent.
    Reset,
    /// The per-try timeout fired (Envoy: "read timeout", handled as a local reset).
    Timeout,
    /// A complete response with this HTTP status.
    Status(u16),
    /// A gRPC trailers-only response with this `grpc-status` code. Like Envoy, only statuses
    /// seen before any response body is forwarded can be retried; that is the integrator's call.
    GrpcStatus(u32),
}

impl Failure {
    /// True for failures without a response: Envoy treats every stream reset (including connect
    /// failures and per-try timeouts) as an implicit 5xx / gateway error.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Failure::ConnectFailure | Failure::RefusedStream | Failure::Reset | Failure::Timeout
        )
    }

    /// True when the upstream surely did not act on the request, so that retrying is safe
    /// whatever the method.
    pub fn is_unprocessed(&self) -> bool {
        matches!(self, Failure::ConnectFailure | Failure::RefusedStream)
    }
}

/// One `retryOn` condition (Envoy router filter, `x-envoy-retry-on` and `x-envoy-retry-grpc-on`).
///
/// Envoy's `envoy-ratelimited`, `retriable-headers`, `reset-before-request` and
/// `http3-post-connect-failure` need inputs this module does not get and are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum RetryOn {
    /// Any 5xx status, and any failure without a response (all of [`Failure::is_transport`]).
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 or 504, and any failure without a response.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// Any failure without a response: disconnect, reset, connect failure, per-try timeout.
    #[serde(rename = "reset")]
    Reset,
    /// Only [`Failure::ConnectFailure`].
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// Only [`Failure::RefusedStream`].
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// Status 409 Conflict (Envoy's only "retriable 4xx").
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// Any status listed in `retriableStatusCodes`; without this condition the list is ignored.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
    /// gRPC status 1 CANCELLED.
    #[serde(rename = "cancelled")]
    Cancelled,
    /// gRPC status 4 DEADLINE_EXCEEDED.
    #[serde(rename = "deadline-exceeded")]
    DeadlineExceeded,
    /// gRPC status 8 RESOURCE_EXHAUSTED.
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
    /// gRPC status 13 INTERNAL.
    #[serde(rename = "internal")]
    Internal,
    /// gRPC status 14 UNAVAILABLE.
    #[serde(rename = "unavailable")]
    Unavailable,
}

impl RetryOn {
    /// Whether this condition covers `failure`; `codes` is `retriableStatusCodes`.
    pub fn matches(self, failure: &Failure, codes: &[u16]) -> bool {
        use Failure::{GrpcStatus, Status};
        match self {
            RetryOn::FiveXx => failure.is_transport() || matches!(failure, Status(500..=599)),
            RetryOn::GatewayError => failure.is_transport() || matches!(failure, Status(502..=504)),
            RetryOn::Reset => failure.is_transport(),
            RetryOn::ConnectFailure => *failure == Failure::ConnectFailure,
            RetryOn::RefusedStream => *failure == Failure::RefusedStream,
            RetryOn::Retriable4xx => *failure == Status(409),
            RetryOn::RetriableStatusCodes => matches!(failure, Status(s) if codes.contains(s)),
            RetryOn::Cancelled => *failure == GrpcStatus(1),
            RetryOn::DeadlineExceeded => *failure == GrpcStatus(4),
            RetryOn::ResourceExhausted => *failure == GrpcStatus(8),
            RetryOn::Internal => *failure == GrpcStatus(13),
            RetryOn::Unavailable => *failure == GrpcStatus(14),
        }
    }
}

/// Retry policy of a service (Istio `HTTPRetry`, Envoy `RetryPolicy`).
///
/// ```yaml
/// attempts: 2            # retries after the first try; 0 = fail fast
/// perTryTimeout: 500ms   # absent: the request timeout / (attempts + 1); 0s: none
/// retryOn: [connect-failure, refused-stream, reset, gateway-error]
/// retriableStatusCodes: [409]
/// retryNonIdempotent: false
/// backoff: {baseInterval: 25ms, maxInterval: 250ms}
/// budget: {retryPercent: 20, minRetriesPerSecond: 10, window: 10s}
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    try_from = "RawRetryPolicy"
)]
pub struct RetryPolicy {
    /// Maximum retries per request after the first try (Envoy `num_retries`).
    pub attempts: u32,
    /// Timeout of each try, including the first (Envoy `per_try_timeout`). `None`: derived from
    /// the request timeout (`TrafficPolicy::per_try_timeout`); zero: no per-try timeout.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Retry conditions; a failure is retriable if any matches.
    pub retry_on: Vec<RetryOn>,
    /// Statuses retried by `retriable-status-codes` (100..=599).
    pub retriable_status_codes: Vec<u16>,
    /// Also retry non-idempotent requests (POST, PATCH, ...) after failures where the upstream
    /// may have processed them. Off by default: a retried payment is worse than a failed one.
    pub retry_non_idempotent: bool,
    /// Delay between tries.
    pub backoff: Backoff,
    /// The service-wide retry budget this policy's retries draw from.
    pub budget: BudgetConfig,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Reset,
                RetryOn::GatewayError,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            retriable_status_codes: Vec::new(),
            retry_non_idempotent: false,
            backoff: Backoff::default(),
            budget: BudgetConfig::default(),
        }
    }
}

impl RetryPolicy {
    /// Whether `failure` matches any `retryOn` condition. Allocation-free.
    pub fn is_retriable(&self, failure: &Failure) -> bool {
        self.retry_on
            .iter()
            .any(|c| c.matches(failure, &self.retriable_status_codes))
    }

    /// Classifies a response status: `Some` if this policy would retry it, so it must be fed to
    /// [`RetryState::next`]; `None` means the response is final and is forwarded as is.
    pub fn status_failure(&self, status: u16) -> Option<Failure> {
        Some(Failure::Status(status)).filter(|f| self.is_retriable(f))
    }

    /// Same as [`status_failure`](Self::status_failure) for a trailers-only `grpc-status`.
    pub fn grpc_failure(&self, grpc_status: u32) -> Option<Failure> {
        Some(Failure::GrpcStatus(grpc_status)).filter(|f| self.is_retriable(f))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRetryPolicy {
    #[serde(default = "default_attempts")]
    attempts: u32,
    #[serde(default, with = "humantime_serde")]
    per_try_timeout: Option<Duration>,
    #[serde(default = "default_retry_on")]
    retry_on: Vec<RetryOn>,
    #[serde(default)]
    retriable_status_codes: Vec<u16>,
    #[serde(default)]
    retry_non_idempotent: bool,
    #[serde(default)]
    backoff: Backoff,
    #[serde(default)]
    budget: BudgetConfig,
}

fn default_attempts() -> u32 {
    RetryPolicy::default().attempts
}

fn default_retry_on() -> Vec<RetryOn> {
    RetryPolicy::default().retry_on
}

impl TryFrom<RawRetryPolicy> for RetryPolicy {
    type Error = String;

    fn try_from(raw: RawRetryPolicy) -> Result<Self, Self::Error> {
        if let Some(bad) = raw
            .retriable_status_codes
            .iter()
            .find(|c| !(100..=599).contains(*c))
        {
            return Err(format!(
                "retriableStatusCodes: {bad} is not an HTTP status (100..=599)"
            ));
        }
        Ok(Self {
            attempts: raw.attempts,
            per_try_timeout: raw.per_try_timeout,
            retry_on: raw.retry_on,
            retriable_status_codes: raw.retriable_status_codes,
            retry_non_idempotent: raw.retry_non_idempotent,
            backoff: raw.backoff,
            budget: raw.budget,
        })
    }
}
