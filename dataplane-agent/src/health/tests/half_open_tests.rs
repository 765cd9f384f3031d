//! Half-open: probe limit, probe results, timeouts, lazy transitions.

use super::*;

/// One of two endpoints ejected at `t0` by consecutive 5xx (base 30s).
fn ejected_at(t0: Instant, c: OutlierDetectionConfig) -> OutlierDetector {
    let mut d = OutlierDetector::new(c, 2, t0);
    feed(&mut d, 0, S500, 5, t0);
    d
}

#[test]
fn ejection_end_moves_to_half_open_with_probe_limit() {
    let t0 = Instant::now();
    let mut d = ejected_at(t0, cfg());
    assert!(d.tick(t0 + s(29)).is_empty());
    let now = t0 + s(30);
    assert_eq!(d.tick(now), vec![Event::HalfOpen { idx: 0 }]);
    assert_eq!(d.stats().half_opens(), 1);
    for _ in 0..3 {
        assert_eq!(d.admit(0, now), Admission::Probe);
    }
    assert_eq!(d.admit(0, now), Admission::No);
    assert_eq!(
        d.state(0),
        HostState::HalfOpen {
            probes_in_flight: 3,
            successes: 0
        }
    );
    assert_eq!(d.record(0, Outcome::Success, now), None);
    assert_eq!(
        d.state(0),
        HostState::HalfOpen {
            probes_in_flight: 2,
            successes: 1
        }
    );
    assert_eq!(
        d.admit(0, now),
        Admission::Probe,
        "an outcome frees its slot"
    );
}

#[test]
fn consecutive_probe_successes_restore_with_fresh_counters() {
    let t0 = Instant::now();
    let mut d = ejected_at(t0, cfg());
    let now = t0 + s(30);
    for _ in 0..3 {
        assert_eq!(d.admit(0, now), Admission::Probe);
    }
    assert_eq!(d.record(0, Outcome::Success, now), None);
    assert_eq!(d.record(0, Outcome::Status(204), now), None);
    assert_eq!(
        d.record(0, Outcome::Success, now),
        Some(Event::Restored { idx: 0 })
    );
    assert_eq!(d.state(0), HostState::Healthy);
    assert_eq!(d.admit(0, now), Admission::Yes);
    assert_eq!(d.stats().restorations(), 1);
    assert!(
        feed(&mut d, 0, S500, 4, now).is_empty(),
        "counters start at zero"
    );
}

#[test]
fn probe_failure_reejects_for_the_next_longer_time() {
    let t0 = Instant::now();
    let mut d = ejected_at(t0, cfg());
    let now = t0 + s(30);
    assert_eq!(d.admit(0, now), Admission::Probe);
    assert_eq!(d.record(0, Outcome::Success, now), None);
    assert_eq!(d.admit(0, now), Admission::Probe);
    let ev = d.record(0, LF, now);
    assert_eq!(ev, Some(ejected(0, Reason::ProbeFailed, now + s(60), 2)));
    assert_eq!(d.admit(0, now + s(59)), Admission::No);
    assert_eq!(d.stats().ejections(Reason::ProbeFailed), 1);
}

#[test]
fn probe_failure_means_failure_for_an_enabled_detector() {
    let t0 = Instant::now();
    let gateway_only = OutlierDetectionConfig {
        consecutive_5xx_errors: 0,
        consecutive_gateway_errors: 1,
        consecutive_local_origin_failures: 0,
        ..cfg()
    };
    let mut d = OutlierDetector::new(gateway_only, 1, t0);
    d.record(0, S503, t0);
    let now = t0 + s(30);
    d.admit(0, now);
    assert_eq!(d.record(0, S500, now), None, "500 is no gateway error");
    assert!(matches!(
        d.state(0),
        HostState::HalfOpen { successes: 1, .. }
    ));
    d.admit(0, now);
    assert!(matches!(
        d.record(0, S503, now),
        Some(Event::Ejected {
            reason: Reason::ProbeFailed,
            ..
        })
    ));

    // With the 5xx detector enabled, a 500 probe fails.
    let mut d = ejected_at(t0, cfg());
    d.admit(0, now);
    assert!(matches!(
        d.record(0, S500, now),
        Some(Event::Ejected {
            reason: Reason::ProbeFailed,
            ..
        })
    ));
}

