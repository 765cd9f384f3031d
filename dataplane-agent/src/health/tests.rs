//! Detector behaviour tests. Time is simulated with `t0 + offset`.

use super::*;
use std::time::Duration;

mod config_tests;
mod consecutive_tests;
mod ejection_tests;
mod half_open_tests;
mod sweep_tests;

const S500: Outcome = Outcome::Status(500);
const S503: Outcome = Outcome::Status(503);
const LF: Outcome = Outcome::LocalFailure(LocalFailure::ConnectRefused);

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The defaults with Istio's 30 s base ejection time, the times these
/// tests were written with.
fn defaults_30s() -> OutlierDetectionConfig {
    OutlierDetectionConfig {
        base_ejection_time: s(30),
        ..Default::default()
    }
}

/// `defaults_30s`, but with no `maxEjectionPercent` limit.
fn cfg() -> OutlierDetectionConfig {
    OutlierDetectionConfig {
        max_ejection_percent: 100.0,
        ..defaults_30s()
    }
}

/// Records `o` `n` times; returns the events produced.
fn feed(d: &mut OutlierDetector, idx: usize, o: Outcome, n: usize, now: Instant) -> Vec<Event> {
    (0..n).filter_map(|_| d.record(idx, o, now)).collect()
}

fn ejected(idx: usize, reason: Reason, until: Instant, times: u32) -> Event {
    Event::Ejected {
        idx,
        reason,
        until,
        times,
    }
}

#[test]
fn zero_endpoints_and_unknown_indices_fail_open() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(cfg(), 0, t0);
    assert!(d.is_empty());
    assert_eq!(d.record(3, S500, t0), None);
    assert_eq!(d.admit(3, t0), Admission::Yes);
    assert!(d.available(3, t0));
    assert_eq!(d.state(3), HostState::Healthy);
    assert!(d.tick(t0 + s(3600)).is_empty());
    let mut out = [false; 2];
    d.fill_available(&mut out, t0);
    assert_eq!(out, [true, true]);
}

#[test]
fn set_endpoints_keeps_state_of_surviving_endpoints() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(cfg(), 3, t0);
    feed(&mut d, 2, S500, 5, t0); // old 2 ejected
    feed(&mut d, 0, S500, 4, t0); // old 0 one 5xx from ejection
    d.set_endpoints(&[Some(2), None, Some(0)], t0 + s(1));
    assert_eq!(d.len(), 3);
    assert_eq!(
        d.state(0),
        HostState::Ejected {
            until: t0 + s(30),
            times: 1
        }
    );
    assert_eq!(d.state(1), HostState::Healthy);
    assert!(matches!(
        d.record(2, S500, t0 + s(1)),
        Some(Event::Ejected { idx: 2, .. })
    ));
}

#[test]
fn set_endpoints_treats_duplicate_and_unknown_old_indices_as_new() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(cfg(), 1, t0);
    feed(&mut d, 0, S500, 5, t0);
    d.set_endpoints(&[Some(0), Some(0), Some(7)], t0);
    assert!(matches!(d.state(0), HostState::Ejected { .. }));
    assert_eq!(d.state(1), HostState::Healthy);
    assert_eq!(d.state(2), HostState::Healthy);
    assert_eq!(d.ejections_active(), 1);
}

#[test]
fn set_config_applies_new_thresholds_and_keeps_state() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(cfg(), 2, t0);
    feed(&mut d, 0, S500, 5, t0);
    feed(&mut d, 1, S500, 2, t0);
    d.set_config(OutlierDetectionConfig {
        consecutive_5xx_errors: 3,
        ..cfg()
    });
    assert!(matches!(d.state(0), HostState::Ejected { .. }));
    assert!(matches!(
        d.record(1, S500, t0),
        Some(Event::Ejected { idx: 1, .. })
    ));
    assert_eq!(d.config().consecutive_5xx_errors, 3);
}

#[test]
fn reason_names_are_distinct_snake_case() {
    let names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        [
            "consecutive_5xx",
            "consecutive_gateway_errors",
            "consecutive_local_origin_failures",
            "success_rate",
            "failure_percentage",
            "probe_failed"
        ]
    );
}
