//! Circuit breakers: hard concurrency limits per service (Istio `connectionPool`, Envoy
//! `cluster.circuit_breakers` thresholds).
//!
//! Unlike outlier detection, these do not judge endpoints; they cap how much work the proxy lets
//! pile up for one service, so a slow service cannot exhaust the node proxy's memory or
//! sockets and starve every other service on the node. When a limit is reached the request fails
//! immediately (Envoy answers 503 with response flag `UO` and `x-envoy-overloaded: true`).
//!
//! Defaults are Istio's: every limit 2^32-1, i.e. off until an operator sets one. A node proxy
//! serves every pod of the node, so a static per-service limit sized for one sidecar would throttle
//! a whole node; retry storms are bounded by the retry budget instead (Envoy's own advice: budgets
//! over a static `max_retries`, which at Envoy's default of 3 refuses most retries under load,
//! since each retry holds its slot through its backoff). Zero: `maxConnections` and `maxRequests`
//! reject 0, because it would black-hole the service and is usually Istio's "0 = unset" misread;
//! `maxPendingRequests: 0` (never queue, fail fast) and `maxRetries: 0` (no retries at all) are
//! valid, as in Envoy.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Circuit-breaker limits of one service.
///
/// ```yaml
/// maxConnections: 4294967295      # TCP connections to the service's endpoints
/// maxPendingRequests: 4294967295  # requests waiting in a rate-limit delay queue
/// maxRequests: 4294967295         # requests in flight
/// maxRetries: 4294967295          # retries in flight
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    try_from = "RawConnectionPool"
)]
pub struct ConnectionPool {
    /// Envoy `max_connections`; for TCP services also the downstream connections proxied.
    pub max_connections: u32,
    /// Envoy `max_pending_requests` (Istio `http1MaxPendingRequests`).
    pub max_pending_requests: u32,
    /// Envoy `max_requests` (Istio `http2MaxRequests`).
    pub max_requests: u32,
    /// Envoy `max_retries`: retries outstanding at once, across all requests.
    pub max_retries: u32,
}

/// Istio's default for every limit (2^32-1): no limit.
pub const UNLIMITED: u32 = u32::MAX;

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: UNLIMITED,
            max_pending_requests: UNLIMITED,
            max_requests: UNLIMITED,
            max_retries: UNLIMITED,
        }
    }
}

