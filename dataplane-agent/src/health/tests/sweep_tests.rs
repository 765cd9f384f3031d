//! Interval sweep: success rate, failure percentage, counter reset.

use super::*;

/// Consecutive detectors off, so only the sweep can eject.
fn sweep_cfg(
    sr: Option<SuccessRateConfig>,
    fp: Option<FailurePercentageConfig>,
) -> OutlierDetectionConfig {
    OutlierDetectionConfig {
        consecutive_5xx_errors: 0,
        consecutive_local_origin_failures: 0,
        success_rate: sr,
        failure_percentage: fp,
        ..cfg()
    }
}

fn load(d: &mut OutlierDetector, idx: usize, ok: usize, failed: usize, now: Instant) {
    assert!(feed(d, idx, Outcome::Success, ok, now).is_empty());
    assert!(feed(d, idx, S500, failed, now).is_empty());
}

fn sr() -> Option<SuccessRateConfig> {
    Some(SuccessRateConfig::default())
}

fn fp() -> Option<FailurePercentageConfig> {
    Some(FailurePercentageConfig::default())
}

#[test]
fn success_rate_ejects_outlier_only_when_interval_elapsed() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(sweep_cfg(sr(), None), 5, t0);
    load(&mut d, 0, 50, 50, t0);
    for idx in 1..5 {
        load(&mut d, idx, 100, 0, t0);
    }
    assert!(d.tick(t0 + s(10) - Duration::from_millis(1)).is_empty());
    let now = t0 + s(10);
    assert_eq!(
        d.tick(now),
        vec![ejected(0, Reason::SuccessRate, now + s(30), 1)]
    );
    assert_eq!(d.stats().ejections(Reason::SuccessRate), 1);
}

#[test]
fn success_rate_needs_minimum_hosts_with_request_volume() {
    // One host's z-score is at most sqrt(n-1), so 5 hosts (0%, 4 x 100%)
    // are the fewest that can cross 1.9 stdev: require 6 here.
    let c = SuccessRateConfig {
        minimum_hosts: 6,
        ..SuccessRateConfig::default()
    };
    let t0 = Instant::now();
    for (last_volume, ejects) in [(99, false), (100, true)] {
        let mut d = OutlierDetector::new(sweep_cfg(Some(c.clone()), None), 6, t0);
        load(&mut d, 0, 0, 100, t0);
        for idx in 1..5 {
            load(&mut d, idx, 100, 0, t0);
        }
        load(&mut d, 5, last_volume, 0, t0);
        assert_eq!(
            !d.tick(t0 + s(10)).is_empty(),
            ejects,
            "volume {last_volume}"
        );
    }
}

#[test]
fn success_rate_ignores_outlier_below_request_volume() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(sweep_cfg(sr(), None), 6, t0);
    load(&mut d, 0, 49, 50, t0); // 99 requests
    for idx in 1..6 {
        load(&mut d, idx, 100, 0, t0);
    }
    assert!(d.tick(t0 + s(10)).is_empty());
}

#[test]
fn interval_counters_reset_after_each_sweep() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(sweep_cfg(sr(), None), 5, t0);
    for at in [0, 10] {
        let now = t0 + s(at);
        load(&mut d, 0, 25, 25, now);
        for idx in 1..5 {
            load(&mut d, idx, 50, 0, now);
        }
        assert!(
            d.tick(now + s(10)).is_empty(),
            "50 requests per interval only"
        );
    }
}

#[test]
fn failure_percentage_ejects_at_or_above_threshold_worst_first() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(sweep_cfg(None, fp()), 5, t0);
    load(&mut d, 0, 15, 85, t0); // exactly 85%
    load(&mut d, 1, 8, 42, t0); // 84%
    load(&mut d, 2, 7, 43, t0); // 86%
    load(&mut d, 3, 50, 0, t0);
    load(&mut d, 4, 50, 0, t0);
    let now = t0 + s(10);
    let expected = vec![
        ejected(2, Reason::FailurePercentage, now + s(30), 1),
        ejected(0, Reason::FailurePercentage, now + s(30), 1),
    ];
    assert_eq!(d.tick(now), expected);
    assert_eq!(d.stats().ejections(Reason::FailurePercentage), 2);
}

#[test]
fn failure_percentage_needs_minimum_hosts_and_skips_ejected_hosts() {
    let t0 = Instant::now();
    let mut c = sweep_cfg(None, fp());
    c.consecutive_local_origin_failures = 5;
    let mut d = OutlierDetector::new(c, 5, t0);
    assert_eq!(feed(&mut d, 0, LF, 5, t0).len(), 1); // ejected: not a valid host
    load(&mut d, 0, 50, 0, t0); // ignored while ejected
    load(&mut d, 1, 0, 50, t0);
    for idx in 2..5 {
        load(&mut d, idx, 50, 0, t0);
    }
    assert!(
        d.tick(t0 + s(10)).is_empty(),
        "4 valid hosts < minimumHosts 5"
    );
}

#[test]
fn sweep_respects_max_ejection_percent_worst_first() {
    let t0 = Instant::now();
    let mut c = sweep_cfg(None, fp());
    c.max_ejection_percent = 10.0;
    let mut d = OutlierDetector::new(c, 10, t0);
    load(&mut d, 0, 5, 45, t0); // 90%
    load(&mut d, 1, 0, 50, t0); // 100%: the worst goes first
    for idx in 2..10 {
        load(&mut d, idx, 50, 0, t0);
    }
    let now = t0 + s(10);
    let expected = vec![
        ejected(1, Reason::FailurePercentage, now + s(30), 1),
        Event::EjectionSkipped {
            idx: 0,
            reason: Reason::FailurePercentage,
        },
    ];
    assert_eq!(d.tick(now), expected);
}

#[test]
fn host_outlier_for_both_detectors_is_ejected_once() {
    let t0 = Instant::now();
    let mut d = OutlierDetector::new(sweep_cfg(sr(), fp()), 5, t0);
    load(&mut d, 0, 0, 100, t0);
    for idx in 1..5 {
        load(&mut d, idx, 100, 0, t0);
    }
    let now = t0 + s(10);
    assert_eq!(
        d.tick(now),
        vec![ejected(0, Reason::SuccessRate, now + s(30), 1)]
    );
}
