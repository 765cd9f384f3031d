//! Rate limits through the real proxy, in-process on loopback: each
//! algorithm admits what its parameters say out of a burst and rejects the
//! rest with 429, `Retry-After` and `x-dataplane-error: rate_limited`;
//! per-pod limits (pods identified by source address) give each pod its own
//! budget; the delay action holds requests instead of rejecting them, up to
//! `maxQueued`; a priority class keeps its share while others flood.

use crate::support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{
    Backend, Client, Mode, Reply, TestProxy, bounded, client, client_from, config, get_with, policy,
};

/// A rate limit of `spec` (YAML flow fields) over one healthy backend,
/// with `pods` (YAML lines, may be empty) enrolled.
async fn limited(spec: &str, pods: &str) -> (TestProxy, Backend) {
    let backend = Backend::start("b", Mode::Ok).await;
    let mut yaml = config(&[&backend], &policy(&[&format!("rateLimit: {{{spec}}}")]));
    yaml.push_str(pods);
    (TestProxy::start(&yaml).await, backend)
}

/// Sends `n` GETs back to back; how many were admitted. Every refusal must
/// be the rate limiter's.
async fn burst(client: &Client, proxy: &TestProxy, headers: &[(&str, &str)], n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        let reply = get_with(client, proxy, headers).await;
        if reply.status == StatusCode::OK {
            admitted += 1;
        } else {
            assert_rate_limited(&reply);
        }
    }
    admitted
}

