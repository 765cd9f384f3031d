//! Per-endpoint failure counters: the three consecutive-error detectors and
//! the interval counters read by the success-rate / failure-% sweep.

use super::config::OutlierDetectionConfig;
use super::types::{Outcome, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counters {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Requests and failures since the last sweep.
    requests: u64,
    failures: u64,
}

impl Counters {
    /// Counts one outcome of a healthy host and returns the detector that
    /// tripped, if any. Reset rules (module docs): 5xx resets on any non-5xx
    /// *response* (a local failure leaves it alone), gateway on anything that
    /// is not a gateway error (Envoy resets it on a 500 too), local-origin
    /// on any response or success.
    pub(crate) fn observe(&mut self, o: Outcome, cfg: &OutlierDetectionConfig) -> Option<Reason> {
        self.requests = self.requests.saturating_add(1);
        if o.is_failure() {
            self.failures = self.failures.saturating_add(1);
        }
        if o.is_5xx() {
            self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
        } else if !o.is_local_failure() {
            self.consecutive_5xx = 0;
        }
        bump(&mut self.consecutive_gateway, o.is_gateway_error());
        bump(&mut self.consecutive_local, o.is_local_failure());

        // Most specific first: a local failure trips local-origin before
        // gateway; Envoy checks gateway before 5xx.
        let checks = [
            (
                Reason::ConsecutiveLocalOriginFailures,
                &mut self.consecutive_local,
                cfg.consecutive_local_origin_failures,
            ),
            (
                Reason::ConsecutiveGatewayErrors,
                &mut self.consecutive_gateway,
                cfg.consecutive_gateway_errors,
            ),
            (
                Reason::Consecutive5xx,
                &mut self.consecutive_5xx,
                cfg.consecutive_5xx_errors,
            ),
        ];
        let mut first = None;
        for (reason, counter, threshold) in checks {
            if threshold > 0 && *counter >= threshold {
                // Reset like Envoy, so a skipped ejection needs a fresh run.
                *counter = 0;
                first = first.or(Some(reason));
            }
        }
        first
    }

    /// `(requests, failures)` since the last sweep.
    pub(crate) fn interval(&self) -> (u64, u64) {
        (self.requests, self.failures)
    }

    pub(crate) fn clear_interval(&mut self) {
        self.requests = 0;
        self.failures = 0;
    }
}

fn bump(counter: &mut u32, failed: bool) {
    *counter = if failed { counter.saturating_add(1) } else { 0 };
}

/// A half-open probe fails if any *enabled* detector would count the outcome
/// as a failure; otherwise it is a success (e.g. a 500 when only gateway
/// errors are enabled resets that detector, so it counts toward closing).
pub(crate) fn probe_failed(o: Outcome, cfg: &OutlierDetectionConfig) -> bool {
    let rates = cfg.success_rate.is_some() || cfg.failure_percentage.is_some();
    (cfg.consecutive_5xx_errors > 0 && o.is_5xx())
        || (cfg.consecutive_gateway_errors > 0 && o.is_gateway_error())
        || (cfg.consecutive_local_origin_failures > 0 && o.is_local_failure())
        || (rates && o.is_failure())
}
