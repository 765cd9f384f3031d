use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<MeshConfig, String> {
    MeshConfig::parse(text, Path::new("mesh.yaml")).map_err(|e| e.to_string())
}

const GOOD: &str = "\
services:
  - name: echo
    vip: 198.19.0.10:80
    trafficPolicy:
      timeouts: {connect: 250ms}
    endpoints:
      - address: 198.18.0.11:8080
      - address: 198.18.0.12:8080
pods:
  - uid: 0b6c-11
    name: client
";

#[test]
fn parses_a_complete_config() {
    let cfg = parse(GOOD).expect("valid");
    let svc = &cfg.services[0];
    assert_eq!(svc.namespace, "default");
    assert_eq!(svc.vip, "198.19.0.10:80".parse().unwrap());
    assert_eq!(
        svc.traffic_policy.timeouts.connect,
        Duration::from_millis(250)
    );
    assert_eq!(svc.endpoints.len(), 2);
    assert_eq!(cfg.pods[0].uid, "0b6c-11");
}

#[test]
fn defaults_apply() {
    let cfg = parse("services:\n  - name: a\n    vip: 198.19.0.1:1\n").expect("valid");
    assert_eq!(cfg.services[0].traffic_policy, TrafficPolicy::default());
    assert_eq!(cfg.services[0].protocol, Protocol::Auto);
    assert!(cfg.services[0].endpoints.is_empty());
    assert!(cfg.pods.is_empty());
}

fn assert_error(text: &str, wants: &[&str]) {
    let err = parse(text).expect_err("must be rejected");
    for want in wants {
        assert!(err.contains(want), "error {err:?} should contain {want:?}");
    }
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let text = GOOD.replace("{connect: 250ms}", "{conect: 250ms}");
    assert_error(
        &text,
        &[
            "services[0].trafficPolicy.timeouts",
            "unknown field `conect`",
            "line 5",
        ],
    );
}

#[test]
fn wrong_type_is_named_with_its_line() {
    let text = GOOD.replace("  - uid: 0b6c-11", "  - uid: [1, 2]");
    assert_error(&text, &["pods[0].uid", "line 10"]);
}

#[test]
fn invalid_address_is_named_with_its_line() {
    let text = GOOD.replace("198.18.0.12:8080", "198.18.0.312:8080");
    assert_error(&text, &["services[0].endpoints[1].address", "line 8"]);
}

#[test]
fn semantic_errors_name_the_field() {
    assert_error(
        &GOOD.replace("250ms", "0s"),
        &["timeouts.connect", "line 5"],
    );
    assert_error(
        &GOOD.replace("250ms", "soon"),
        &["timeouts.connect", "line 5"],
    );
    let weightless = GOOD.replace(
        ":8080\n      - address",
        ":8080\n        weight: 0\n      - address",
    );
    assert_error(&weightless, &["endpoints[0].weight", "line"]);
    let dup = "services:\n  - {name: a, vip: 198.19.0.1:80}\n  - {name: b, vip: 198.19.0.1:80}\n";
    assert_error(dup, &["services[1].vip", "used by another service"]);
    assert_error("pods:\n  - uid: a\n  - uid: a\n", &["pods[1].uid", "twice"]);
}

fn policy_of(yaml_policy: &str) -> TrafficPolicy {
    let text = format!(
        "services:\n  - name: a\n    vip: 198.19.0.1:1\n    trafficPolicy: {yaml_policy}\n"
    );
    parse(&text)
        .expect("valid")
        .services
        .remove(0)
        .traffic_policy
        .clone()
}

#[test]
fn outlier_detection_is_on_unless_set_to_null() {
    let on = policy_of("{}");
    assert_eq!(
        on.outlier_detection,
        Some(crate::health::OutlierDetectionConfig::default())
    );
    let off = policy_of("{outlierDetection: null}");
    assert_eq!(off.outlier_detection, None);
    // What /config_dump prints reads back as the same policy.
    for policy in [on, off] {
        let dumped = serde_yaml_ng::to_string(&policy).expect("serializes");
        let back: TrafficPolicy = serde_yaml_ng::from_str(&dumped).expect("reads back");
        assert_eq!(back, policy, "{dumped}");
    }
}

#[test]
fn per_try_timeout_defaults_to_a_share_of_the_request_timeout() {
    let secs = Duration::from_secs;
    assert_eq!(policy_of("{}").per_try_timeout(), Some(secs(5)));
    assert_eq!(
        policy_of("{retries: {attempts: 0}}").per_try_timeout(),
        Some(secs(15))
    );
    assert_eq!(
        policy_of("{retries: {attempts: 4}, timeouts: {request: 10s}}").per_try_timeout(),
        Some(secs(2))
    );
    assert_eq!(
        policy_of("{retries: {perTryTimeout: 300ms}}").per_try_timeout(),
        Some(Duration::from_millis(300))
    );
    assert_eq!(
        policy_of("{retries: {perTryTimeout: 0s}}").per_try_timeout(),
        None
    );
    assert_eq!(
        policy_of("{timeouts: {request: 0s}}").per_try_timeout(),
        None
    );
}
