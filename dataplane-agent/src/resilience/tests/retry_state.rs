use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::resilience::backoff::{Backoff, Jitter};
use crate::resilience::breaker::{CircuitBreaker, ConnectionPool, Limit};
use crate::resilience::budget::{BudgetConfig, RetryBudget};
use crate::resilience::retry::{
    Failure, GiveUpReason, RetryDecision, RetryOn, RetryPolicy, RetryState,
};

use GiveUpReason::*;

fn policy(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        retry_on: vec![RetryOn::GatewayError],
        backoff: Backoff {
            jitter: Jitter::None,
            ..Backoff::default()
        },
        ..RetryPolicy::default()
    }
}

fn budget(percent: f64, min_per_sec: u32) -> RetryBudget {
    RetryBudget::new(&BudgetConfig {
        retry_percent: percent,
        min_retries_per_second: min_per_sec,
        window: Duration::from_secs(10),
    })
}

fn max_retries(n: u32) -> Arc<CircuitBreaker> {
    Arc::new(CircuitBreaker::new(&ConnectionPool {
        max_retries: n,
        ..ConnectionPool::default()
    }))
}

fn retry_after(ms: u64) -> RetryDecision {
    RetryDecision::Retry {
        after: Duration::from_millis(ms),
    }
}

/// Drives one request's state: `next` with the given inputs and a fixed seed.
struct Harness {
    budget: RetryBudget,
    rng: fastrand::Rng,
    now: Instant,
}

impl Harness {
    fn new(budget: RetryBudget) -> Self {
        Self {
            budget,
            rng: fastrand::Rng::with_seed(42),
            now: Instant::now(),
        }
    }

    fn next(&mut self, state: &mut RetryState<'_>, failure: Failure) -> RetryDecision {
        self.next_with(state, failure, true, None)
    }

    fn next_with(
        &mut self,
        state: &mut RetryState<'_>,
        failure: Failure,
        replayable: bool,
        breaker: Option<&Arc<CircuitBreaker>>,
    ) -> RetryDecision {
        let now = self.now;
        state.next(
            &failure,
            replayable,
            &self.budget,
            breaker,
            &mut self.rng,
            now,
        )
    }
}

#[test]
fn retries_with_backoff_until_attempts_are_exhausted() {
    let p = policy(3);
    let mut h = Harness::new(budget(20.0, 10));
    let mut s = RetryState::new(&p);
    assert_eq!(h.next(&mut s, Failure::Status(503)), retry_after(25));
    assert_eq!(h.next(&mut s, Failure::Reset), retry_after(50));
    assert_eq!(h.next(&mut s, Failure::Timeout), retry_after(100));
    assert_eq!(s.retries(), 3);
    assert_eq!(
        h.next(&mut s, Failure::Status(503)),
        RetryDecision::GiveUp(AttemptsExhausted)
    );
}

#[test]
fn zero_attempts_fails_fast() {
    let p = policy(0);
    let mut h = Harness::new(budget(20.0, 10));
    let mut s = RetryState::new(&p);
    assert_eq!(
        h.next(&mut s, Failure::ConnectFailure),
        RetryDecision::GiveUp(AttemptsExhausted)
    );
    assert_eq!(h.budget.available(h.now), 100, "no budget spent");
}

#[test]
fn not_retriable_is_reported_before_anything_else() {
    let p = policy(0);
    let mut h = Harness::new(budget(0.0, 0));
    let mut s = RetryState::new(&p);
    let d = h.next_with(&mut s, Failure::Status(500), false, Some(&max_retries(0)));
    assert_eq!(d, RetryDecision::GiveUp(NotRetriable));
}

#[test]
fn unreplayable_body_is_not_retried() {
    let p = policy(2);
    let mut h = Harness::new(budget(20.0, 10));
    let mut s = RetryState::new(&p);
    let d = h.next_with(&mut s, Failure::Reset, false, None);
    assert_eq!(d, RetryDecision::GiveUp(BodyNotReplayable));
    assert_eq!(h.budget.available(h.now), 100, "no budget spent");
    // Replayability is per call: a later failure with a buffered body may still retry.
    assert_eq!(h.next(&mut s, Failure::Reset), retry_after(25));
}

#[test]
fn exhausted_budget_stops_retries() {
    let p = policy(5);
    let mut h = Harness::new(budget(0.0, 0));
    let mut s = RetryState::new(&p);
    assert_eq!(
        h.next(&mut s, Failure::Reset),
        RetryDecision::GiveUp(BudgetExhausted)
    );
    assert_eq!(s.retries(), 0);
}

#[test]
fn each_granted_retry_spends_budget() {
    let p = policy(5);
    let mut h = Harness::new(budget(0.0, 1)); // reserve: 10 retries
    let mut s = RetryState::new(&p);
    h.next(&mut s, Failure::Reset);
    h.next(&mut s, Failure::Reset);
    assert_eq!(h.budget.available(h.now), 8);
}

