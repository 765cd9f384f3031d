//! Endpoint selection.
//!
//! A balancer does not return one endpoint but the order in which to try
//! them, so that a failed connect moves on to the next endpoint without
//! trying the same one twice.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Round robin: each new connection starts one endpoint further.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// Indexes of `len` endpoints in the order to try them: every endpoint
    /// exactly once, starting with this connection's turn.
    pub fn attempt_order(&self, len: usize) -> impl Iterator<Item = usize> + use<> {
        let start = if len == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % len
        };
        (0..len).map(move |i| (start + i) % len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_rotate_over_all_endpoints() {
        let rr = RoundRobin::default();
        let firsts: Vec<usize> = (0..6).filter_map(|_| rr.attempt_order(3).next()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn failover_tries_each_endpoint_once() {
        let rr = RoundRobin::default();
        let _ = rr.attempt_order(3);
        assert_eq!(rr.attempt_order(3).collect::<Vec<_>>(), [1, 2, 0]);
    }

    #[test]
    fn no_endpoints_means_no_attempt() {
        assert_eq!(RoundRobin::default().attempt_order(0).count(), 0);
    }
}
