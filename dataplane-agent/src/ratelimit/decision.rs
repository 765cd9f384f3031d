//! What the limiter tells the integrator to do with a request, and the delay-queue guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The verdict for one request (or one new TCP connection).
#[derive(Debug)]
#[must_use]
pub enum Decision {
    /// Forward now.
    Allow,
    /// Hold the request for `wait`, then forward it without calling `check` again: capacity at
    /// `now + wait` is already reserved for it. Keep `slot` alive while the request is held;
    /// dropping it frees the queue place (the reservation itself is not refunded). Only ever
    /// returned with `action: delay`, with `wait <= delay.maxWait`.
    Delay { wait: Duration, slot: QueueSlot },
    /// Answer 429 (HTTP) or close the connection (TCP). A request arriving `retry_after` from
    /// now would be admitted (possibly with a delay); see [`retry_after_header`].
    Reject { retry_after: Duration },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// The hold time of a [`Decision::Delay`].
    pub fn delay(&self) -> Option<Duration> {
        match self {
            Decision::Delay { wait, .. } => Some(*wait),
            _ => None,
        }
    }

    /// The retry-after of a [`Decision::Reject`].
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Decision::Reject { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

/// A place in a priority class's delay queue, released on drop (RAII, so a cancelled or
/// panicking request task cannot leak it). Holds an `Arc` of the counter, so it may outlive the
/// `RateLimiter` (e.g. across a config reload).
#[derive(Debug)]
#[must_use = "dropping the slot releases the queue place at once"]
pub struct QueueSlot {
    queued: Arc<AtomicU32>,
}

impl QueueSlot {
    /// Takes a place if fewer than `max` are held; lock-free, never exceeds `max`.
    pub(crate) fn try_acquire(queued: &Arc<AtomicU32>, max: u32) -> Option<QueueSlot> {
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot {
                queued: Arc::clone(queued),
            })
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Value for the HTTP `Retry-After` header: whole seconds, rounded up (RFC 9110 §10.2.3 allows
/// only integers). At least 1: "0" would invite an immediate retry of a rejected request.
pub fn retry_after_header(retry_after: Duration) -> String {
    let rounded_up = retry_after
        .as_secs()
        .saturating_add(u64::from(retry_after.subsec_nanos() > 0));
    rounded_up.max(1).to_string()
}
