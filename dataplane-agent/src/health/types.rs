//! Vocabulary shared by the detector and its callers: what happened to a
//! request ([`Outcome`]), what the detector decided ([`Event`], [`Reason`],
//! [`Admission`]), and what an admin dump shows ([`HostState`], [`Stats`]).

use std::time::Instant;

/// Why a request to an endpoint failed before any response arrived, as seen
/// by the proxy itself ("local origin" in Envoy's terms). These are the only
/// signals a TCP (opaque) service produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFailure {
    ConnectRefused,
    ConnectTimeout,
    /// Connection reset (or closed) before a complete response.
    Reset,
    /// No response within the per-try or request timeout.
    Timeout,
    /// Any other proxy-side failure attributable to the endpoint.
    Other,
}

/// The result of one request (or one TCP connection) to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Completed without error; for HTTP equivalent to a non-5xx status.
    Success,
    /// An HTTP response with this status code.
    Status(u16),
    /// No response: the proxy itself saw the failure.
    LocalFailure(LocalFailure),
}

impl Outcome {
    /// Counted by `consecutive5xxErrors`: an HTTP 5xx (Envoy `is5xx`).
    pub fn is_5xx(self) -> bool {
        matches!(self, Outcome::Status(500..=599))
    }

    /// Counted by `consecutiveGatewayErrors`: 502/503/504 and local failures
    /// (Istio: "connect timeouts and connection error/failure events qualify
    /// as a gateway error"; Envoy maps them to 503/504 when not split).
    pub fn is_gateway_error(self) -> bool {
        matches!(self, Outcome::Status(502..=504) | Outcome::LocalFailure(_))
    }

    /// Counted by `consecutiveLocalOriginFailures`.
    pub fn is_local_failure(self) -> bool {
        matches!(self, Outcome::LocalFailure(_))
    }

    /// A failure for the success-rate and failure-percentage detectors: any
    /// 5xx or local failure (Envoy's non-split external-origin monitor, where
    /// local failures are mapped to 5xx codes).
    pub fn is_failure(self) -> bool {
        self.is_5xx() || self.is_local_failure()
    }
}

/// Why an endpoint was (or would have been) ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Consecutive5xx,
    ConsecutiveGatewayErrors,
    ConsecutiveLocalOriginFailures,
    SuccessRate,
    FailurePercentage,
    /// A half-open probe failed (no Envoy equivalent).
    ProbeFailed,
}

impl Reason {
    /// Every reason, in `as_index` order (for iterating metrics).
    pub const ALL: [Reason; 6] = [
        Reason::Consecutive5xx,
        Reason::ConsecutiveGatewayErrors,
        Reason::ConsecutiveLocalOriginFailures,
        Reason::SuccessRate,
        Reason::FailurePercentage,
        Reason::ProbeFailed,
    ];

    /// Stable snake_case name for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Consecutive5xx => "consecutive_5xx",
            Reason::ConsecutiveGatewayErrors => "consecutive_gateway_errors",
            Reason::ConsecutiveLocalOriginFailures => "consecutive_local_origin_failures",
            Reason::SuccessRate => "success_rate",
            Reason::FailurePercentage => "failure_percentage",
            Reason::ProbeFailed => "probe_failed",
        }
    }

    fn as_index(self) -> usize {
        self as usize
    }
}

/// A state change worth logging or exporting, returned by `record`/`tick`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `times` is the backoff multiplier used for this ejection.
    Ejected {
        idx: usize,
        reason: Reason,
        until: Instant,
        times: u32,
    },
    /// The ejection time elapsed; the endpoint now takes limited probes.
    HalfOpen { idx: usize },
    /// The endpoint is back to full traffic.
    Restored { idx: usize },
    /// An ejection was detected but `maxEjectionPercent` forbade it.
    EjectionSkipped { idx: usize, reason: Reason },
}

impl Event {
    /// The endpoint the event is about.
    pub fn idx(&self) -> usize {
        match *self {
            Event::Ejected { idx, .. }
            | Event::HalfOpen { idx }
            | Event::Restored { idx }
            | Event::EjectionSkipped { idx, .. } => idx,
        }
    }
}

/// Whether the balancer may send a request to an endpoint right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Healthy: send normally.
    Yes,
    /// Half-open: send, and a probe slot is now held until `record` (or the
    /// probe timeout) releases it.
    Probe,
    /// Ejected, or half-open with every probe slot taken: pick another.
    No,
}

/// Per-endpoint state for an admin dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Healthy,
    Ejected {
        until: Instant,
        times: u32,
    },
    HalfOpen {
        probes_in_flight: u32,
        successes: u32,
    },
}

/// Monotonic counters of one detector (one service), for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    ejections: [u64; Reason::ALL.len()],
    skipped: [u64; Reason::ALL.len()],
    restorations: u64,
    half_opens: u64,
    probe_timeouts: u64,
}

impl Stats {
    /// Ejections enforced for `reason`.
    pub fn ejections(&self, reason: Reason) -> u64 {
        self.ejections[reason.as_index()]
    }

    /// Ejections enforced, all reasons.
    pub fn ejections_total(&self) -> u64 {
        self.ejections.iter().fold(0, |a, b| a.saturating_add(*b))
    }

    /// Ejections detected for `reason` but skipped by `maxEjectionPercent`.
    pub fn skipped(&self, reason: Reason) -> u64 {
        self.skipped[reason.as_index()]
    }

    /// Envoy's `ejections_overflow`: all skipped ejections.
    pub fn ejections_overflow(&self) -> u64 {
        self.skipped.iter().fold(0, |a, b| a.saturating_add(*b))
    }

    /// Endpoints returned to full traffic.
    pub fn restorations(&self) -> u64 {
        self.restorations
    }

    /// Ejections that ended and entered half-open.
    pub fn half_opens(&self) -> u64 {
        self.half_opens
    }

    /// Probe slots reclaimed because no outcome arrived within `probeTimeout`.
    pub fn probe_timeouts(&self) -> u64 {
        self.probe_timeouts
    }

    pub(crate) fn on_ejected(&mut self, reason: Reason) {
        let c = &mut self.ejections[reason.as_index()];
        *c = c.saturating_add(1);
    }

    pub(crate) fn on_skipped(&mut self, reason: Reason) {
        let c = &mut self.skipped[reason.as_index()];
        *c = c.saturating_add(1);
    }

    pub(crate) fn on_restored(&mut self) {
        self.restorations = self.restorations.saturating_add(1);
    }

    pub(crate) fn on_half_open(&mut self) {
        self.half_opens = self.half_opens.saturating_add(1);
    }

    pub(crate) fn on_probes_reclaimed(&mut self, n: u32) {
        self.probe_timeouts = self.probe_timeouts.saturating_add(u64::from(n));
    }
}
