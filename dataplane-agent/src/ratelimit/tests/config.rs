//! Config parsing, defaults, serialization and unknown names.

use std::time::Duration;

use crate::ratelimit::{Action, Algorithm, DelayConfig, HeaderMatch, RateLimitConfig, RateLimiter};

const EXAMPLE: &str = r#"
algorithm: tokenBucket        # tokenBucket | fixedWindow | slidingWindow | leakyBucket
requestsPerSecond: 100
burst: 20
window: 1s
perPod: false
maxTrackedPods: 10000
action: reject
delay: {maxWait: 200ms, maxQueued: 100}
priorityClasses:
  - name: gold
    matchHeader: {name: x-priority, value: gold}
    share: 50
  - name: ops
    matchPods: [pod-uid-1, pod-uid-2]
    share: 12.5
"#;

pub(super) fn parse(yaml: &str) -> Result<RateLimitConfig, String> {
    serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
}

pub(super) fn error_of(yaml: &str) -> String {
    match parse(yaml) {
        Ok(cfg) => panic!("accepted invalid config {yaml}: {cfg:?}"),
        Err(e) => e,
    }
}

#[test]
fn parses_the_documented_example() {
    let cfg = parse(EXAMPLE).expect("valid");
    assert_eq!(cfg.algorithm, Algorithm::TokenBucket);
    assert_eq!((cfg.requests_per_second, cfg.burst), (100.0, Some(20)));
    assert_eq!(cfg.delay.max_wait, Duration::from_millis(200));
    assert_eq!(
        cfg.priority_classes[0].match_header,
        Some(HeaderMatch {
            name: "x-priority".into(),
            value: "gold".into(),
        })
    );
    assert_eq!(
        cfg.priority_classes[1].match_pods,
        ["pod-uid-1", "pod-uid-2"]
    );
    assert_eq!(cfg.priority_classes[1].share, 12.5);
    assert!(RateLimiter::new(&cfg).is_ok());
}

#[test]
fn empty_mapping_is_the_default() {
    let cfg = parse("{}").expect("valid");
    assert_eq!(cfg, RateLimitConfig::default());
    assert_eq!(cfg.algorithm, Algorithm::TokenBucket);
    assert_eq!(cfg.requests_per_second, 100.0);
    assert_eq!((cfg.burst, cfg.window), (None, Duration::from_secs(1)));
    assert_eq!(
        (cfg.per_pod, cfg.max_tracked_pods, cfg.action),
        (false, 10_000, Action::Reject)
    );
    assert_eq!(
        cfg.delay,
        DelayConfig {
            max_wait: Duration::from_millis(200),
            max_queued: 100
        }
    );
    assert_eq!(
        parse("delay: {}").expect("valid").delay,
        DelayConfig::default()
    );
}

#[test]
fn round_trips_through_yaml() {
    for yaml in [
        EXAMPLE,
        "{}",
        "{algorithm: leakyBucket, action: delay, perPod: true}",
    ] {
        let cfg = parse(yaml).expect("valid");
        let text = serde_yaml_ng::to_string(&cfg).expect("serializes");
        assert_eq!(parse(&text), Ok(cfg), "{text}");
    }
}

#[test]
fn every_algorithm_and_action_name_parses() {
    for (name, algorithm) in [
        ("tokenBucket", Algorithm::TokenBucket),
        ("fixedWindow", Algorithm::FixedWindow),
        ("slidingWindow", Algorithm::SlidingWindow),
        ("leakyBucket", Algorithm::LeakyBucket),
    ] {
        let cfg = parse(&format!("{{algorithm: {name}, action: delay}}")).expect("valid");
        assert_eq!((cfg.algorithm, cfg.action), (algorithm, Action::Delay));
    }
}

#[test]
fn rejects_unknown_algorithm_and_action() {
    assert!(error_of("algorithm: tokenbucket").contains("unknown variant `tokenbucket`"));
    assert!(error_of("action: drop").contains("unknown variant `drop`"));
}

#[test]
fn rejects_unknown_fields_at_every_level() {
    assert!(error_of("burts: 5").contains("unknown field `burts`"));
    assert!(error_of("delay: {maxwait: 1s}").contains("unknown field `maxwait`"));
    let class = "priorityClasses: [{name: a, matchPods: [p], share: 5, weight: 1}]";
    assert!(error_of(class).contains("unknown field `weight`"));
    let header =
        "priorityClasses: [{name: a, matchHeader: {name: h, value: v, regex: x}, share: 5}]";
    assert!(error_of(header).contains("unknown field `regex`"));
}
