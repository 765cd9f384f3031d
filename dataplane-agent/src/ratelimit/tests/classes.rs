//! Priority classes, classification and per-pod keying.

use std::time::{Duration, Instant};

use super::{MS, SEC, limiter};
use crate::ratelimit::{ClassStats, Decision, HeaderLookup, Request};

const PRIORITY: &str = r#"
requestsPerSecond: 100
burst: 20
priorityClasses:
  - name: gold
    matchHeader: {name: X-Priority, value: gold}
    share: 25
  - name: ops
    matchPods: [pod-ops]
    share: 10
"#;

#[test]
fn classify_takes_the_first_matching_class_in_config_order_else_default() {
    let rl = limiter(PRIORITY);
    let names: Vec<&str> = rl.class_names().collect();
    assert_eq!(names, ["gold", "ops", "default"]);
    let gold = [("x-priority", "gold")];
    let shouting = [("X-PRIORITY", "gold")];
    let wrong_case_value = [("x-priority", "Gold")];
    assert_eq!(rl.classify(&Request::http(None, &gold)), 0);
    assert_eq!(
        rl.classify(&Request::http(None, &shouting)),
        0,
        "names are case-insensitive"
    );
    assert_eq!(
        rl.classify(&Request::http(None, &wrong_case_value)),
        2,
        "values are exact"
    );
    assert_eq!(rl.classify(&Request::http(Some("pod-ops"), &())), 1);
    assert_eq!(
        rl.classify(&Request::http(Some("pod-ops"), &gold)),
        0,
        "first match wins"
    );
    assert_eq!(rl.classify(&Request::tcp(Some("pod-ops"))), 1);
    assert_eq!(rl.classify(&Request::tcp(Some("pod-x"))), 2);
    assert_eq!(rl.classify(&Request::tcp(None)), 2);
}

/// A header map that, like a raw HTTP/2 header block, only knows lowercase names.
struct LowercaseOnly;

impl HeaderLookup for LowercaseOnly {
    fn header(&self, name: &str) -> Option<&str> {
        (name == "x-priority").then_some("gold")
    }
}

#[test]
fn configured_header_names_are_looked_up_lowercased() {
    let rl = limiter(PRIORITY);
    assert_eq!(rl.classify(&Request::http(None, &LowercaseOnly)), 0);
}

#[test]
fn gold_gets_all_its_requests_while_default_is_flooded_at_10r() {
    let rl = limiter(
        "{requestsPerSecond: 100, priorityClasses: \
         [{name: gold, matchHeader: {name: x-priority, value: gold}, share: 50}]}",
    );
    let gold_headers = [("x-priority", "gold")];
    let gold = Request::http(Some("pod-g"), &gold_headers);
    let other = Request::http(Some("pod-d"), &());
    let t0 = Instant::now();
    let (mut gold_ok, mut default_ok) = (0u64, 0u64);
    // 5 s of default traffic at 1000/s (10R) and gold at 40/s (80% of its 50/s share).
    for ms in 0..5000u32 {
        let now = t0 + MS * ms;
        default_ok += u64::from(rl.check(&other, now).is_allow());
        if ms % 25 == 0 {
            gold_ok += u64::from(rl.check(&gold, now).is_allow());
        }
    }
    assert_eq!(gold_ok, 200, "every gold request admitted");
    // Default: its 50/s for 5 s plus its scaled burst of 50.
    assert!(
        (225..=300).contains(&default_ok),
        "default admitted {default_ok}"
    );
    let stats = |i| rl.stats(i).unwrap_or_default();
    assert_eq!(
        stats(0),
        ClassStats {
            allowed: 200,
            ..ClassStats::default()
        }
    );
    assert_eq!(stats(1).allowed, default_ok);
    assert_eq!(stats(1).rejected, 5000 - default_ok);
}

#[test]
fn class_rates_and_bursts_scale_with_the_share() {
    let rl = limiter(PRIORITY);
    let gold_headers = [("x-priority", "gold")];
    let gold = Request::http(None, &gold_headers);
    let other = Request::tcp(None);
    let t0 = Instant::now();
    let back_to_back = |req: &Request<'_>| {
        (0..100)
            .take_while(|_| rl.check(req, t0).is_allow())
            .count()
    };
    // burst 20: gold 25% -> 5, default 65% -> 13.
    assert_eq!(back_to_back(&gold), 5);
    assert_eq!(back_to_back(&other), 13);
    // Rates: gold 25/s -> 40ms per token, default 65/s.
    assert_eq!(rl.check(&gold, t0).retry_after(), Some(40 * MS));
    let default_retry = rl.check(&other, t0).retry_after();
    assert_eq!(default_retry, Some(Duration::from_nanos(15_384_616)));
}

#[test]
fn per_pod_limiters_are_isolated() {
    let rl = limiter("{requestsPerSecond: 10, burst: 2, perPod: true}");
    let t0 = Instant::now();
    let a = Request::tcp(Some("pod-a"));
    let b = Request::tcp(Some("pod-b"));
    let anonymous = Request::tcp(None);
    for req in [&a, &b, &anonymous] {
        assert!(rl.check(req, t0).is_allow());
        assert!(rl.check(req, t0).is_allow());
        assert!(
            matches!(rl.check(req, t0), Decision::Reject { .. }),
            "{req:?}"
        );
    }
    assert_eq!(
        rl.tracked_pods(),
        2,
        "requests without a pod id share one limiter"
    );
}

#[test]
fn per_pod_state_is_bounded_by_evicting_the_least_recently_used_pod() {
    let rl = limiter("{requestsPerSecond: 1, burst: 1, perPod: true, maxTrackedPods: 2}");
    let t0 = Instant::now();
    let pod = |id| Request::tcp(Some(id));
    assert!(rl.check(&pod("a"), t0).is_allow());
    assert!(rl.check(&pod("b"), t0).is_allow());
    assert!(
        !rl.check(&pod("a"), t0).is_allow(),
        "a is remembered, and now most recent"
    );
    assert!(rl.check(&pod("c"), t0).is_allow(), "c evicts b");
    assert_eq!(rl.tracked_pods(), 2);
    assert!(!rl.check(&pod("a"), t0).is_allow(), "a was not evicted");
    assert!(
        rl.check(&pod("b"), t0).is_allow(),
        "b starts over with a full bucket"
    );
    for i in 0..1000 {
        let id = format!("churn-{i}");
        let _ = rl.check(&Request::tcp(Some(&id)), t0 + SEC);
    }
    assert_eq!(rl.tracked_pods(), 2);
}

#[test]
fn per_pod_limiters_are_kept_per_class() {
    let rl = limiter(
        "{requestsPerSecond: 10, burst: 2, perPod: true, maxTrackedPods: 5, \
         priorityClasses: [{name: ops, matchPods: [pod-ops], share: 50}]}",
    );
    let t0 = Instant::now();
    assert!(rl.check(&Request::tcp(Some("pod-ops")), t0).is_allow());
    assert!(
        !rl.check(&Request::tcp(Some("pod-ops")), t0).is_allow(),
        "ops: 50% of burst 2"
    );
    assert!(rl.check(&Request::tcp(Some("pod-x")), t0).is_allow());
    assert_eq!(rl.tracked_pods(), 2);
}
