use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::yaml;
use crate::resilience::breaker::{CircuitBreaker, ConnectionPool, Limit, Permit, Tripped};

fn breaker(max: u32) -> Arc<CircuitBreaker> {
    Arc::new(CircuitBreaker::new(&ConnectionPool {
        max_connections: max,
        max_pending_requests: max,
        max_requests: max,
        max_retries: max,
    }))
}

#[test]
fn empty_mapping_gives_istio_defaults_no_limit() {
    let p: ConnectionPool = yaml("{}").unwrap();
    assert_eq!(p, ConnectionPool::default());
    assert_eq!(
        (
            p.max_connections,
            p.max_pending_requests,
            p.max_requests,
            p.max_retries
        ),
        (u32::MAX, u32::MAX, u32::MAX, u32::MAX)
    );
}

#[test]
fn parses_all_fields_including_istio_unlimited() {
    let p: ConnectionPool = yaml(
        "{maxConnections: 4294967295, maxPendingRequests: 10, maxRequests: 20, maxRetries: 1}",
    )
    .unwrap();
    assert_eq!(p.max(Limit::Connections), u32::MAX);
    assert_eq!(p.max(Limit::PendingRequests), 10);
    assert_eq!(p.max(Limit::Requests), 20);
    assert_eq!(p.max(Limit::Retries), 1);
}

#[test]
fn rejects_zero_connections_and_requests() {
    let err = yaml::<ConnectionPool>("maxConnections: 0").unwrap_err();
    assert!(err.starts_with("maxConnections: must be >= 1"), "{err}");
    let err = yaml::<ConnectionPool>("maxRequests: 0").unwrap_err();
    assert!(err.starts_with("maxRequests: must be >= 1"), "{err}");
}

#[test]
fn rejects_negative_overflowing_and_unknown_values() {
    assert!(yaml::<ConnectionPool>("maxRetries: -1").is_err());
    assert!(yaml::<ConnectionPool>("maxRequests: 4294967296").is_err());
    assert!(yaml::<ConnectionPool>("http1MaxPendingRequests: 5").is_err());
}

#[test]
fn zero_pending_and_retries_are_valid_and_reject_everything() {
    let p: ConnectionPool = yaml("{maxPendingRequests: 0, maxRetries: 0}").unwrap();
    let b = Arc::new(CircuitBreaker::new(&p));
    assert_eq!(
        b.try_acquire(Limit::PendingRequests).unwrap_err(),
        Tripped {
            limit: Limit::PendingRequests
        }
    );
    assert!(b.try_acquire(Limit::Retries).is_err());
    assert!(b.try_acquire(Limit::Requests).is_ok());
}

#[test]
fn acquires_up_to_the_limit_then_trips_and_counts() {
    let b = breaker(2);
    let p1 = b.try_acquire(Limit::Requests).unwrap();
    let _p2 = b.try_acquire(Limit::Requests).unwrap();
    assert_eq!(b.in_use(Limit::Requests), 2);
    assert_eq!(b.remaining(Limit::Requests), 0);
    assert_eq!(
        b.try_acquire(Limit::Requests).unwrap_err().limit,
        Limit::Requests
    );
    assert!(b.try_acquire(Limit::Requests).is_err());
    assert_eq!(b.trips(Limit::Requests), 2);
    // Limits are independent.
    assert_eq!(b.in_use(Limit::Connections), 0);
    assert_eq!(b.trips(Limit::Connections), 0);
    assert!(b.try_acquire(Limit::Connections).is_ok());
    // Dropping a permit releases its slot.
    drop(p1);
    assert_eq!(b.in_use(Limit::Requests), 1);
    let p3 = b.try_acquire(Limit::Requests).unwrap();
    assert_eq!(p3.limit(), Limit::Requests);
}

#[test]
fn limit_names_for_metrics_and_headers() {
    let names: Vec<_> = Limit::ALL.iter().map(|l| l.as_str()).collect();
    assert_eq!(
        names,
        [
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries"
        ]
    );
    let headers: Vec<_> = Limit::ALL.iter().map(|l| l.header_value()).collect();
    assert_eq!(
        headers,
        [
            "maxConnections",
            "maxPendingRequests",
            "maxRequests",
            "maxRetries"
        ]
    );
    let tripped = Tripped {
        limit: Limit::Retries,
    };
    assert_eq!(
        tripped.to_string(),
        "circuit breaker open: max_retries reached"
    );
}

#[test]
fn update_keeps_outstanding_permits_and_applies_new_limits() {
    let b = breaker(3);
    let held: Vec<Permit> = (0..3)
        .map(|_| b.try_acquire(Limit::Connections).unwrap())
        .collect();
    b.update(&ConnectionPool {
        max_connections: 1,
        ..ConnectionPool::default()
    });
    assert_eq!(b.max(Limit::Connections), 1);
    assert_eq!(b.max(Limit::Retries), u32::MAX, "the default applies again");
    assert_eq!(b.in_use(Limit::Connections), 3);
    assert_eq!(b.remaining(Limit::Connections), 0);
    assert!(b.try_acquire(Limit::Connections).is_err());
    drop(held);
    assert_eq!(b.in_use(Limit::Connections), 0);
    let _one = b.try_acquire(Limit::Connections).unwrap();
    assert!(b.try_acquire(Limit::Connections).is_err());
}

#[test]
fn permit_can_move_to_another_thread() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CircuitBreaker>();
    assert_send_sync::<Permit>();
    let b = breaker(1);
    let permit = b.try_acquire(Limit::Requests).unwrap();
    std::thread::spawn(move || drop(permit)).join().unwrap();
    assert_eq!(b.in_use(Limit::Requests), 0);
}

#[test]
fn concurrent_acquires_never_exceed_the_limit() {
    const LIMIT: u32 = 5;
    const THREADS: u32 = 8;
    const TRIES: u32 = 2_000;
    let b = breaker(LIMIT);
    let max_seen = Arc::new(AtomicU32::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (b, max_seen) = (Arc::clone(&b), Arc::clone(&max_seen));
            std::thread::spawn(move || {
                let mut granted = 0u32;
                for _ in 0..TRIES {
                    if let Ok(permit) = b.try_acquire(Limit::Requests) {
                        granted += 1;
                        max_seen.fetch_max(b.in_use(Limit::Requests), Ordering::Relaxed);
                        std::thread::yield_now();
                        drop(permit);
                    }
                }
                granted
            })
        })
        .collect();
    let granted: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let max_seen = max_seen.load(Ordering::Relaxed);
    assert!(max_seen <= LIMIT, "observed {max_seen} in use");
    assert!(max_seen >= 1);
    assert_eq!(b.in_use(Limit::Requests), 0);
    assert_eq!(
        u64::from(granted) + b.trips(Limit::Requests),
        u64::from(THREADS * TRIES)
    );
}

#[test]
fn unlimited_breaker_does_not_overflow() {
    let b = breaker(u32::MAX);
    let _p = b.try_acquire(Limit::Requests).unwrap();
    assert_eq!(b.remaining(Limit::Requests), u32::MAX - 1);
}