fn assert_rate_limited(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
    assert_eq!(reply.error(), Some("rate_limited"));
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_admits_its_burst_then_refills_at_its_rate() {
    bounded(async {
        let (proxy, backend) = limited(
            "algorithm: tokenBucket, requestsPerSecond: 10, burst: 5",
            "",
        )
        .await;
        let client = client(false);
        // The bucket refills while a burst runs: the upper bounds allow
        // for how long each burst took on this machine.
        let refilled = |took: Duration| (10.0 * took.as_secs_f64()).ceil() as usize + 1;
        let started = Instant::now();
        let first = burst(&client, &proxy, &[], 20).await;
        let most = 5 + refilled(started.elapsed());
        assert!((5..=most).contains(&first), "burst 5 admitted {first}");
        // 300 ms at 10/s: about 3 tokens, not a full bucket.
        let emptied = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let second = burst(&client, &proxy, &[], 20).await;
        // What accrued since the bucket emptied, never more than a full
        // bucket plus what accrued during the burst.
        let most = refilled(emptied.elapsed()).min(5 + refilled(started.elapsed()));
        assert!(
            (3..=most).contains(&second),
            "after 300 ms: {second} (at most {most})"
        );
        assert_eq!(backend.hits(), first + second);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_window_admits_its_limit_per_window() {
    bounded(async {
        let (proxy, backend) = limited(
            "algorithm: fixedWindow, requestsPerSecond: 10, window: 1s",
            "",
        )
        .await;
        let client = client(false);
        let started = Instant::now();
        let first = burst(&client, &proxy, &[], 25).await;
        assert_eq!(first, 10, "limit 10 per window");
        // The next window starts with a whole new count.
        tokio::time::sleep(Duration::from_millis(1050).saturating_sub(started.elapsed())).await;
        let second = burst(&client, &proxy, &[], 25).await;
        assert_eq!(second, 10, "the next window");
        assert_eq!(backend.hits(), 20);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_weighs_the_previous_window() {
    bounded(async {
        let (proxy, _backend) = limited(
            "algorithm: slidingWindow, requestsPerSecond: 10, window: 1s",
            "",
        )
        .await;
        let client = client(false);
        let started = Instant::now();
        let first = burst(&client, &proxy, &[], 25).await;
        assert_eq!(first, 10, "limit 10 per window");
        // Half-way through the next window the previous one still counts
        // about half: about 5 fit, where a fixed window would allow 10.
        tokio::time::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed())).await;
        let second = burst(&client, &proxy, &[], 25).await;
        assert!((3..=7).contains(&second), "half a window later: {second}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaky_bucket_admits_its_capacity_then_paces() {
    bounded(async {
        let (proxy, _backend) = limited(
            "algorithm: leakyBucket, requestsPerSecond: 10, burst: 5",
            "",
        )
        .await;
        let client = client(false);
        let first = burst(&client, &proxy, &[], 20).await;
        // One at once plus `burst` queued slots.
        assert!((6..=8).contains(&first), "capacity 5 admitted {first}");
        // One slot per 100 ms.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let second = burst(&client, &proxy, &[], 20).await;
        assert!((2..=4).contains(&second), "after 250 ms: {second}");
    })
    .await
}

const PODS: &str = "pods:\n  - {uid: pod-a, ip: 127.0.0.2}\n  - {uid: pod-b, ip: 127.0.0.3}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pod_limits_give_each_calling_pod_its_own_budget() {
    bounded(async {
        let spec = "requestsPerSecond: 1, burst: 3";
        let source = |last: u8| client_from(Ipv4Addr::new(127, 0, 0, last), false);
        let (proxy, _b) = limited(&format!("{spec}, perPod: true"), PODS).await;
        assert_eq!(burst(&source(2), &proxy, &[], 8).await, 3, "pod-a");
        assert_eq!(burst(&source(3), &proxy, &[], 8).await, 3, "pod-b");
        // Callers the config does not name share one budget.
        assert_eq!(burst(&source(9), &proxy, &[], 8).await, 3, "unknown");
        assert_eq!(burst(&source(10), &proxy, &[], 8).await, 0, "unknown too");
        let rejected = |pod: &str| {
            let label = format!("pod=\"{pod}\"");
            proxy.metric(
                "dataplane_policy_rate_limited_total",
                &[&label, "decision=\"rejected\""],
            )
        };
        assert_eq!(rejected("pod-a"), 5.0, "{}", proxy.metrics());
        assert_eq!(rejected("pod-b"), 5.0);
        // The control: one budget for the service.
        let (proxy, _b) = limited(spec, PODS).await;
        assert_eq!(burst(&source(2), &proxy, &[], 8).await, 3, "pod-a");
        assert_eq!(burst(&source(3), &proxy, &[], 8).await, 0, "pod-b");
    })
    .await
}

/// Eight concurrent GETs; each reply with how long it took.
async fn eight_at_once(proxy: &TestProxy) -> Vec<(Reply, Duration)> {
    let client = client(false);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (client.clone(), proxy.url());
            tokio::spawn(async move {
                let started = Instant::now();
                let req = http::Request::get(url)
                    .body(http_body_util::Full::default())
                    .unwrap();
                let reply = support::send(&client, req).await;
                (reply, started.elapsed())
            })
        })
        .collect();
    let mut all = Vec::new();
    for call in calls {
        all.push(call.await.unwrap());
    }
    all
}

const DELAY: &str =
    "requestsPerSecond: 10, burst: 1, action: delay, delay: {maxWait: 1s, maxQueued: 3}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delay_action_holds_requests_up_to_max_queued() {
    bounded(async {
        let (proxy, backend) = limited(DELAY, "").await;
        let replies = eight_at_once(&proxy).await;
        let mut served: Vec<Duration> = replies
            .iter()
            .filter(|(r, _)| r.status == StatusCode::OK)
            .map(|(_, took)| *took)
            .collect();
        served.sort();
        // One at once, three queued at 100, 200 and 300 ms.
        assert_eq!(served.len(), 4, "{replies:?}");
        for (i, took) in served.iter().enumerate().skip(1) {
            let slot = Duration::from_millis(100 * i as u64);
            assert!(*took >= slot - Duration::from_millis(5), "{served:?}");
        }
        // Beyond maxQueued: refused by the proxy, never sent.
        for (reply, _) in replies.iter().filter(|(r, _)| r.status != StatusCode::OK) {
            assert!(reply.status.is_client_error() || reply.status.is_server_error());
            assert!(reply.error().is_some(), "{reply:?}");
            assert_eq!(reply.backend(), None);
        }
        assert_eq!(backend.hits(), 4);
        assert_eq!(
            proxy.metric(
                "dataplane_policy_rate_limited_total",
                &["decision=\"delayed\""]
            ),
            3.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_delay_queue_is_refused_as_rate_limited() {
    bounded(async {
        // Beyond `maxQueued` the caller is over the rate, not over a
        // capacity limit: 429 with Retry-After, as without a queue
        // (`maxPendingRequests` is what answers 503 overflow).
        let (proxy, _backend) = limited(DELAY, "").await;
        let replies = eight_at_once(&proxy).await;
        let refused: Vec<&Reply> = replies
            .iter()
            .map(|(r, _)| r)
            .filter(|r| r.status != StatusCode::OK)
            .collect();
        assert_eq!(refused.len(), 4);
        for reply in refused {
            assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
            assert_eq!(reply.error(), Some("rate_limited"));
            assert!(reply.header("retry-after").is_some(), "{reply:?}");
        }
    })
    .await
}

type Headers = &'static [(&'static str, &'static str)];

/// Gold (a class by `gold_match`, 50 % of 20/s) sends 15 requests over
/// about 0.9 s from `gold_source` while three bronze callers flood;
/// (gold admitted, bronze admitted, bronze rejected).
async fn gold_during_a_flood(
    classes: &str,
    gold_headers: Headers,
    gold_source: Ipv4Addr,
) -> (usize, usize, usize) {
    let spec = format!("requestsPerSecond: 20, burst: 20{classes}");
    let (proxy, _backend) = limited(&spec, "pods:\n  - {uid: pod-gold, ip: 127.0.0.7}\n").await;
    let proxy = Arc::new(proxy);
    let stop = Arc::new(AtomicBool::new(false));
    let (bronze_ok, bronze_no) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let flood: Vec<_> = (0..3)
        .map(|_| {
            let (proxy, stop) = (Arc::clone(&proxy), Arc::clone(&stop));
            let (ok, no) = (Arc::clone(&bronze_ok), Arc::clone(&bronze_no));
            tokio::spawn(async move {
                let client = client_from(Ipv4Addr::new(127, 0, 0, 8), false);
                while !stop.load(Ordering::SeqCst) {
                    let reply = get_with(&client, &proxy, &[]).await;
                    if reply.status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        assert_rate_limited(&reply);
                        no.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    // Let the flood drain the shared bucket first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gold = client_from(gold_source, false);
    let mut gold_ok = 0;
    for _ in 0..15 {
        let reply = get_with(&gold, &proxy, gold_headers).await;
        if reply.status == StatusCode::OK {
            gold_ok += 1;
        } else {
            assert_rate_limited(&reply);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for f in flood {
        f.await.unwrap();
    }
    (
        gold_ok,
        bronze_ok.load(Ordering::SeqCst),
        bronze_no.load(Ordering::SeqCst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_class_keeps_its_share_while_others_flood() {
    bounded(async {
        let localhost = Ipv4Addr::new(127, 0, 0, 1);
        let by_header = ", priorityClasses: [{name: gold, matchHeader: {name: x-priority, value: gold}, share: 50}]";
        let by_pod = ", priorityClasses: [{name: gold, matchPods: [pod-gold], share: 50}]";
        let cases: [(&str, Headers, Ipv4Addr); 2] = [
            (by_header, &[("x-priority", "gold")], localhost),
            (by_pod, &[], Ipv4Addr::new(127, 0, 0, 7)),
        ];
        for (classes, headers, source) in cases {
            let (gold, bronze_ok, bronze_no) = gold_during_a_flood(classes, headers, source).await;
            // Gold's own 10/s and burst 10 cover its 15 requests.
            assert!(gold >= 14, "{classes}: gold got {gold} of 15");
            // The rest (10/s, burst 10) for about a second.
            assert!(bronze_ok <= 25, "{classes}: bronze got {bronze_ok}");
            assert!(bronze_no >= 50, "{classes}: bronze was refused {bronze_no}");
        }
        // The control: without classes the flood takes gold's requests too.
        let (gold, _, _) = gold_during_a_flood("", &[("x-priority", "gold")], localhost).await;
        assert!(gold < 10, "without classes gold still got {gold} of 15");
    })
    .await
}
