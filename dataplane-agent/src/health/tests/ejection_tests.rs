//! Ejection duration (backoff growth, cap, decay) and `maxEjectionPercent`.

use super::*;

#[test]
fn ejection_time_grows_with_backoff_and_is_capped() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        consecutive_5xx_errors: 1,
        base_ejection_time: s(10),
        max_ejection_time: s(35),
        ..cfg()
    };
    let mut d = OutlierDetector::new(c, 1, t0);
    let mut now = t0;
    assert_eq!(
        d.record(0, S500, now),
        Some(ejected(0, Reason::Consecutive5xx, now + s(10), 1))
    );
    now += s(10);
    // times grows while base*times < max+base (Envoy), so it stops at 5.
    for (secs, times) in [(20, 2), (30, 3), (35, 4), (35, 5), (35, 5)] {
        assert_eq!(d.admit(0, now), Admission::Probe);
        let ev = d.record(0, S500, now);
        assert_eq!(
            ev,
            Some(ejected(0, Reason::ProbeFailed, now + s(secs), times))
        );
        now += s(secs);
    }
}

/// One endpoint ejected twice (times = 2) and restored at `t0 + 30s`.
fn restored_after_two_ejections(t0: Instant) -> OutlierDetector {
    let mut c = OutlierDetectionConfig {
        consecutive_5xx_errors: 1,
        base_ejection_time: s(10),
        ..cfg()
    };
    c.half_open.successes_to_close = 1;
    let mut d = OutlierDetector::new(c, 1, t0);
    d.record(0, S500, t0);
    d.admit(0, t0 + s(10));
    d.record(0, S500, t0 + s(10));
    d.admit(0, t0 + s(30));
    assert_eq!(
        d.record(0, Outcome::Success, t0 + s(30)),
        Some(Event::Restored { idx: 0 })
    );
    d
}

#[test]
fn backoff_decays_after_a_full_healthy_interval() {
    let t0 = Instant::now();
    let mut d = restored_after_two_ejections(t0);
    d.tick(t0 + s(45)); // sweep; healthy since 30s >= interval 10s
    let now = t0 + s(45);
    assert_eq!(
        d.record(0, S500, now),
        Some(ejected(0, Reason::Consecutive5xx, now + s(20), 2))
    );
}

#[test]
fn backoff_does_not_decay_within_the_first_interval_of_health() {
    let t0 = Instant::now();
    let mut d = restored_after_two_ejections(t0);
    d.tick(t0 + s(35)); // sweep, but healthy for only 5s
    let now = t0 + s(35);
    assert_eq!(
        d.record(0, S500, now),
        Some(ejected(0, Reason::Consecutive5xx, now + s(30), 3))
    );
}

#[test]
fn backoff_decays_once_per_sweep_down_to_zero() {
    let t0 = Instant::now();
    let mut d = restored_after_two_ejections(t0);
    for at in [45, 55, 65, 75] {
        d.tick(t0 + s(at));
    }
    let now = t0 + s(75);
    assert_eq!(
        d.record(0, S500, now),
        Some(ejected(0, Reason::Consecutive5xx, now + s(10), 1))
    );
}

#[test]
fn the_first_ejection_is_allowed_even_below_ten_hosts() {
    // alwaysEjectOneHost (on by default): with the default 10 % a service
    // of three endpoints ejects its bad one, and a second bad one waits
    // ((1+1)/3 = 67 % > 10 %).
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(defaults_30s(), 3, t0);
    assert!(matches!(
        feed(&mut d, 0, S500, 5, t0)[..],
        [Event::Ejected { .. }]
    ));
    let ev = feed(&mut d, 1, S500, 5, t0);
    assert_eq!(
        ev,
        vec![Event::EjectionSkipped {
            idx: 1,
            reason: Reason::Consecutive5xx
        }]
    );
    assert_eq!(d.state(1), HostState::Healthy);
    assert_eq!(d.stats().ejections_overflow(), 1);
    assert_eq!(d.stats().skipped(Reason::Consecutive5xx), 1);
    assert_eq!(d.stats().ejections_total(), 1);
    // The tripped counter was reset: a fresh run is needed to try again.
    assert!(feed(&mut d, 1, S500, 4, t0).is_empty());
    assert_eq!(
        d.record(1, S500, t0),
        Some(Event::EjectionSkipped {
            idx: 1,
            reason: Reason::Consecutive5xx
        })
    );
}

#[test]
fn without_always_eject_one_host_small_services_eject_nothing() {
    // Envoy's own default: (0+1)/3 = 33 % > 10 %.
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        always_eject_one_host: false,
        ..Default::default()
    };
    let mut d = OutlierDetector::new(c, 3, t0);
    assert!(matches!(
        feed(&mut d, 0, S500, 5, t0)[..],
        [Event::EjectionSkipped { .. }]
    ));
}

#[test]
fn max_ejection_percent_counts_the_ejection_itself() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(defaults_30s(), 10, t0);
    assert!(matches!(
        feed(&mut d, 0, S500, 5, t0)[..],
        [Event::Ejected { .. }]
    ));
    assert!(matches!(
        feed(&mut d, 1, S500, 5, t0)[..],
        [Event::EjectionSkipped { .. }]
    ));
}

#[test]
fn always_eject_one_host_allows_exactly_one_over_the_limit() {
    let t0 = Instant::now();
    let c = OutlierDetectionConfig {
        always_eject_one_host: true,
        max_ejection_percent: 0.0,
        ..Default::default()
    };
    let mut d = OutlierDetector::new(c, 5, t0);
    assert!(matches!(
        feed(&mut d, 0, S500, 5, t0)[..],
        [Event::Ejected { .. }]
    ));
    assert!(matches!(
        feed(&mut d, 1, S500, 5, t0)[..],
        [Event::EjectionSkipped { .. }]
    ));
}

#[test]
fn half_open_hosts_count_against_the_limit_but_probe_failure_reejects() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(defaults_30s(), 10, t0);
    feed(&mut d, 0, S500, 5, t0);
    let now = t0 + s(30);
    assert_eq!(d.tick(now), vec![Event::HalfOpen { idx: 0 }]);
    assert!(matches!(
        feed(&mut d, 1, S500, 5, now)[..],
        [Event::EjectionSkipped { .. }]
    ));
    assert_eq!(d.admit(0, now), Admission::Probe);
    assert_eq!(
        d.record(0, S500, now),
        Some(ejected(0, Reason::ProbeFailed, now + s(60), 2))
    );
}