#[test]
fn rate_detectors_make_any_5xx_a_probe_failure() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        consecutive_5xx_errors: 0,
        consecutive_local_origin_failures: 1,
        failure_percentage: Some(FailurePercentageConfig::default()),
        ..cfg()
    };
    let mut d = OutlierDetector::new(c, 1, t0);
    d.record(0, LF, t0);
    let now = t0 + s(30);
    d.admit(0, now);
    assert!(matches!(
        d.record(0, S500, now),
        Some(Event::Ejected {
            reason: Reason::ProbeFailed,
            ..
        })
    ));
}

#[test]
fn lost_probe_slots_are_reclaimed_after_probe_timeout() {
    let t0 = Instant::now();
    let mut d = ejected_at(t0, cfg());
    let now = t0 + s(30);
    for _ in 0..3 {
        d.admit(0, now);
    }
    d.tick(now + s(29));
    assert_eq!(d.admit(0, now + s(29)), Admission::No);
    assert!(d.tick(now + s(30)).is_empty());
    assert_eq!(d.stats().probe_timeouts(), 3);
    assert_eq!(d.admit(0, now + s(30)), Admission::Probe);
    // A late outcome after the reclaim must not underflow or misbehave.
    assert_eq!(d.record(0, Outcome::Success, now + s(31)), None);
    assert_eq!(d.record(0, Outcome::Success, now + s(31)), None);
    assert_eq!(
        d.state(0),
        HostState::HalfOpen {
            probes_in_flight: 0,
            successes: 2
        }
    );
}

#[test]
fn admit_applies_due_transition_and_next_tick_reports_it() {
    let t0 = Instant::now();
    let mut d = ejected_at(t0, cfg());
    let now = t0 + s(30);
    assert_eq!(d.admit(0, now), Admission::Probe);
    assert_eq!(d.tick(now), vec![Event::HalfOpen { idx: 0 }]);
    assert!(d.tick(now).is_empty(), "reported once");
}

#[test]
fn available_matches_admit_without_taking_slots() {
    let t0 = Instant::now();
    let mut d = ejected_at(t0, cfg());
    let mut out = [false; 3];
    d.fill_available(&mut out, t0 + s(1));
    assert_eq!(out, [false, true, true]);
    let now = t0 + s(30);
    assert!(
        d.available(0, now),
        "due ejection end counts before any tick"
    );
    assert!(
        matches!(d.state(0), HostState::Ejected { .. }),
        "available changes nothing"
    );
    for _ in 0..3 {
        assert!(d.available(0, now));
        d.admit(0, now);
    }
    assert!(!d.available(0, now), "every probe slot taken");
}

#[test]
fn successes_to_close_zero_restores_directly_like_envoy() {
    let t0 = Instant::now();
    let mut c = cfg();
    c.half_open.successes_to_close = 0;
    let mut d = ejected_at(t0, c);
    assert_eq!(d.tick(t0 + s(30)), vec![Event::Restored { idx: 0 }]);
    assert_eq!(d.admit(0, t0 + s(30)), Admission::Yes);
    assert_eq!(d.stats().half_opens(), 0);
    assert_eq!(d.stats().restorations(), 1);
}

#[test]
fn a_cancelled_probe_frees_its_slot_without_a_verdict() {
    let t0 = Instant::now();
    let mut d = ejected_at(t0, cfg());
    let now = t0 + s(30);
    d.tick(now);
    for _ in 0..3 {
        assert_eq!(d.admit(0, now), Admission::Probe);
    }
    assert_eq!(d.admit(0, now), Admission::No);
    d.release_probe(0);
    assert_eq!(
        d.state(0),
        HostState::HalfOpen {
            probes_in_flight: 2,
            successes: 0
        },
        "neither success nor failure was counted"
    );
    assert_eq!(d.admit(0, now), Admission::Probe);
    // Releasing on a healthy host changes nothing.
    d.release_probe(1);
    assert_eq!(d.state(1), HostState::Healthy);
}
