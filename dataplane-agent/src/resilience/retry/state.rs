//! Per-request retry state machine, after Envoy's `RetryStateImpl::shouldRetry`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Failure, RetryPolicy};
use crate::resilience::breaker::{CircuitBreaker, Limit, Permit};
use crate::resilience::budget::RetryBudget;

/// Why a failed request is not retried; the integrator forwards the last failure downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GiveUpReason {
    /// No `retryOn` condition matches the failure.
    NotRetriable,
    /// The method is not idempotent and the upstream may have processed the request (see
    /// `retryNonIdempotent`).
    NotIdempotent,
    /// `attempts` retries were already made (Envoy `upstream_rq_retry_limit_exceeded`).
    AttemptsExhausted,
    /// The request body was not (fully) buffered, so it cannot be sent again.
    BodyNotReplayable,
    /// The circuit breaker's `maxRetries` is reached (Envoy `upstream_rq_retry_overflow`).
    BreakerOpen,
    /// The service's retry budget is spent.
    BudgetExhausted,
}

impl GiveUpReason {
    /// Snake-case name for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::NotRetriable => "not_retriable",
            GiveUpReason::NotIdempotent => "not_idempotent",
            GiveUpReason::AttemptsExhausted => "attempts_exhausted",
            GiveUpReason::BodyNotReplayable => "body_not_replayable",
            GiveUpReason::BreakerOpen => "breaker_open",
            GiveUpReason::BudgetExhausted => "budget_exhausted",
        }
    }

    /// Value of `x-dataplane-error` on a response the proxy gave up retrying: why the caller
    /// sees a failure although retries were configured. `None` when retrying did not apply.
    pub fn error_header(self) -> Option<&'static str> {
        match self {
            GiveUpReason::NotRetriable | GiveUpReason::NotIdempotent => None,
            GiveUpReason::AttemptsExhausted => Some("retries_exhausted"),
            GiveUpReason::BodyNotReplayable => Some("retry_body_too_large"),
            GiveUpReason::BreakerOpen => Some("retry_overflow"),
            GiveUpReason::BudgetExhausted => Some("retry_budget_exhausted"),
        }
    }
}

/// Outcome of [`RetryState::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait `after` (jittered backoff), then send the request again, preferably to another
    /// endpoint (Istio's default `previous_hosts` predicate).
    Retry { after: Duration },
    /// Stop and forward the last failure.
    GiveUp(GiveUpReason),
}

/// Retry bookkeeping of one request. Create it when the request starts, feed it every failed
/// attempt, drop it (or call [`finish`](Self::finish)) once a final response is chosen.
///
/// Holds the `maxRetries` circuit-breaker permit of the retry in flight, as Envoy's retry state
/// holds the `retries` resource from scheduling a retry until that retry's outcome is known, so
/// `maxRetries` bounds the retries backing off or in flight across the whole service.
#[derive(Debug)]
pub struct RetryState<'p> {
    policy: &'p RetryPolicy,
    /// Whether the request may be sent again after the upstream may have acted on it.
    idempotent: bool,
    retries: u32,
    permit: Option<Permit>,
}

impl<'p> RetryState<'p> {
    /// State for a new request. Does not touch the budget: the integrator calls
    /// [`RetryBudget::deposit`] for every original request, failed or not.
    pub fn new(policy: &'p RetryPolicy) -> Self {
        Self::for_request(policy, true)
    }

    /// State for a request whose method is (`idempotent`) or is not safe to repeat; a
    /// non-idempotent one is retried only after failures where it surely was not processed.
    pub fn for_request(policy: &'p RetryPolicy, idempotent: bool) -> Self {
        Self {
            policy,
            idempotent: idempotent || policy.retry_non_idempotent,
            retries: 0,
            permit: None,
        }
    }

    /// Retries granted so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Decides what to do after an attempt failed with `failure`.
    ///
    /// Checks run cheapest-and-most-fundamental first, like Envoy: retriable, attempts left, body
    /// replayable, then the shared limits. The breaker is asked before the budget so a refused
    /// breaker does not burn a budget token; a refused budget drops the fresh breaker permit.
    /// `breaker` is optional so the policy can be used (and tested) without one.
    pub fn next(
        &mut self,
        failure: &Failure,
        replayable: bool,
        budget: &RetryBudget,
        breaker: Option<&Arc<CircuitBreaker>>,
        rng: &mut fastrand::Rng,
        now: Instant,
    ) -> RetryDecision {
        // The previous retry (if any) has produced this failure: its slot is free again.
        self.permit = None;
        if let Err(reason) = self.check_request(failure, replayable) {
            return RetryDecision::GiveUp(reason);
        }
        let permit = match breaker.map(|b| b.try_acquire(Limit::Retries)).transpose() {
            Ok(permit) => permit,
            Err(_) => return RetryDecision::GiveUp(GiveUpReason::BreakerOpen),
        };
        if !budget.try_withdraw(now) {
            return RetryDecision::GiveUp(GiveUpReason::BudgetExhausted);
        }
        let after = self.policy.backoff.delay(self.retries, rng);
        self.retries = self.retries.saturating_add(1);
        self.permit = permit;
        RetryDecision::Retry { after }
    }

    /// Releases the retry slot held for the last retry. Call when that retry produced the final
    /// response but the state lives on (e.g. while the response body streams); dropping the
    /// state does the same.
    pub fn finish(&mut self) {
        self.permit = None;
    }

    /// Per-request conditions, which need no shared state.
    fn check_request(&self, failure: &Failure, replayable: bool) -> Result<(), GiveUpReason> {
        let grpc = matches!(failure, Failure::GrpcStatus(_));
        if !self.policy.is_retriable(failure) {
            Err(GiveUpReason::NotRetriable)
        } else if !self.idempotent && !failure.is_unprocessed() && !grpc {
            Err(GiveUpReason::NotIdempotent)
        } else if self.retries >= self.policy.attempts {
            Err(GiveUpReason::AttemptsExhausted)
        } else if !replayable {
            Err(GiveUpReason::BodyNotReplayable)
        } else {
            Ok(())
        }
    }
}
