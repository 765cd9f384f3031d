//! Retries through the real proxy, in-process on loopback: the per-try
//! timeout, a different host on each retry, exponential backoff (measured
//! at the backends), the retry budget, the replay limit for request bodies,
//! `maxPendingRequests` and `maxRetries` overflows, and POSTs made
//! idempotent by an `Idempotency-Key` replayed byte for byte after a reset
//! over HTTP/1.1 and HTTP/2.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Backend, Mode, Reply, TestProxy, bounded, client, config, get_with, policy, send};

async fn put(client: &support::Client, proxy: &TestProxy, body: &[u8]) -> Reply {
    let req = Request::put(proxy.url())
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    send(client, req).await
}

fn random_body(rng: &mut fastrand::Rng, size: usize) -> Vec<u8> {
    (0..size).map(|_| rng.u8(..)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_a_hanging_request_to_another_endpoint() {
    bounded(async {
        let hang = Backend::start("hang", Mode::Hang).await;
        let ok = Backend::start("ok", Mode::Ok).await;
        // Round robin: the hanging endpoint's turn comes for sure.
        let extra = policy(&[
            "retries: {perTryTimeout: 100ms}",
            "loadBalancer: {algorithm: roundRobin}",
        ]);
        let proxy = TestProxy::start(&config(&[&hang, &ok], &extra)).await;
        let client = client(false);
        for _ in 0..4 {
            let reply = get_with(&client, &proxy, &[]).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.backend(), Some("ok"));
        }
        assert!(
            hang.connections.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "the hanging endpoint was tried"
        );
        // Both hanging: every try times out, and the caller is told so.
        let other = Backend::start("hang-too", Mode::Hang).await;
        let proxy = TestProxy::start(&config(&[&hang, &other], &extra)).await;
        let started = Instant::now();
        let reply = get_with(&client, &proxy, &[]).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            reply.error(),
            Some("upstream_per_try_timeout, retries_exhausted")
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "three tries of 100 ms"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_goes_to_another_endpoint() {
    bounded(async {
        let all = [
            Backend::start("a", Mode::Status(503)).await,
            Backend::start("b", Mode::Status(503)).await,
            Backend::start("c", Mode::Status(503)).await,
        ];
        let proxy = TestProxy::start(&config(&all.iter().collect::<Vec<_>>(), "")).await;
        let client = client(false);
        for _ in 0..5 {
            let reply = get_with(&client, &proxy, &[]).await;
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(reply.error(), Some("retries_exhausted"));
        }
        // attempts: 2 means three tries: one on each endpoint.
        let hits: Vec<usize> = all.iter().map(Backend::hits).collect();
        assert_eq!(hits, [5, 5, 5]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_between_tries_grows_exponentially() {
    bounded(async {
        let all = [
            Backend::start("a", Mode::Status(503)).await,
            Backend::start("b", Mode::Status(503)).await,
            Backend::start("c", Mode::Status(503)).await,
            Backend::start("d", Mode::Status(503)).await,
        ];
        // Without jitter the waits are exactly 100, 200, 400 ms; with the
        // default full jitter they are random below those.
        let extra = policy(&[
            "retries: {attempts: 3, backoff: {baseInterval: 100ms, maxInterval: 1s, jitter: none}}",
        ]);
        let proxy = TestProxy::start(&config(&all.iter().collect::<Vec<_>>(), &extra)).await;
        let reply = get_with(&client(false), &proxy, &[]).await;
        assert_eq!(reply.error(), Some("retries_exhausted"));
        let mut at: Vec<Instant> = all.iter().flat_map(Backend::arrivals).collect();
        at.sort();
        assert_eq!(at.len(), 4, "one try per endpoint");
        for (i, w) in at.windows(2).enumerate() {
            let backoff = Duration::from_millis(100 << i);
            assert!(
                w[1] - w[0] >= backoff,
                "retry {}: {:?} after the previous try, backoff {backoff:?}",
                i + 1,
                w[1] - w[0]
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_at_its_share_of_requests() {
    bounded(async {
        let a = Backend::start("a", Mode::Status(503)).await;
        let b = Backend::start("b", Mode::Status(503)).await;
        let extra =
            policy(&["retries: {attempts: 1, budget: {retryPercent: 20, minRetriesPerSecond: 0}}"]);
        let proxy = TestProxy::start(&config(&[&a, &b], &extra)).await;
        let client = client(false);
        let mut refused = 0;
        for _ in 0..50 {
            let reply = get_with(&client, &proxy, &[]).await;
            // The backend's own answer, with why it was not retried.
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(reply.backend().is_some());
            match reply.error() {
                Some("retry_budget_exhausted") => refused += 1,
                Some("retries_exhausted") => {}
                other => panic!("unexpected x-dataplane-error {other:?}"),
            }
        }
        let retries = a.hits() + b.hits() - 50;
        // 20 % of 50 requests: about 10 retries however many failed.
        assert!(
            (8..=11).contains(&retries),
            "{retries} retries for 50 failing requests"
        );
        assert_eq!(refused, 50 - retries);
        assert_eq!(
            proxy.metric("dataplane_http_retries_total", &[]),
            retries as f64
        );
        assert_eq!(
            proxy.metric(
                "dataplane_http_retry_give_ups_total",
                &["reason=\"budget_exhausted\""]
            ),
            refused as f64
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_replay_limit_are_not_retried() {
    bounded(async {
        // The proxy keeps 64 KiB of a request body for replay
        // (`MAX_REPLAY_BYTES`); the failing backend reads all of it first.
        const LIMIT: usize = 64 * 1024;
        let failing = Backend::start("failing", Mode::DrainThen(503)).await;
        let echo = Backend::start("echo", Mode::Echo).await;
        let proxy = TestProxy::start(&config(&[&failing, &echo], &rotation())).await;
        let mut rng = fastrand::Rng::with_seed(11);
        for http2 in [false, true] {
            let client = client(http2);
            for size in [LIMIT, LIMIT + 1] {
                let body = random_body(&mut rng, size);
                let mut refused = 0;
                for _ in 0..4 {
                    let failing_before = failing.hits();
                    let reply = put(&client, &proxy, &body).await;
                    let tried_failing = failing.hits() > failing_before;
                    let case = format!("h2={http2} size={size}");
                    if size > LIMIT && tried_failing {
                        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{case}");
                        assert_eq!(reply.backend(), Some("failing"), "{case}");
                        assert_eq!(reply.error(), Some("retry_body_too_large"), "{case}");
                        refused += 1;
                    } else {
                        assert_eq!(reply.status, StatusCode::OK, "{case}");
                        assert!(reply.body[..] == body[..], "{case}: body differs");
                    }
                }
                if size > LIMIT {
                    assert!(
                        refused >= 1,
                        "h2={http2}: the failing backend was tried first"
                    );
                }
            }
        }
        assert!(failing.hits() >= 4, "retries of replayable bodies happened");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_posts_are_replayed_byte_for_byte_after_a_reset() {
    bounded(async {
        let reset = Backend::start("reset", Mode::Reset).await;
        let echo = Backend::start("echo", Mode::Echo).await;
        // Default retries: a POST is retried after a reset only with a key.
        let proxy = TestProxy::start(&config(&[&reset, &echo], &rotation())).await;
        let mut rng = fastrand::Rng::with_seed(5);
        for http2 in [false, true] {
            let client = client(http2);
            for size in [1usize, 1000, 40_000, 65_536] {
                let body = random_body(&mut rng, size);
                for i in 0..2 {
                    let req = Request::post(proxy.url())
                        .header("idempotency-key", format!("k-{http2}-{size}-{i}"))
                        .body(Full::new(Bytes::from(body.clone())))
                        .unwrap();
                    let reply = send(&client, req).await;
                    let case = format!("h2={http2} size={size}");
                    assert_eq!(reply.status, StatusCode::OK, "{case}: {:?}", reply.error());
                    assert!(reply.body[..] == body[..], "{case}: body differs");
                }
            }
        }
        assert!(reset.hits() >= 4, "the resetting backend was tried first");
        // The control: without the key, a reset POST is not retried.
        let client = client(false);
        let mut not_retried = 0;
        for _ in 0..4 {
            let echo_before = echo.hits();
            let req = Request::post(proxy.url())
                .body(Full::new(Bytes::from_static(b"pay once")))
                .unwrap();
            let reply = send(&client, req).await;
            if reply.status == StatusCode::OK {
                continue;
            }
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(reply.error(), Some("upstream_reset"));
            assert_eq!(echo.hits(), echo_before, "not sent again");
            not_retried += 1;
        }
        assert!(not_retried >= 1, "some POSTs met the reset first");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_requests_overflows_requests_waiting_in_the_delay_queue() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let extra = policy(&[
            "rateLimit: {requestsPerSecond: 10, burst: 1, action: delay, delay: {maxWait: 2s, maxQueued: 100}}",
            "connectionPool: {maxPendingRequests: 2}",
        ]);
        let proxy = TestProxy::start(&config(&[&backend], &extra)).await;
        let client = client(false);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let client = client.clone();
                let url = proxy.url();
                tokio::spawn(async move {
                    let req = Request::get(url).body(Full::default()).unwrap();
                    send(&client, req).await
                })
            })
            .collect();
        let (mut ok, mut overflowed) = (0, 0);
        for call in calls {
            let reply = call.await.unwrap();
            if reply.status == StatusCode::OK {
                ok += 1;
                continue;
            }
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(reply.error(), Some("overflow"));
            assert_eq!(
                reply.header("x-dataplane-overflow"),
                Some("max_pending_requests")
            );
            overflowed += 1;
        }
        // One passes at once, two wait in the queue, the rest overflow
        // (more pass if the machine is slow enough to let a wait end).
        assert!(ok >= 3, "{ok} passed");
        assert!(overflowed >= 3, "{overflowed} overflowed");
        assert_eq!(backend.hits(), ok);
    })
    .await
}

/// Six concurrent GETs over one endpoint answering 503 and one answering
/// after 300 ms, with `maxRetries: 1`: the first retry holds the only
/// slot while the others want theirs.
async fn concurrent_retries() -> (TestProxy, Vec<Reply>) {
    let bad = Backend::start("bad", Mode::Status(503)).await;
    let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(300))).await;
    let extra = policy(&["connectionPool: {maxRetries: 1}"]);
    let proxy = TestProxy::start(&config(&[&bad, &slow], &extra)).await;
    let client = client(false);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let client = client.clone();
            let url = proxy.url();
            tokio::spawn(async move {
                let req = Request::get(url).body(Full::default()).unwrap();
                send(&client, req).await
            })
        })
        .collect();
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.unwrap());
    }
    (proxy, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_overflows_concurrent_retries() {
    bounded(async {
        let (proxy, replies) = concurrent_retries().await;
        let overflowed: Vec<&Reply> = replies
            .iter()
            .filter(|r| r.error() == Some("retry_overflow"))
            .collect();
        assert!(!overflowed.is_empty(), "{replies:?}");
        for r in &overflowed {
            // The backend's own 503, not retried.
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.backend(), Some("bad"));
        }
        assert!(
            replies.iter().any(|r| r.status == StatusCode::OK),
            "some were retried or served"
        );
        assert_eq!(
            proxy.metric(
                "dataplane_http_retry_give_ups_total",
                &["reason=\"breaker_open\""]
            ),
            overflowed.len() as f64
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_overflow_names_its_limit_like_other_circuit_breakers() {
    bounded(async {
        let (proxy, replies) = concurrent_retries().await;
        let overflowed: Vec<&Reply> = replies
            .iter()
            .filter(|r| r.error() == Some("retry_overflow"))
            .collect();
        assert!(!overflowed.is_empty(), "{replies:?}");
        for r in &overflowed {
            assert_eq!(r.header("x-dataplane-overflow"), Some("max_retries"));
        }
        assert!(
            proxy.metric(
                "dataplane_policy_circuit_breaker_overflows_total",
                &["reason=\"max_retries\""]
            ) >= 1.0
        );
    })
    .await
}

/// Round robin and no outlier detection: the failing backend keeps its
/// turn, so every other request meets it first.
fn rotation() -> String {
    policy(&[
        "loadBalancer: {algorithm: roundRobin}",
        "outlierDetection: null",
    ])
}