impl ConnectionPool {
    /// The configured maximum for `limit`.
    pub fn max(&self, limit: Limit) -> u32 {
        match limit {
            Limit::Connections => self.max_connections,
            Limit::PendingRequests => self.max_pending_requests,
            Limit::Requests => self.max_requests,
            Limit::Retries => self.max_retries,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawConnectionPool {
    max_connections: u32,
    max_pending_requests: u32,
    max_requests: u32,
    max_retries: u32,
}

impl Default for RawConnectionPool {
    fn default() -> Self {
        let d = ConnectionPool::default();
        Self {
            max_connections: d.max_connections,
            max_pending_requests: d.max_pending_requests,
            max_requests: d.max_requests,
            max_retries: d.max_retries,
        }
    }
}

impl TryFrom<RawConnectionPool> for ConnectionPool {
    type Error = String;

    fn try_from(raw: RawConnectionPool) -> Result<Self, Self::Error> {
        const HINT: &str =
            "must be >= 1 (0 would reject all traffic; omit the field for the default)";
        if raw.max_connections == 0 {
            return Err(format!("maxConnections: {HINT}"));
        }
        if raw.max_requests == 0 {
            return Err(format!("maxRequests: {HINT}"));
        }
        Ok(Self {
            max_connections: raw.max_connections,
            max_pending_requests: raw.max_pending_requests,
            max_requests: raw.max_requests,
            max_retries: raw.max_retries,
        })
    }
}

/// One of the four circuit-breaker limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

impl Limit {
    /// All limits, in index order (for exporting gauges).
    pub const ALL: [Limit; 4] = [
        Limit::Connections,
        Limit::PendingRequests,
        Limit::Requests,
        Limit::Retries,
    ];

    /// Snake-case name for metrics labels and logs, after Envoy's threshold field names.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::PendingRequests => "max_pending_requests",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }

    /// Value for the response header that names the tripped limit: the `ConnectionPool` YAML
    /// field, so an operator reading a 503 knows exactly which knob to raise.
    pub fn header_value(self) -> &'static str {
        match self {
            Limit::Connections => "maxConnections",
            Limit::PendingRequests => "maxPendingRequests",
            Limit::Requests => "maxRequests",
            Limit::Retries => "maxRetries",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limit was reached; the caller must fail the connection/request (or skip the retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open: {limit} reached")]
pub struct Tripped {
    pub limit: Limit,
}

/// Live counters of one service's circuit breakers. Use as `Arc<CircuitBreaker>`: permits hold
/// an `Arc` so they can move into spawned tasks and release on drop wherever they end.
#[derive(Debug)]
pub struct CircuitBreaker {
    max: [AtomicU32; 4],
    in_use: [AtomicU32; 4],
    trips: [AtomicU64; 4],
}

// All atomics here use Relaxed: each counter is self-contained (no other memory is published
// through it), and read-modify-write operations on one location are totally ordered regardless,
// which is all the "never exceed the limit" guarantee needs.
impl CircuitBreaker {
    /// Creates breakers with all gauges at zero.
    pub fn new(pool: &ConnectionPool) -> Self {
        Self {
            max: Limit::ALL.map(|l| AtomicU32::new(pool.max(l))),
            in_use: Default::default(),
            trips: Default::default(),
        }
    }

    /// Applies new limits without losing the gauges of outstanding permits. Lowering a limit
    /// below its gauge only blocks new acquisitions until enough permits are dropped.
    pub fn update(&self, pool: &ConnectionPool) {
        for limit in Limit::ALL {
            self.max[limit.index()].store(pool.max(limit), Ordering::Relaxed);
        }
    }

    /// Takes one unit of `limit`, or counts a trip and fails if the limit is reached.
    /// Compare-and-swap: concurrent callers can never push the gauge above the limit.
    pub fn try_acquire(self: &Arc<Self>, limit: Limit) -> Result<Permit, Tripped> {
        let i = limit.index();
        let max = self.max[i].load(Ordering::Relaxed);
        let acquired = self.in_use[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then(|| n.saturating_add(1))
        });
        match acquired {
            Ok(_) => Ok(Permit {
                breaker: Arc::clone(self),
                limit,
            }),
            Err(_) => {
                self.trips[i].fetch_add(1, Ordering::Relaxed);
                Err(Tripped { limit })
            }
        }
    }

    /// Units of `limit` currently held (Envoy's `cx_open`-style gauge is `in_use == max`).
    pub fn in_use(&self, limit: Limit) -> u32 {
        self.in_use[limit.index()].load(Ordering::Relaxed)
    }

    /// Units still available (Envoy's `remaining_*` gauges).
    pub fn remaining(&self, limit: Limit) -> u32 {
        self.max(limit).saturating_sub(self.in_use(limit))
    }

    /// The current maximum for `limit`.
    pub fn max(&self, limit: Limit) -> u32 {
        self.max[limit.index()].load(Ordering::Relaxed)
    }

    /// How many acquisitions of `limit` were refused since creation (Envoy's `upstream_cx_overflow`,
    /// `upstream_rq_pending_overflow`, `upstream_rq_retry_overflow`...).
    pub fn trips(&self, limit: Limit) -> u64 {
        self.trips[limit.index()].load(Ordering::Relaxed)
    }
}

/// One held unit of a limit; released when dropped. `Send`, so it can live in a spawned task
/// (e.g. a connection's permit lives as long as the connection).
#[derive(Debug)]
#[must_use = "dropping the permit releases the slot immediately"]
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    limit: Limit,
}

impl Permit {
    /// Which limit this permit counts against.
    pub fn limit(&self) -> Limit {
        self.limit
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Each permit matches exactly one successful increment, so this cannot underflow.
        self.breaker.in_use[self.limit.index()].fetch_sub(1, Ordering::Relaxed);
    }
}
