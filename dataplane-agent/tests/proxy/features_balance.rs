//! Load balancing through the real proxy, in-process on loopback: endpoint
//! weights, random spread, least request and peak EWMA steering around a
//! slow endpoint under concurrent load, ring hash and Maglev stickiness (by
//! header and by source address), locality-aware failover, and the panic
//! threshold sending traffic to ejected endpoints again.

use crate::support;

use std::net::Ipv4Addr;
use std::time::Duration;

use dataplane_agent::balance::Locality;
use dataplane_agent::state::NodeContext;
use http::StatusCode;
use support::{
    Backend, Mode, TestProxy, bounded, client, client_from, config, config_with, endpoint,
    failures, get_with, load, policy,
};

async fn backends(names: &[&str], mode: Mode) -> Vec<Backend> {
    let mut all = Vec::new();
    for name in names {
        all.push(Backend::start(name, mode.clone()).await);
    }
    all
}

fn hits(backends: &[Backend]) -> Vec<usize> {
    backends.iter().map(Backend::hits).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic_three_to_one() {
    bounded(async {
        for (algorithm, low) in [("roundRobin", 2.5), ("random", 2.0), ("leastRequest", 1.5)] {
            let heavy = Backend::start("heavy", Mode::Ok).await;
            let light = Backend::start("light", Mode::Ok).await;
            let endpoints = [endpoint(&heavy, "weight: 3"), endpoint(&light, "weight: 1")];
            let extra = policy(&[&format!("loadBalancer: {{algorithm: {algorithm}}}")]);
            let proxy = TestProxy::start(&config_with("http", &endpoints, &extra)).await;
            let results = load(&proxy, 4, 200).await;
            assert!(failures(&results).is_empty(), "{:?}", failures(&results));
            let (h, l) = (heavy.hits(), light.hits());
            assert_eq!(h + l, 800);
            // Expected 600:200: exactly for round robin, within about 5
            // sigma for random. Least request compares outstanding
            // requests per weight, so under concurrent load its split
            // also depends on latency: only the direction is certain.
            let ratio = h as f64 / l.max(1) as f64;
            assert!(
                (low..=4.5).contains(&ratio),
                "{algorithm}: weight 3 got {h}, weight 1 got {l}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_uses_every_endpoint() {
    bounded(async {
        let all = backends(&["a", "b", "c", "d"], Mode::Ok).await;
        let extra = policy(&["loadBalancer: {algorithm: random}"]);
        let proxy = TestProxy::start(&config(&all.iter().collect::<Vec<_>>(), &extra)).await;
        let results = load(&proxy, 4, 50).await;
        assert!(failures(&results).is_empty(), "{:?}", failures(&results));
        // 50 expected each; 20 is about 5 sigma below.
        let seen = hits(&all);
        assert!(seen.iter().all(|&n| n >= 20), "hits per endpoint: {seen:?}");
    })
    .await
}

/// Requests the slow endpoint (of three) answered under 6 concurrent
/// callers doing 30 GETs each, with `algorithm`.
async fn slow_endpoint_share(algorithm: &str) -> (usize, usize) {
    let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(60))).await;
    let fast = backends(&["fast-1", "fast-2"], Mode::Ok).await;
    let extra = policy(&[&format!("loadBalancer: {{algorithm: {algorithm}}}")]);
    let proxy = TestProxy::start(&config(&[&slow, &fast[0], &fast[1]], &extra)).await;
    let results = load(&proxy, 6, 30).await;
    assert!(failures(&results).is_empty(), "{:?}", failures(&results));
    (slow.hits(), results.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_and_peak_ewma_send_less_to_a_slow_endpoint() {
    bounded(async {
        for algorithm in ["leastRequest", "peakEwma"] {
            let (slow, total) = slow_endpoint_share(algorithm).await;
            let fair = total / 3;
            assert!(
                slow < fair / 2,
                "{algorithm}: the slow endpoint got {slow} of {total} (fair share {fair})"
            );
        }
        // The control: round robin gives it its full share under the same load.
        let (slow, total) = slow_endpoint_share("roundRobin").await;
        assert!(
            slow >= total / 4,
            "roundRobin: the slow endpoint got {slow} of {total}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_and_maglev_send_a_header_key_to_one_endpoint() {
    bounded(async {
        for algorithm in ["ringHash", "maglev"] {
            let all = backends(&["a", "b", "c", "d", "e"], Mode::Ok).await;
            let lb = format!("loadBalancer: {{algorithm: {algorithm}, hash: {{header: x-user}}}}");
            let extra = policy(&[&lb]);
            let proxy = TestProxy::start(&config(&all.iter().collect::<Vec<_>>(), &extra)).await;
            let client = client(false);
            let mut chosen = std::collections::BTreeSet::new();
            for user in 0..20 {
                let key = format!("user-{user}");
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..4 {
                    let reply = get_with(&client, &proxy, &[("x-user", &key)]).await;
                    assert_eq!(reply.status, StatusCode::OK);
                    seen.insert(reply.backend().unwrap().to_string());
                }
                assert_eq!(seen.len(), 1, "{algorithm}: {key} went to {seen:?}");
                chosen.extend(seen);
            }
            assert!(
                chosen.len() >= 3,
                "{algorithm}: 20 keys all on {chosen:?}: not spread"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_and_maglev_send_a_source_address_to_one_endpoint() {
    bounded(async {
        for algorithm in ["ringHash", "maglev"] {
            let all = backends(&["a", "b", "c", "d", "e"], Mode::Ok).await;
            let lb = format!("loadBalancer: {{algorithm: {algorithm}, hash: {{sourceIp: true}}}}");
            let extra = policy(&[&lb]);
            let proxy = TestProxy::start(&config(&all.iter().collect::<Vec<_>>(), &extra)).await;
            let mut chosen = std::collections::BTreeSet::new();
            for host in 10..26u8 {
                let source = Ipv4Addr::new(127, 0, 0, host);
                let mut seen = std::collections::BTreeSet::new();
                // Two clients: the key is the address, not the connection.
                for _ in 0..2 {
                    let client = client_from(source, false);
                    for _ in 0..3 {
                        let reply = get_with(&client, &proxy, &[]).await;
                        assert_eq!(reply.status, StatusCode::OK);
                        seen.insert(reply.backend().unwrap().to_string());
                    }
                }
                assert_eq!(seen.len(), 1, "{algorithm}: {source} went to {seen:?}");
                chosen.extend(seen);
            }
            assert!(
                chosen.len() >= 3,
                "{algorithm}: 16 sources all on {chosen:?}: not spread"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_keeps_traffic_in_the_callers_zone_and_fails_over() {
    bounded(async {
        let node = NodeContext {
            mark: 0,
            locality: Locality {
                region: "r1".into(),
                zone: "a".into(),
            },
        };
        for enabled in [true, false] {
            let local = backends(&["local-1", "local-2"], Mode::Ok).await;
            let remote = backends(&["remote-1", "remote-2"], Mode::Ok).await;
            let endpoints = [
                endpoint(&local[0], "region: r1, zone: a"),
                endpoint(&local[1], "region: r1, zone: a"),
                endpoint(&remote[0], "region: r1, zone: b"),
                endpoint(&remote[1], "region: r1, zone: b"),
            ];
            let lb = format!("loadBalancer: {{locality: {{enabled: {enabled}}}}}");
            let extra = policy(&[
                &lb,
                "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}",
            ]);
            let yaml = config_with("http", &endpoints, &extra);
            let proxy = TestProxy::start_with(&yaml, node.clone()).await;
            let results = load(&proxy, 2, 20).await;
            assert!(failures(&results).is_empty(), "{:?}", failures(&results));
            let remote_hits: usize = hits(&remote).iter().sum();
            if !enabled {
                // The control: without locality the other zone takes half.
                assert!(remote_hits >= 10, "remote got {remote_hits} of 40");
                continue;
            }
            assert_eq!(remote_hits, 0, "all 40 stay in zone a");
            // The caller's zone fails: traffic moves, no client error.
            for b in &local {
                b.set_mode(Mode::Status(503));
            }
            let local_before: usize = hits(&local).iter().sum();
            let results = load(&proxy, 2, 20).await;
            assert!(failures(&results).is_empty(), "{:?}", failures(&results));
            let local_failed = hits(&local).iter().sum::<usize>() - local_before;
            assert!(
                local_failed <= 4,
                "the failing zone was ejected after one 503 each, yet got {local_failed}"
            );
            assert_eq!(hits(&remote).iter().sum::<usize>(), 40);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_panic_threshold_ejected_endpoints_get_traffic_again() {
    bounded(async {
        for threshold in [50, 0] {
            let good = Backend::start("good", Mode::Ok).await;
            let bad = backends(&["bad-1", "bad-2", "bad-3"], Mode::Status(503)).await;
            let lb = format!("loadBalancer: {{panicThreshold: {threshold}}}");
            let extra = policy(&[
                &lb,
                "outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}",
            ]);
            let proxy =
                TestProxy::start(&config(&[&good, &bad[0], &bad[1], &bad[2]], &extra)).await;
            let client = client(false);
            for _ in 0..50 {
                if proxy.ejections() >= 3.0 {
                    break;
                }
                get_with(&client, &proxy, &[]).await;
            }
            assert_eq!(proxy.ejections(), 3.0, "{}", proxy.metrics());
            // Healthy again, but still ejected (30 s): only panic mode
            // sends them anything.
            for b in &bad {
                b.set_mode(Mode::Ok);
            }
            let before = hits(&bad);
            let results = load(&proxy, 4, 25).await;
            assert!(failures(&results).is_empty(), "{:?}", failures(&results));
            let after: Vec<usize> = hits(&bad).iter().zip(&before).map(|(a, b)| a - b).collect();
            if threshold == 50 {
                // 1 of 4 available (25 %) is below 50 %: all four share the
                // 100 requests (25 expected each).
                assert!(
                    after.iter().all(|&n| n >= 10),
                    "panic mode spreads over all: ejected ones got {after:?}"
                );
            } else {
                assert_eq!(after, [0, 0, 0], "panic disabled: ejected ones get nothing");
            }
        }
    })
    .await
}
