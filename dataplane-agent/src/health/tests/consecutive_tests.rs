//! The consecutive-error detectors and their reset rules.

use super::*;

#[test]
fn five_consecutive_5xx_eject_for_base_time() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(cfg(), 2, t0);
    assert!(feed(&mut d, 0, S500, 4, t0).is_empty());
    let ev = d.record(0, S500, t0);
    assert_eq!(ev, Some(ejected(0, Reason::Consecutive5xx, t0 + s(30), 1)));
    assert_eq!(d.admit(0, t0 + s(1)), Admission::No);
    assert_eq!(d.admit(1, t0 + s(1)), Admission::Yes);
    assert_eq!(
        d.state(0),
        HostState::Ejected {
            until: t0 + s(30),
            times: 1
        }
    );
    assert_eq!(d.stats().ejections(Reason::Consecutive5xx), 1);
    assert_eq!(d.ejections_active(), 1);
}

#[test]
fn non_5xx_status_and_success_reset_the_5xx_counter() {
    let t0 = Instant::now();
    for reset in [Outcome::Status(404), Outcome::Status(200), Outcome::Success] {
        let mut d = OutlierDetector::new(cfg(), 1, t0);
        feed(&mut d, 0, S500, 4, t0);
        d.record(0, reset, t0);
        assert!(
            feed(&mut d, 0, S500, 4, t0).is_empty(),
            "{reset:?} must reset"
        );
    }
}

#[test]
fn local_failure_neither_counts_nor_resets_5xx() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        consecutive_local_origin_failures: 0,
        ..cfg()
    };
    let mut d = OutlierDetector::new(c, 1, t0);
    feed(&mut d, 0, S500, 4, t0);
    assert_eq!(d.record(0, LF, t0), None, "a local failure is not a 5xx");
    let ev = d.record(0, S500, t0);
    assert!(matches!(
        ev,
        Some(Event::Ejected {
            reason: Reason::Consecutive5xx,
            ..
        })
    ));
}

#[test]
fn zero_thresholds_disable_consecutive_detectors() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        consecutive_5xx_errors: 0,
        consecutive_local_origin_failures: 0,
        ..cfg()
    };
    let mut d = OutlierDetector::new(c, 1, t0);
    // Gateway errors are disabled by default (Envoy).
    assert!(feed(&mut d, 0, S503, 100, t0).is_empty());
    assert!(feed(&mut d, 0, LF, 100, t0).is_empty());
}

#[test]
fn gateway_errors_count_502_503_504_and_local_failures() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        consecutive_5xx_errors: 0,
        consecutive_gateway_errors: 4,
        consecutive_local_origin_failures: 0,
        ..cfg()
    };
    let mut d = OutlierDetector::new(c, 1, t0);
    for code in [502, 503, 504] {
        assert_eq!(d.record(0, Outcome::Status(code), t0), None);
    }
    let ev = d.record(0, LF, t0);
    assert!(matches!(
        ev,
        Some(Event::Ejected {
            reason: Reason::ConsecutiveGatewayErrors,
            ..
        })
    ));
}

#[test]
fn gateway_counter_resets_on_500_and_success() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        consecutive_5xx_errors: 0,
        consecutive_gateway_errors: 3,
        consecutive_local_origin_failures: 0,
        ..cfg()
    };
    for reset in [S500, Outcome::Success, Outcome::Status(429)] {
        let mut d = OutlierDetector::new(c.clone(), 1, t0);
        feed(&mut d, 0, S503, 2, t0);
        d.record(0, reset, t0);
        assert!(
            feed(&mut d, 0, S503, 2, t0).is_empty(),
            "{reset:?} must reset"
        );
    }
}

#[test]
fn local_origin_failures_eject_and_reset_on_any_response() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(cfg(), 1, t0);
    feed(&mut d, 0, LF, 4, t0);
    d.record(0, S503, t0); // a response, even an error, proves connectivity
    assert!(feed(&mut d, 0, LF, 4, t0).is_empty());
    let ev = d.record(0, Outcome::LocalFailure(LocalFailure::Reset), t0);
    let reason = Reason::ConsecutiveLocalOriginFailures;
    assert_eq!(ev, Some(ejected(0, reason, t0 + s(30), 1)));
}

#[test]
fn most_specific_reason_wins_when_several_trip() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        consecutive_gateway_errors: 5,
        ..cfg()
    };
    let mut d = OutlierDetector::new(c.clone(), 2, t0);
    let ev = feed(&mut d, 0, LF, 5, t0);
    assert!(matches!(
        ev[..],
        [Event::Ejected {
            reason: Reason::ConsecutiveLocalOriginFailures,
            ..
        }]
    ));
    let ev = feed(&mut d, 1, S503, 5, t0);
    assert!(matches!(
        ev[..],
        [Event::Ejected {
            reason: Reason::ConsecutiveGatewayErrors,
            ..
        }]
    ));
}

#[test]
fn ejected_host_ignores_late_outcomes() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(cfg(), 1, t0);
    feed(&mut d, 0, S500, 5, t0);
    assert!(feed(&mut d, 0, Outcome::Success, 10, t0 + s(1)).is_empty());
    assert!(feed(&mut d, 0, S500, 10, t0 + s(1)).is_empty());
    assert_eq!(
        d.state(0),
        HostState::Ejected {
            until: t0 + s(30),
            times: 1
        }
    );
}
