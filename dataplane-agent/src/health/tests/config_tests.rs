//! Config parsing: defaults, the documented example, rejected values.

use super::*;

fn parse(yaml: &str) -> Result<OutlierDetectionConfig, String> {
    serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
}

#[test]
fn empty_mapping_gives_documented_defaults() {
    let c = parse("{}").unwrap();
    assert_eq!(c, OutlierDetectionConfig::default());
    assert_eq!(c.consecutive_5xx_errors, 5);
    assert_eq!(c.consecutive_gateway_errors, 0);
    assert_eq!(c.consecutive_local_origin_failures, 5);
    assert_eq!(c.interval, s(10));
    assert_eq!(c.base_ejection_time, s(5));
    assert_eq!(c.max_ejection_time, s(300));
    assert_eq!(c.max_ejection_percent, 10.0);
    assert!(
        c.always_eject_one_host,
        "on by default: small services eject"
    );
    assert_eq!(c.success_rate, None);
    assert_eq!(c.failure_percentage, None);
    assert_eq!(
        c.half_open,
        HalfOpenConfig {
            probe_requests: 3,
            successes_to_close: 3,
            probe_timeout: s(30)
        }
    );
}

#[test]
fn full_example_parses() {
    let c = parse(
        "consecutive5xxErrors: 7\nconsecutiveGatewayErrors: 2\nconsecutiveLocalOriginFailures: 0\n\
         interval: 250ms\nbaseEjectionTime: 15s\nmaxEjectionTime: 2m\nmaxEjectionPercent: 33.5\n\
         alwaysEjectOneHost: false\n\
         successRate: {minimumHosts: 3, requestVolume: 20, stdevFactor: 1.0}\n\
         failurePercentage: {threshold: 60, minimumHosts: 4, requestVolume: 10}\n\
         halfOpen: {probeRequests: 1, successesToClose: 5, probeTimeout: 5s}\n",
    )
    .unwrap();
    assert_eq!(c.consecutive_5xx_errors, 7);
    assert_eq!(c.consecutive_gateway_errors, 2);
    assert_eq!(c.consecutive_local_origin_failures, 0);
    assert_eq!(c.interval, Duration::from_millis(250));
    assert_eq!(c.max_ejection_time, s(120));
    assert_eq!(c.max_ejection_percent, 33.5);
    assert!(!c.always_eject_one_host);
    let sr = SuccessRateConfig {
        minimum_hosts: 3,
        request_volume: 20,
        stdev_factor: 1.0,
    };
    assert_eq!(c.success_rate, Some(sr));
    let fp = FailurePercentageConfig {
        threshold: 60.0,
        minimum_hosts: 4,
        request_volume: 10,
    };
    assert_eq!(c.failure_percentage, Some(fp));
    assert_eq!(c.half_open.probe_timeout, s(5));
}

#[test]
fn nested_sections_default_their_fields() {
    let c = parse("successRate: {}\nfailurePercentage: {}\nhalfOpen: {}").unwrap();
    assert_eq!(
        c.success_rate,
        Some(SuccessRateConfig {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9
        })
    );
    assert_eq!(
        c.failure_percentage,
        Some(FailurePercentageConfig {
            threshold: 85.0,
            minimum_hosts: 5,
            request_volume: 50
        })
    );
}

#[test]
fn max_ejection_time_defaults_to_larger_of_300s_and_base() {
    assert_eq!(
        parse("baseEjectionTime: 10m").unwrap().max_ejection_time,
        s(600)
    );
    assert_eq!(
        parse("baseEjectionTime: 1s").unwrap().max_ejection_time,
        s(300)
    );
}

#[test]
fn invalid_values_are_rejected_with_field_name() {
    let cases = [
        (
            "maxEjectionPercent: 101",
            "maxEjectionPercent: must be <= 100",
        ),
        (
            "maxEjectionPercent: -1",
            "maxEjectionPercent: must be a number >= 0",
        ),
        ("baseEjectionTime: 0s", "baseEjectionTime: must be > 0"),
        ("interval: 0s", "interval: must be > 0"),
        (
            "maxEjectionTime: 10s\nbaseEjectionTime: 20s",
            "maxEjectionTime: must be >= baseEjectionTime",
        ),
        ("maxEjectionTime: 400d", "maxEjectionTime: must be <= 365d"),
        (
            "halfOpen: {probeRequests: 0}",
            "probeRequests: must be >= 1",
        ),
        ("halfOpen: {probeTimeout: 0s}", "probeTimeout: must be > 0"),
        (
            "failurePercentage: {threshold: 100.5}",
            "threshold: must be <= 100",
        ),
        (
            "successRate: {stdevFactor: -0.1}",
            "stdevFactor: must be a number >= 0",
        ),
        ("consecutive5xx: 3", "unknown field"),
        ("halfOpen: {probes: 3}", "unknown field"),
        ("interval: 10", "expected a duration"),
    ];
    for (yaml, want) in cases {
        let err = parse(yaml).expect_err(yaml);
        assert!(err.contains(want), "{yaml:?}: {err}");
    }
}

#[test]
fn serialization_round_trips() {
    let c = OutlierDetectionConfig {
        success_rate: Some(SuccessRateConfig::default()),
        failure_percentage: Some(FailurePercentageConfig::default()),
        ..OutlierDetectionConfig::default()
    };
    let yaml = serde_yaml_ng::to_string(&c).unwrap();
    assert!(yaml.contains("consecutive5xxErrors: 5"), "{yaml}");
    assert!(yaml.contains("baseEjectionTime: 5s"), "{yaml}");
    assert_eq!(parse(&yaml).unwrap(), c);
}

#[test]
fn nested_errors_report_the_yaml_path_and_line() {
    let err = parse("interval: 5s\nhalfOpen:\n  probeRequests: 0\n").expect_err("invalid");
    assert_eq!(
        err,
        "halfOpen: probeRequests: must be >= 1 at line 3 column 3"
    );
}
