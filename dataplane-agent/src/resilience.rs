//! Retry and circuit-breaking policies of the node proxy, with Envoy/Istio semantics.
//!
//! The pieces are deliberately independent so each can be tested alone and reused:
//!
//! - [`retry`]: which failures are retriable (`retryOn`, Envoy's `x-envoy-retry-on` names) and the
//!   per-request state machine [`RetryState`] that turns a failure into a [`RetryDecision`].
//! - [`backoff`]: Envoy's fully jittered exponential backoff between retries.
//! - [`budget`]: a linkerd2/Finagle-style retry budget shared by all requests to a service, so
//!   that retries can never amplify an outage beyond a fixed fraction of real traffic.
//! - [`breaker`]: Envoy's circuit breakers (Istio `connectionPool`): hard concurrency limits on
//!   connections, pending requests, requests and retries, enforced lock-free.
//!
//! Everything is pure: time arrives as `now: Instant`, randomness as `&mut fastrand::Rng`.
//! Shared state ([`RetryBudget`], [`CircuitBreaker`]) uses `&self` methods and is `Send + Sync`.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod retry;

pub use backoff::{Backoff, Jitter};
pub use breaker::{CircuitBreaker, ConnectionPool, Limit, Permit, Tripped};
pub use budget::{BudgetConfig, RetryBudget};
pub use retry::{Failure, GiveUpReason, RetryDecision, RetryOn, RetryPolicy, RetryState};

#[cfg(test)]
mod tests;
