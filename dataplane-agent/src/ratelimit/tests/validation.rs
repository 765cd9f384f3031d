//! Config validation: every rule, its message, and where the parser reports it.

use super::config::{error_of, parse};
use crate::ratelimit::{ConfigError, PriorityClass, RateLimitConfig, RateLimiter};

#[test]
fn rejects_non_positive_or_non_finite_rates() {
    for rate in ["0", "-1", ".nan", ".inf"] {
        let e = error_of(&format!("requestsPerSecond: {rate}"));
        assert!(
            e.starts_with("requestsPerSecond: must be a finite number > 0"),
            "{e}"
        );
    }
}

#[test]
fn rejects_shares_summing_to_100_or_more() {
    let yaml = "priorityClasses: [{name: a, matchPods: [p], share: 60}, \
                {name: b, matchHeader: {name: h, value: v}, share: 40}]";
    let e = error_of(yaml);
    assert!(
        e.starts_with("priorityClasses: shares must sum to less than 100 (got 100)"),
        "{e}"
    );
    let just_below = yaml.replace("share: 40", "share: 39.5");
    assert!(parse(&just_below).is_ok());
}

fn assert_error_starts_with(yaml: &str, expected: &str) {
    let e = error_of(yaml);
    // serde_yaml_ng prefixes class errors with the path of the enclosing sequence.
    let e = e.strip_prefix("priorityClasses: ").unwrap_or(&e);
    assert!(
        e.starts_with(expected),
        "{yaml}: got {e:?}, want {expected:?}"
    );
}

#[test]
fn invalid_top_level_values_are_reported_with_the_field_name_first() {
    for (yaml, expected) in [
        ("burst: 0", "burst: must be >= 1"),
        ("window: 0s", "window: must be > 0"),
        ("maxTrackedPods: 0", "maxTrackedPods: must be >= 1"),
        (
            "{action: delay, delay: {maxWait: 0s}}",
            "delay.maxWait: must be > 0",
        ),
        (
            "{action: delay, delay: {maxQueued: 0}}",
            "delay.maxQueued: must be >= 1",
        ),
        (
            "{algorithm: fixedWindow, requestsPerSecond: 10, window: 50ms}",
            "window: requestsPerSecond * window gives class `default` less than 1",
        ),
    ] {
        assert_error_starts_with(yaml, expected);
    }
    // The delay bounds only matter, and are only checked, with action delay.
    assert!(parse("delay: {maxWait: 0s, maxQueued: 0}").is_ok());
}

#[test]
fn invalid_class_values_are_reported_with_the_field_name_first() {
    for (class, expected) in [
        ("matchPods: [p], share: 5", "name: must not be empty"),
        (
            "name: default, matchPods: [p], share: 5",
            "name: `default` is reserved",
        ),
        ("name: a, share: 5", "matchHeader: exactly one of"),
        (
            "name: a, matchPods: [p], matchHeader: {name: h, value: v}, share: 5",
            "matchHeader: exactly one of",
        ),
        (
            "name: a, matchHeader: {value: v}, share: 5",
            "matchHeader.name: must not",
        ),
        (
            "name: a, matchPods: [''], share: 5",
            "matchPods: pod ids must not be empty",
        ),
        ("name: a, matchPods: [p]", "share: must be > 0 and < 100"),
        (
            "name: a, matchPods: [p], share: 100",
            "share: must be > 0 and < 100",
        ),
    ] {
        assert_error_starts_with(&format!("priorityClasses: [{{{class}}}]"), expected);
    }
}

#[test]
fn window_limits_are_checked_per_class_for_window_algorithms_only() {
    let small_class = "{algorithm: slidingWindow, requestsPerSecond: 10, \
                       priorityClasses: [{name: tiny, matchPods: [p], share: 5}]}";
    assert!(
        error_of(small_class).starts_with("window: requestsPerSecond * window gives class `tiny`")
    );
    assert!(parse(&small_class.replace("slidingWindow", "tokenBucket")).is_ok());
}

#[test]
fn duplicate_class_names_are_rejected() {
    let yaml = "priorityClasses: [{name: a, matchPods: [p], share: 5}, \
                {name: a, matchPods: [q], share: 5}]";
    assert!(error_of(yaml).starts_with("priorityClasses[1].name: duplicate class name `a`"));
}

/// How the product embeds the config: a service's traffic policy inside a list of services.
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Service {
    #[serde(rename = "trafficPolicy")]
    traffic_policy: TrafficPolicy,
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct TrafficPolicy {
    #[serde(rename = "rateLimit")]
    rate_limit: RateLimitConfig,
}

#[test]
fn errors_carry_the_yaml_path_and_line_when_embedded() {
    let parse_services = |yaml: &str| match serde_yaml_ng::from_str::<Vec<Service>>(yaml) {
        Ok(_) => panic!("accepted {yaml}"),
        Err(e) => e.to_string(),
    };
    let e = parse_services("- trafficPolicy:\n    rateLimit:\n      burst: 0\n");
    assert_eq!(
        e,
        ".[0].trafficPolicy: burst: must be >= 1 at line 2 column 5"
    );
    let yaml = "- trafficPolicy:\n    rateLimit:\n      priorityClasses:\n        - name: gold\n";
    let e = parse_services(yaml);
    assert!(
        e.starts_with(".[0].trafficPolicy.rateLimit.priorityClasses: matchHeader: "),
        "{e}"
    );
    assert!(e.ends_with("at line 4 column 9"), "{e}");
}

#[test]
fn rate_limiter_new_revalidates_configs_built_in_code() {
    let cfg = RateLimitConfig {
        requests_per_second: -5.0,
        ..RateLimitConfig::default()
    };
    let e = RateLimiter::new(&cfg).expect_err("invalid");
    assert_eq!(
        e,
        ConfigError {
            field: "requestsPerSecond".into(),
            reason: "must be a finite number > 0".into()
        }
    );
    let cfg = RateLimitConfig {
        priority_classes: vec![PriorityClass {
            name: "a".into(),
            share: 5.0,
            ..PriorityClass::default()
        }],
        ..RateLimitConfig::default()
    };
    let e = RateLimiter::new(&cfg).expect_err("invalid");
    assert_eq!(
        e.to_string(),
        "priorityClasses[0].matchHeader: exactly one of matchHeader and matchPods must be set"
    );
}