#[test]
fn max_retries_breaker_bounds_concurrent_retries_across_requests() {
    let p = policy(5);
    let mut h = Harness::new(budget(20.0, 10));
    let breaker = max_retries(1);
    let (mut a, mut b) = (RetryState::new(&p), RetryState::new(&p));
    let d = h.next_with(&mut a, Failure::Reset, true, Some(&breaker));
    assert_eq!(d, retry_after(25));
    assert_eq!(
        breaker.in_use(Limit::Retries),
        1,
        "held while the retry is pending"
    );
    let d = h.next_with(&mut b, Failure::Reset, true, Some(&breaker));
    assert_eq!(d, RetryDecision::GiveUp(BreakerOpen));
    assert_eq!(breaker.trips(Limit::Retries), 1);
    assert_eq!(
        h.budget.available(h.now),
        99,
        "a refused breaker spends no budget"
    );
    // `a`'s retry failed again: its slot is reused for the next retry, not leaked or doubled.
    let d = h.next_with(&mut a, Failure::Reset, true, Some(&breaker));
    assert_eq!(d, retry_after(50));
    assert_eq!(breaker.in_use(Limit::Retries), 1);
    // `a`'s retry succeeded: finishing frees the slot for `b`.
    a.finish();
    assert_eq!(breaker.in_use(Limit::Retries), 0);
    let d = h.next_with(&mut b, Failure::Reset, true, Some(&breaker));
    assert_eq!(d, retry_after(25));
    drop(b);
    assert_eq!(
        breaker.in_use(Limit::Retries),
        0,
        "dropping the state frees the slot"
    );
}

#[test]
fn giving_up_releases_the_retry_slot() {
    let p = policy(1);
    let mut h = Harness::new(budget(20.0, 10));
    let breaker = max_retries(1);
    let mut s = RetryState::new(&p);
    h.next_with(&mut s, Failure::Reset, true, Some(&breaker));
    let d = h.next_with(&mut s, Failure::Reset, true, Some(&breaker));
    assert_eq!(d, RetryDecision::GiveUp(AttemptsExhausted));
    assert_eq!(breaker.in_use(Limit::Retries), 0);
}

#[test]
fn refused_budget_does_not_hold_a_breaker_slot() {
    let p = policy(1);
    let mut h = Harness::new(budget(0.0, 0));
    let breaker = max_retries(1);
    let mut s = RetryState::new(&p);
    let d = h.next_with(&mut s, Failure::Reset, true, Some(&breaker));
    assert_eq!(d, RetryDecision::GiveUp(BudgetExhausted));
    assert_eq!(breaker.in_use(Limit::Retries), 0);
    assert_eq!(breaker.trips(Limit::Retries), 0);
}

#[test]
fn jittered_delays_stay_below_the_backoff_ceiling() {
    let p = RetryPolicy {
        attempts: 6,
        retry_on: vec![RetryOn::Reset],
        ..RetryPolicy::default()
    };
    let mut h = Harness::new(budget(20.0, 10));
    let mut s = RetryState::new(&p);
    for n in 0..6 {
        match h.next(&mut s, Failure::Reset) {
            RetryDecision::Retry { after } => assert!(after < p.backoff.ceiling(n), "retry {n}"),
            other => panic!("retry {n}: {other:?}"),
        }
    }
}

#[test]
fn give_up_reasons_have_metric_names() {
    let names: Vec<_> = [
        NotRetriable,
        AttemptsExhausted,
        BodyNotReplayable,
        BreakerOpen,
        BudgetExhausted,
    ]
    .map(GiveUpReason::as_str)
    .to_vec();
    assert_eq!(
        names,
        [
            "not_retriable",
            "attempts_exhausted",
            "body_not_replayable",
            "breaker_open",
            "budget_exhausted"
        ]
    );
}

#[test]
fn state_and_shared_pieces_are_thread_safe() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<RetryState<'static>>();
    assert_send_sync::<RetryBudget>();
    assert_send_sync::<RetryPolicy>();
}

#[test]
fn non_idempotent_requests_retry_only_when_surely_unprocessed() {
    let mut p = policy(2);
    p.retry_on.push(RetryOn::Unavailable);
    let mut h = Harness::new(budget(20.0, 10));
    for failure in [Failure::Reset, Failure::Timeout, Failure::Status(503)] {
        let mut s = RetryState::for_request(&p, false);
        assert_eq!(
            h.next(&mut s, failure),
            RetryDecision::GiveUp(NotIdempotent),
            "{failure:?}"
        );
    }
    let mut s = RetryState::for_request(&p, false);
    assert_eq!(h.next(&mut s, Failure::ConnectFailure), retry_after(25));
    assert_eq!(h.next(&mut s, Failure::RefusedStream), retry_after(50));
    // gRPC status conditions follow gRPC's own rules, whatever the method.
    let mut s = RetryState::for_request(&p, false);
    assert_eq!(h.next(&mut s, Failure::GrpcStatus(14)), retry_after(25));
}

#[test]
fn retry_non_idempotent_lifts_the_method_rule() {
    let mut p = policy(2);
    p.retry_non_idempotent = true;
    let mut h = Harness::new(budget(20.0, 10));
    let mut s = RetryState::for_request(&p, false);
    assert_eq!(h.next(&mut s, Failure::Status(503)), retry_after(25));
}

#[test]
fn give_up_reasons_that_hide_a_retry_name_themselves_to_the_caller() {
    assert_eq!(BreakerOpen.error_header(), Some("retry_overflow"));
    assert_eq!(
        BudgetExhausted.error_header(),
        Some("retry_budget_exhausted")
    );
    assert_eq!(AttemptsExhausted.error_header(), Some("retries_exhausted"));
    assert_eq!(
        BodyNotReplayable.error_header(),
        Some("retry_body_too_large")
    );
    assert_eq!(NotRetriable.error_header(), None);
}
