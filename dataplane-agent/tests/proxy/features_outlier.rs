//! Outlier detection through the real proxy, in-process on loopback: what
//! each consecutive-error detector counts (HTTP and opaque TCP), the
//! success-rate and failure-percentage sweeps (which need `minimumHosts`
//! endpoints), ejection time growing with each ejection, the
//! `maxEjectionPercent` rule, and the half-open state: a bounded number of
//! probes, then restoration to a full share. Every service here balances
//! round robin (see [`policy`]), so who gets which request is exact.

use crate::support;

use std::net::SocketAddrV4;
use std::time::Duration;

use dataplane_agent::state::NodeContext;
use http::StatusCode;
use support::{
    Backend, Mode, TestProxy, bounded, client, config, config_with, endpoint, failures, get_with,
    load,
};

/// `support::policy` with round robin added unless a section sets the
/// balancer itself: the default (least request) picks at random among
/// idle endpoints, and these tests count hits per endpoint.
fn policy(sections: &[&str]) -> String {
    let mut all = sections.to_vec();
    if !all.iter().any(|s| s.starts_with("loadBalancer")) {
        all.push("loadBalancer: {algorithm: roundRobin}");
    }
    support::policy(&all)
}
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Outlier events of `kind` (`ejected`, `half_open`, `restored`,
/// `ejection_skipped`), for one endpoint and reason if given.
fn events(proxy: &TestProxy, kind: &str, reason: &str, endpoint: Option<SocketAddrV4>) -> f64 {
    let kind = format!("event=\"{kind}\"");
    let reason = format!("reason=\"{reason}\"");
    let endpoint = endpoint.map(|e| format!("endpoint=\"{e}\""));
    let mut filters = vec![kind.as_str()];
    if !reason.ends_with("=\"\"") {
        filters.push(&reason);
    }
    if let Some(e) = &endpoint {
        filters.push(e);
    }
    proxy.metric("dataplane_policy_outlier_events_total", &filters)
}

fn ejected(proxy: &TestProxy) -> f64 {
    events(proxy, "ejected", "", None)
}

async fn sequential(proxy: &TestProxy, n: usize) {
    let client = client(false);
    for _ in 0..n {
        get_with(&client, proxy, &[]).await;
    }
}

/// Only the named detector on; long ejections, so one ejection shows.
fn only(detector: &str) -> String {
    let all = [
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
        "consecutiveLocalOriginFailures",
    ];
    let fields: Vec<String> = all
        .iter()
        .map(|d| format!("{d}: {}", if *d == detector { 3 } else { 0 }))
        .collect();
    format!("outlierDetection: {{{}}}", fields.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consecutive_detector_counts_its_own_failures() {
    bounded(async {
        // (detector at 3, how the bad endpoint fails, ejected for what)
        let cases = [
            ("consecutive5xxErrors", Some(500), Some("consecutive_5xx")),
            ("consecutive5xxErrors", Some(503), Some("consecutive_5xx")),
            ("consecutive5xxErrors", None, None),
            (
                "consecutiveGatewayErrors",
                Some(502),
                Some("consecutive_gateway_errors"),
            ),
            ("consecutiveGatewayErrors", Some(500), None),
            (
                "consecutiveGatewayErrors",
                None,
                Some("consecutive_gateway_errors"),
            ),
            ("consecutiveLocalOriginFailures", Some(503), None),
            (
                "consecutiveLocalOriginFailures",
                None,
                Some("consecutive_local_origin_failures"),
            ),
        ];
        for (detector, status, reason) in cases {
            // `None`: the endpoint refuses connections (killed).
            let bad = Backend::start("bad", Mode::Status(status.unwrap_or(503))).await;
            if status.is_none() {
                bad.kill();
            }
            let good = [
                Backend::start("good-1", Mode::Ok).await,
                Backend::start("good-2", Mode::Ok).await,
            ];
            // Round robin, so a bad endpoint not ejected keeps exactly its third.
            let extra = policy(&[&only(detector)]);
            let proxy = TestProxy::start(&config(&[&bad, &good[0], &good[1]], &extra)).await;
            sequential(&proxy, 30).await;
            let case = format!("{detector} with {status:?}");
            match reason {
                Some(reason) => {
                    assert_eq!(
                        events(&proxy, "ejected", reason, Some(bad.addr)),
                        1.0,
                        "{case}: {}",
                        proxy.metrics()
                    );
                    assert_eq!(ejected(&proxy), 1.0, "{case}: only the bad one");
                    if status.is_some() {
                        assert_eq!(bad.hits(), 3, "{case}: ejected after exactly 3");
                    }
                }
                None => {
                    assert_eq!(ejected(&proxy), 0.0, "{case}: {}", proxy.metrics());
                    if status.is_some() {
                        assert!(bad.hits() >= 9, "{case}: kept its share: {}", bad.hits());
                    }
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_failures_eject_as_local_origin_failures() {
    bounded(async {
        let bad = Backend::start("bad", Mode::Ok).await;
        bad.kill();
        let good = Backend::start("good", Mode::Ok).await;
        let endpoints = [endpoint(&bad, ""), endpoint(&good, "")];
        let extra = policy(&[&only("consecutiveLocalOriginFailures")]);
        let proxy = TestProxy::start(&config_with("tcp", &endpoints, &extra)).await;
        for i in 0..12 {
            // Opaque bytes: an HTTP exchange the proxy only splices.
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await.unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"), "connection {i}");
        }
        assert_eq!(
            events(
                &proxy,
                "ejected",
                "consecutive_local_origin_failures",
                Some(bad.addr)
            ),
            1.0,
            "{}",
            proxy.metrics()
        );
        assert_eq!(good.hits(), 12);
    })
    .await
}

/// Drives closed-loop load (bad answers 500, never retried) until an
/// ejection happens or `limit` passes.
async fn load_until_ejection(proxy: &TestProxy, limit: Duration) {
    let start = std::time::Instant::now();
    while ejected(proxy) == 0.0 && start.elapsed() < limit {
        load(proxy, 4, 25).await;
    }
}

/// `n` endpoints of which the first always answers 500, under `detector`
/// (success rate or failure percentage) with a 300 ms sweep.
async fn statistical(detector: &str, n: usize) -> (TestProxy, Vec<Backend>) {
    let mut all = vec![Backend::start("bad", Mode::Status(500)).await];
    for i in 1..n {
        all.push(Backend::start(&format!("good-{i}"), Mode::Ok).await);
    }
    let od = format!(
        "outlierDetection: {{consecutive5xxErrors: 0, consecutiveGatewayErrors: 0, consecutiveLocalOriginFailures: 0, interval: 300ms, maxEjectionPercent: 100, {detector}}}"
    );
    let yaml = config(&all.iter().collect::<Vec<_>>(), &policy(&[&od]));
    // The agent's runtime: its ticker runs the sweeps.
    let proxy = TestProxy::start_agent(&yaml, NodeContext::default()).await;
    (proxy, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_ejects_the_outlier_once_minimum_hosts_have_volume() {
    bounded(async {
        let detector = "successRate: {minimumHosts: 5, requestVolume: 10}";
        let (proxy, all) = statistical(detector, 6).await;
        load_until_ejection(&proxy, Duration::from_secs(5)).await;
        assert_eq!(
            events(&proxy, "ejected", "success_rate", Some(all[0].addr)),
            1.0,
            "{}",
            proxy.metrics()
        );
        assert_eq!(ejected(&proxy), 1.0, "the 100 % hosts stay");
        // Below minimumHosts nothing is ejected, however bad.
        let (proxy, all) = statistical(detector, 4).await;
        load_until_ejection(&proxy, Duration::from_millis(1500)).await;
        assert_eq!(ejected(&proxy), 0.0, "{}", proxy.metrics());
        assert!(all[0].hits() >= 40, "the sweeps had volume");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_percentage_ejects_above_its_threshold_once_minimum_hosts_have_volume() {
    bounded(async {
        let detector = "failurePercentage: {threshold: 50, minimumHosts: 5, requestVolume: 10}";
        let (proxy, all) = statistical(detector, 5).await;
        load_until_ejection(&proxy, Duration::from_secs(5)).await;
        assert_eq!(
            events(&proxy, "ejected", "failure_percentage", Some(all[0].addr)),
            1.0,
            "{}",
            proxy.metrics()
        );
        assert_eq!(ejected(&proxy), 1.0, "the 0 % hosts stay");
        let (proxy, all) = statistical(detector, 4).await;
        load_until_ejection(&proxy, Duration::from_millis(1500)).await;
        assert_eq!(ejected(&proxy), 0.0, "{}", proxy.metrics());
        assert!(all[0].hits() >= 40, "the sweeps had volume");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failed_probe_ejects_for_longer() {
    bounded(async {
        let bad = Backend::start("bad", Mode::Status(503)).await;
        let good = [
            Backend::start("good-1", Mode::Ok).await,
            Backend::start("good-2", Mode::Ok).await,
        ];
        let extra = policy(&[
            "outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 200ms, halfOpen: {probeRequests: 1}}",
        ]);
        // The agent's runtime: its ticker reports the half-open events.
        let yaml = config(&[&bad, &good[0], &good[1]], &extra);
        let proxy = TestProxy::start_agent(&yaml, NodeContext::default()).await;
        let client = client(false);
        // Steady sequential traffic; the bad endpoint only sees the first
        // request and then one probe per ejection end.
        let drive = async {
            while bad.hits() < 4 {
                let reply = get_with(&client, &proxy, &[]).await;
                assert_eq!(reply.status, StatusCode::OK, "retried elsewhere");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        };
        let done = tokio::time::timeout(Duration::from_secs(5), drive).await;
        assert!(done.is_ok(), "bad got {} requests", bad.hits());
        let at = bad.arrivals();
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // base x 1, x 2, x 3: each ejection longer than the one before.
        for (i, gap) in gaps.iter().take(3).enumerate() {
            let ejection = Duration::from_millis(200) * (i as u32 + 1);
            assert!(
                *gap >= ejection - Duration::from_millis(5),
                "ejection {}: the next probe came after {gap:?}, before {ejection:?} ({gaps:?})",
                i + 1
            );
        }
        assert!(events(&proxy, "ejected", "probe_failed", Some(bad.addr)) >= 2.0);
        assert!(events(&proxy, "half_open", "", Some(bad.addr)) >= 2.0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_is_respected() {
    bounded(async {
        // (endpoints, bad ones, outlier detection, ejections expected)
        let cases = [
            (3, 1, "alwaysEjectOneHost: false", 0.0),
            (3, 1, "alwaysEjectOneHost: true", 1.0),
            (3, 2, "alwaysEjectOneHost: true", 1.0),
            (4, 3, "maxEjectionPercent: 50", 2.0),
            (4, 3, "maxEjectionPercent: 75", 3.0),
        ];
        for (n, bad, rule, expected) in cases {
            let mut all = Vec::new();
            for i in 0..n {
                let mode = if i < bad { Mode::Status(503) } else { Mode::Ok };
                all.push(Backend::start(&format!("b{i}"), mode).await);
            }
            let od = format!("outlierDetection: {{consecutive5xxErrors: 1, {rule}}}");
            let lb = "loadBalancer: {panicThreshold: 0, algorithm: roundRobin}";
            let extra = policy(&[&od, lb]);
            let proxy = TestProxy::start(&config(&all.iter().collect::<Vec<_>>(), &extra)).await;
            sequential(&proxy, 40).await;
            let case = format!("{bad} bad of {n} with {rule}");
            assert_eq!(ejected(&proxy), expected, "{case}: {}", proxy.metrics());
            if (expected as usize) < bad {
                assert!(
                    events(&proxy, "ejection_skipped", "", None) >= 1.0,
                    "{case}: {}",
                    proxy.metrics()
                );
                let left: usize = all[..bad].iter().map(Backend::hits).sum();
                assert!(left >= 8, "{case}: the bad ones not ejected kept traffic");
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_endpoint_gets_at_most_probe_requests_at_once() {
    bounded(async {
        for successes_to_close in [1000, 0] {
            let bad = Backend::start("bad", Mode::Status(503)).await;
            let good = [
                Backend::start("good-1", Mode::Ok).await,
                Backend::start("good-2", Mode::Ok).await,
            ];
            let od = format!(
                "outlierDetection: {{consecutive5xxErrors: 1, baseEjectionTime: 200ms, halfOpen: {{probeRequests: 2, successesToClose: {successes_to_close}}}}}"
            );
            // Round robin: least request would itself keep callers off
            // the slow endpoint, hiding what the control shows.
            let lb = "loadBalancer: {algorithm: roundRobin}";
            let proxy =
                TestProxy::start(&config(&[&bad, &good[0], &good[1]], &policy(&[&od, lb]))).await;
            sequential(&proxy, 3).await;
            assert_eq!(ejected(&proxy), 1.0);
            // Healthy now but slow, so that concurrent probes would overlap.
            bad.set_mode(Mode::Delay(Duration::from_millis(80)));
            tokio::time::sleep(Duration::from_millis(250)).await;
            bad.reset_max_in_flight();
            let before = bad.hits();
            let results = load(&proxy, 8, 15).await;
            assert!(failures(&results).is_empty(), "{:?}", failures(&results));
            let probes = bad.hits() - before;
            if successes_to_close == 0 {
                // The control (Envoy's behaviour): straight back to full
                // traffic, where 8 callers pile up on the slow endpoint.
                assert!(
                    bad.max_in_flight() > 2,
                    "restored: {} at once",
                    bad.max_in_flight()
                );
            } else {
                assert!(probes >= 2, "half-open: it got probes ({probes})");
                assert!(
                    bad.max_in_flight() <= 2,
                    "half-open: {} at once with probeRequests 2",
                    bad.max_in_flight()
                );
                assert_eq!(events(&proxy, "restored", "", None), 0.0);
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enough_probe_successes_restore_a_full_share() {
    bounded(async {
        let bad = Backend::start("bad", Mode::Status(503)).await;
        let good = [
            Backend::start("good-1", Mode::Ok).await,
            Backend::start("good-2", Mode::Ok).await,
        ];
        // Ejected for long enough that the "still ejected" check cannot
        // outlast it on a busy machine.
        let od = "outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 1500ms, halfOpen: {probeRequests: 1, successesToClose: 3}}";
        let yaml = config(&[&bad, &good[0], &good[1]], &policy(&[od]));
        let proxy = TestProxy::start_agent(&yaml, NodeContext::default()).await;
        sequential(&proxy, 3).await;
        assert_eq!(ejected(&proxy), 1.0);
        bad.set_mode(Mode::Ok);
        // Still ejected: nothing reaches it.
        let before = bad.hits();
        let ejected_at = std::time::Instant::now();
        sequential(&proxy, 15).await;
        if ejected_at.elapsed() < Duration::from_millis(1200) {
            assert_eq!(bad.hits(), before, "ejected for 1.5 s");
        }
        tokio::time::sleep(Duration::from_millis(1600).saturating_sub(ejected_at.elapsed())).await;
        sequential(&proxy, 60).await;
        assert_eq!(events(&proxy, "half_open", "", Some(bad.addr)), 1.0);
        assert_eq!(events(&proxy, "restored", "", Some(bad.addr)), 1.0);
        // Three probes, then its round-robin third again.
        let share = bad.hits() - before;
        assert!(share >= 15, "restored endpoint got {share} of 60");
    })
    .await
}
