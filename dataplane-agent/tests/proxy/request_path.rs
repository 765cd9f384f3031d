//! The HTTP request path through the real proxy, in-process on loopback:
//! what counts against an endpoint, what the caller is told, protocol
//! translation, pools, timers, upgrades, gRPC outcomes and body replay.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use support::{Backend, Mode, TestProxy, bounded, client, config, raw_server};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn get(proxy: &TestProxy, http2: bool) -> http::Response<Bytes> {
    let req = Request::get(format!("http://{}/", proxy.addr))
        .body(Full::default())
        .unwrap();
    let resp = client(http2).request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

/// Reads from a raw socket until the peer closes or `limit` passes.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(String::from_utf8_lossy(&all).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_give_up_do_not_eject_a_slow_healthy_endpoint() {
    bounded(async {
        let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(300))).await;
        let extra =
            "    trafficPolicy:\n      outlierDetection: {consecutiveLocalOriginFailures: 3}\n";
        let proxy = TestProxy::start(&config(&[&slow], extra)).await;
        for _ in 0..6 {
            let call = get(&proxy, false);
            assert!(
                tokio::time::timeout(Duration::from_millis(100), call)
                    .await
                    .is_err(),
                "the caller gives up first"
            );
        }
        assert_eq!(proxy.ejections(), 0.0, "{}", proxy.metrics());
        assert_eq!(get(&proxy, false).await.status(), StatusCode::OK);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_client_body_gets_400_and_never_counts_against_endpoints() {
    bounded(async {
        let backends = [
            Backend::start("a", Mode::Echo).await,
            Backend::start("b", Mode::Echo).await,
            Backend::start("c", Mode::Echo).await,
        ];
        let extra = "    trafficPolicy:\n      outlierDetection: {consecutive5xxErrors: 1, consecutiveLocalOriginFailures: 1, maxEjectionPercent: 100}\n";
        let proxy = TestProxy::start(&config(&backends.iter().collect::<Vec<_>>(), extra)).await;
        for _ in 0..12 {
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(
                b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
            )
            .await
            .unwrap();
            let answer = read_until_closed(&mut s, Duration::from_secs(5)).await.unwrap_or_default();
            assert!(answer.starts_with("HTTP/1.1 400"), "answer: {answer:?}");
        }
        assert_eq!(proxy.ejections(), 0.0, "{}", proxy.metrics());
        for _ in 0..6 {
            assert_eq!(get(&proxy, false).await.status(), StatusCode::OK);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_retry_is_named_in_x_dataplane_error() {
    bounded(async {
        let bad = Backend::start("bad", Mode::Status(503)).await;
        let other = Backend::start("bad-too", Mode::Status(503)).await;
        for (policy, expected) in [
            (
                "{budget: {retryPercent: 0, minRetriesPerSecond: 0}}",
                "retry_budget_exhausted",
            ),
            ("{attempts: 1}", "retries_exhausted"),
        ] {
            let extra = format!("    trafficPolicy:\n      retries: {policy}\n");
            let proxy = TestProxy::start(&config(&[&bad, &other], &extra)).await;
            let resp = get(&proxy, false).await;
            assert_eq!(
                resp.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream status kept"
            );
            assert_eq!(resp.headers()["x-dataplane-error"], expected);
            let backend = resp.headers()["x-backend"].to_str().unwrap();
            assert!(backend.starts_with("bad"), "the backend's own answer");
        }
        let extra = "    trafficPolicy:\n      connectionPool: {maxRetries: 0}\n";
        let proxy = TestProxy::start(&config(&[&bad, &other], extra)).await;
        assert_eq!(
            get(&proxy, false).await.headers()["x-dataplane-error"],
            "retry_overflow"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_translated_both_ways() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        for (upstream, http2_client, seen) in [
            ("http1", true, "HTTP/1.1"),
            ("http2", false, "HTTP/2.0"),
            ("auto", true, "HTTP/2.0"),
            ("auto", false, "HTTP/1.1"),
        ] {
            let extra = format!("    upstreamProtocol: {upstream}\n");
            let proxy = TestProxy::start(&config(&[&backend], &extra)).await;
            let resp = get(&proxy, http2_client).await;
            let case = format!("{upstream} from h2={http2_client}");
            assert_eq!(resp.status(), StatusCode::OK, "{case}");
            assert_eq!(&resp.body()[..], b"b");
            assert_eq!(resp.headers()["x-request-version"], seen, "{case}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pool_per_endpoint_whatever_the_host_header() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let proxy = TestProxy::start(&config(&[&backend], "")).await;
        let client = client(false);
        for i in 0..40 {
            let req = Request::get(format!("http://{}/", proxy.addr))
                .header("host", format!("tenant-{i}.example"))
                .body(Full::<Bytes>::default())
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let _ = resp.into_body().collect().await;
        }
        assert_eq!(
            backend
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_in_trailers_feeds_outlier_detection_and_metrics() {
    bounded(async {
        let good = Backend::start("good", Mode::GrpcTrailers(0)).await;
        let bad = Backend::start("bad", Mode::GrpcTrailers(14)).await;
        let extra = "    trafficPolicy:\n      outlierDetection: {}\n";
        let proxy = TestProxy::start(&config(&[&good, &bad], extra)).await;
        let client = client(true);
        for _ in 0..40 {
            let req = Request::post(format!("http://{}/pkg.Svc/Call", proxy.addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let _ = resp.into_body().collect().await;
        }
        assert!(proxy.ejections() >= 1.0, "{}", proxy.metrics());
        assert!(
            bad.hits() < 15,
            "the UNAVAILABLE backend was ejected: {} calls",
            bad.hits()
        );
        assert!(
            proxy.metric(
                "dataplane_http_grpc_responses_total",
                &["grpc_status=\"14\""]
            ) >= 5.0
        );
        assert!(
            proxy.metric(
                "dataplane_http_grpc_responses_total",
                &["grpc_status=\"0\""]
            ) >= 20.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_head_is_cut_but_an_idle_keepalive_connection_is_not() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let extra = "    trafficPolicy:\n      timeouts: {headerRead: 300ms, idle: 3s}\n";
        let proxy = TestProxy::start(&config(&[&backend], extra)).await;
        // Idle for longer than headerRead, then a request: still served.
        let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        idle.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        // A head dribbled a byte at a time is cut after headerRead.
        let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut closed = false;
        for byte in b"GET / HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" {
            if slow.write_all(&[*byte]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        let rest = read_until_closed(&mut slow, Duration::from_secs(2)).await;
        assert!(
            closed || rest.is_some(),
            "the slowloris connection was closed"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_connections_count_http_connections() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let proxy = TestProxy::start(&config(&[&backend], "")).await;
        let mut open = Vec::new();
        for _ in 0..20 {
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await.unwrap();
            open.push(s);
        }
        assert_eq!(
            proxy.metric("dataplane_proxy_active_connections", &[]),
            20.0
        );
        drop(open);
        let mut left = 20.0;
        for _ in 0..50 {
            left = proxy.metric("dataplane_proxy_active_connections", &[]);
            if left == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(left, 0.0, "closed connections leave the gauge");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_offers_are_answered_in_http1() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let proxy = TestProxy::start(&config(&[&backend], "")).await;
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_posts_replay_their_body_byte_for_byte() {
    bounded(async {
        let failing = Backend::start("failing", Mode::Status(503)).await;
        let echo = Backend::start("echo", Mode::Echo).await;
        // Round robin and no ejection: the failing backend keeps its turn.
        let extra = "    trafficPolicy:\n      retries: {retryNonIdempotent: true}\n      loadBalancer: {algorithm: roundRobin}\n      outlierDetection: null\n";
        let proxy = TestProxy::start(&config(&[&failing, &echo], extra)).await;
        let mut rng = fastrand::Rng::with_seed(7);
        for http2 in [false, true] {
            for size in [1usize, 1000, 40_000] {
                let body: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
                for _ in 0..2 {
                    let req = Request::post(format!("http://{}/", proxy.addr))
                        .body(Full::new(Bytes::from(body.clone())))
                        .unwrap();
                    let resp = client(http2).request(req).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::OK);
                    let got = resp.into_body().collect().await.unwrap().to_bytes();
                    assert!(got[..] == body[..], "h2={http2} size={size}: body differs");
                }
            }
        }
        assert!(
            failing.hits() >= 4,
            "the failing backend was tried first sometimes"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_not_retried_after_the_endpoint_may_have_acted() {
    bounded(async {
        let failing = Backend::start("failing", Mode::Status(503)).await;
        let proxy = TestProxy::start(&config(&[&failing, &failing], "")).await;
        let req = Request::post(format!("http://{}/", proxy.addr))
            .body(Full::new(Bytes::from_static(b"pay")))
            .unwrap();
        let resp = client(false).request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(failing.hits(), 1, "sent once");
    })
    .await
}

/// A backend that answers every connection's first request with chunked
/// headers and `chunks` one-byte chunks `gap` apart, then stays silent
/// without ending the body.
async fn trickling_backend(chunks: usize, gap: Duration) -> std::net::SocketAddr {
    let (addr, _) = raw_server(move |mut stream: TcpStream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..chunks {
            tokio::time::sleep(gap).await;
            if stream.write_all(b"1\r\nx\r\n").await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    addr
}

#[tokio::test]
async fn a_response_that_stalls_midway_ends_after_idle_but_a_slow_stream_does_not() {
    bounded(async {
        // Ten chunks 100 ms apart (a second in all), then silence: the
        // 300 ms idle limit must not cut the steady part, only the stall.
        let backend = trickling_backend(10, Duration::from_millis(100)).await;
        let yaml = format!(
            "services:\n  - name: echo\n    vip: 198.19.0.10:80\n    protocol: http\n    upstreamProtocol: http1\n    endpoints:\n      - address: {backend}\n    trafficPolicy:\n      timeouts: {{idle: 300ms}}\n"
        );
        let proxy = TestProxy::start(&yaml).await;
        for http2 in [false, true] {
            let req = Request::get(format!("http://{}/", proxy.addr))
                .body(Full::default())
                .unwrap();
            let resp = client(http2).request(req).await.expect("headers arrive");
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.into_body();
            let mut received = 0;
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => received += frame.data_ref().map_or(0, |d| d.len()),
                        Err(_) => return true,
                    }
                }
                false
            })
            .await
            .expect("the stalled response is ended, not left hanging");
            assert!(ended, "the body ends with an error (h2: {http2})");
            assert_eq!(received, 10, "the steady part got through (h2: {http2})");
        }
        assert_eq!(
            proxy.metric("dataplane_proxy_idle_timeouts", &["kind=\"http_stream\""]),
            2.0
        );
    })
    .await;
}

/// Answers every request 503 after `delay` (keep-alive).
async fn slow_503_backend(delay: Duration) -> std::net::SocketAddr {
    let (addr, _) = raw_server(move |mut stream: TcpStream| async move {
        let mut buf = [0u8; 4096];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
            tokio::time::sleep(delay).await;
            let reply = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
            if stream.write_all(reply).await.is_err() {
                return;
            }
        }
    })
    .await;
    addr
}

#[tokio::test]
async fn a_retry_cut_short_by_the_request_deadline_does_not_blame_its_endpoint() {
    bounded(async {
        // Both endpoints answer 503 after 600 ms; the request timeout is
        // 1 s, so every retry gets under half of it and is cut. That is
        // the deadline's doing, not the endpoint's: with a local-origin
        // threshold of 1 it would otherwise eject both. (The first attempt
        // has 400 ms of slack before it would be cut, with all of the
        // request timeout, and be blamed.)
        let a = slow_503_backend(Duration::from_millis(600)).await;
        let b = slow_503_backend(Duration::from_millis(600)).await;
        let yaml = format!(
            "services:\n  - name: echo\n    vip: 198.19.0.10:80\n    protocol: http\n    endpoints:\n      - address: {a}\n      - address: {b}\n    trafficPolicy:\n      timeouts: {{request: 1s}}\n      retries: {{perTryTimeout: 0s, backoff: {{baseInterval: 1ms, maxInterval: 1ms}}}}\n      outlierDetection: {{consecutive5xxErrors: 100, consecutiveLocalOriginFailures: 1}}\n"
        );
        let proxy = TestProxy::start(&yaml).await;
        for _ in 0..3 {
            let resp = get(&proxy, false).await;
            assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        }
        assert_eq!(proxy.ejections(), 0.0, "{}", proxy.metrics());
    })
    .await;
}

/// A retry after a fast failure has nearly the whole request timeout: if
/// its endpoint hangs through it, that endpoint is to blame.
#[tokio::test]
async fn a_retry_given_most_of_the_deadline_is_blamed_when_it_hangs() {
    bounded(async {
        let fast = Backend::start("fast", Mode::Status(503)).await;
        let hung = Backend::start("hung", Mode::Hang).await;
        let yaml = config(
            &[&fast, &hung],
            "    trafficPolicy:\n      timeouts: {request: 400ms}\n      retries: {perTryTimeout: 0s}\n      outlierDetection: {consecutive5xxErrors: 100, consecutiveLocalOriginFailures: 1}\n",
        );
        let proxy = TestProxy::start(&yaml).await;
        // Whichever goes first, the hung endpoint has over half the
        // request timeout when it hangs.
        let resp = get(&proxy, false).await;
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        let hung_ejected = proxy.metric(
            "dataplane_policy_outlier_events_total",
            &["event=\"ejected\"", &hung.addr.to_string()],
        );
        assert_eq!(hung_ejected, 1.0, "{}", proxy.metrics());
    })
    .await;
}

/// An HTTP/2 server that says GOAWAY with `reason` and nothing processed
/// (last stream 0) on every connection once a request's HEADERS arrived,
/// as a server does when it starts shutting down with requests already
/// sent to it. Raw frames, so the GOAWAY always comes after the request
/// was sent: one that came before would leave the request unsent, which
/// the client cannot tell apart by reason (hyper keeps no GOAWAY code for
/// it), and the test would depend on which task ran first. Its SETTINGS
/// (the server's preface) goes first, so a client that waits for it
/// still sends. Returns its address and how many GOAWAYs it sent, each
/// after an HTTP/2 client's preface and request.
async fn going_away_h2_backend(reason: h2::Reason) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let goaways = Arc::new(AtomicUsize::new(0));
    let sent = Arc::clone(&goaways);
    let (addr, _) = raw_server(move |mut stream: TcpStream| {
        let sent = Arc::clone(&sent);
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut preface = [0; 24];
                stream.read_exact(&mut preface).await?;
                if &preface != b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
                    // Not an HTTP/2 client: no GOAWAY, which the test notices.
                    return Ok(());
                }
                // An empty SETTINGS: the server's preface.
                stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
                // Frames until the first HEADERS (type 1).
                loop {
                    let mut header = [0; 9];
                    stream.read_exact(&mut header).await?;
                    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                    let mut payload = vec![0; len as usize];
                    stream.read_exact(&mut payload).await?;
                    if header[3] == 1 {
                        break;
                    }
                }
                // GOAWAY: last stream 0, the reason's code.
                let mut goaway = vec![0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                goaway.extend_from_slice(&u32::from(reason).to_be_bytes());
                stream.write_all(&goaway).await?;
                sent.fetch_add(1, Ordering::SeqCst);
                // Open until the client closes, so that no reset races the
                // GOAWAY.
                let mut rest = [0; 1024];
                while stream.read(&mut rest).await? > 0 {}
                std::io::Result::Ok(())
            })
            .await;
        }
    })
    .await;
    (addr, goaways)
}

#[tokio::test]
async fn a_request_left_unprocessed_by_a_goaway_is_retried_elsewhere_even_a_post() {
    bounded(async {
        // NO_ERROR: a graceful shutdown, not held against the endpoint;
        // an error code: retried all the same, but the endpoint is failing.
        // Round robin, so the leaving server gets the first or second
        // request whatever the latencies.
        for (reason, ejected) in [(h2::Reason::NO_ERROR, 0.0), (h2::Reason::INTERNAL_ERROR, 1.0)] {
            let (leaving, goaways) = going_away_h2_backend(reason).await;
            let ok = Backend::start("ok", Mode::Echo).await;
            let yaml = format!(
                "services:\n  - name: echo\n    vip: 198.19.0.10:80\n    protocol: http\n    upstreamProtocol: http2\n    endpoints:\n      - address: {leaving}\n      - address: {}\n    trafficPolicy:\n      loadBalancer: {{algorithm: roundRobin}}\n      outlierDetection: {{consecutiveLocalOriginFailures: 1, consecutive5xxErrors: 1}}\n",
                ok.addr
            );
            let proxy = TestProxy::start(&yaml).await;
            for i in 0..6 {
                let req = Request::post(format!("http://{}/", proxy.addr))
                    .body(Full::new(Bytes::from(format!("order {i}"))))
                    .unwrap();
                let resp = client(false).request(req).await.expect("response");
                assert_eq!(resp.status(), StatusCode::OK, "{reason:?} POST {i}: {:?}", resp.headers());
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, format!("order {i}").as_bytes());
            }
            assert!(goaways.load(Ordering::SeqCst) >= 1, "the leaving server said GOAWAY to a request");
            assert_eq!(proxy.ejections(), ejected, "{reason:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_fails_over_a_refused_connect_only_as_the_retry_policy_allows() {
    bounded(async {
        let dead = [
            Backend::start("dead-1", Mode::Ok).await,
            Backend::start("dead-2", Mode::Ok).await,
        ];
        for backend in &dead {
            backend.kill();
        }
        for (retries, tried) in [("{attempts: 0}", 1.0), ("{attempts: 2}", 2.0)] {
            let yaml = config(
                &[&dead[0], &dead[1]],
                &format!("    trafficPolicy:\n      retries: {retries}\n"),
            );
            let proxy = TestProxy::start(&yaml).await;
            let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
            stream
                .write_all(b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                .await
                .unwrap();
            let reply = read_until_closed(&mut stream, Duration::from_secs(5))
                .await
                .unwrap_or_default();
            assert!(reply.starts_with("HTTP/1.1 503"), "{retries}: {reply}");
            assert!(reply.contains("upstream_connect_failure"), "{retries}: {reply}");
            let connects = proxy.metric("dataplane_proxy_upstream_connect_errors", &[]);
            assert_eq!(connects, tried, "{retries}: endpoints tried");
        }
    })
    .await;
}

#[tokio::test]
async fn requests_queued_behind_one_failed_http2_connect_count_it_once() {
    bounded(async {
        // Eight requests wait for the one HTTP/2 connect to a blackhole;
        // it times out once. Counting it eight times would eject the
        // endpoint (threshold 2) after a single failure.
        let hole = support::Blackhole::start().await;
        let yaml = format!(
            "services:\n  - name: echo\n    vip: 198.19.0.10:80\n    protocol: http\n    upstreamProtocol: http2\n    endpoints:\n      - address: {}\n    trafficPolicy:\n      retries: {{attempts: 0}}\n      timeouts: {{connect: 300ms}}\n      outlierDetection: {{consecutiveLocalOriginFailures: 2}}\n",
            hole.addr
        );
        let proxy = TestProxy::start(&yaml).await;
        let client = client(false);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let req = Request::get(format!("http://{}/", proxy.addr))
                    .body(Full::default())
                    .unwrap();
                tokio::spawn(client.request(req))
            })
            .collect();
        for call in calls {
            let resp = call.await.unwrap().expect("response");
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        let connects = proxy.metric("dataplane_proxy_upstream_connect_errors", &[]);
        assert!(connects <= 2.0, "one failed connect (or two), counted once each: {connects}");
        assert_eq!(proxy.ejections(), 0.0, "{}", proxy.metrics());
    })
    .await;
}
