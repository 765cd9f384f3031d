//! Timeouts through the real proxy, in-process on loopback: connect (to an
//! endpoint that never completes a handshake, HTTP and TCP), request
//! (bounding retries too), idle (closing an idle client connection, HTTP/1.1
//! and HTTP/2, unless `idle: 0`), header read (a half-sent head is cut unless
//! `headerRead: 0`) and protocol detection for `protocol: auto` (HTTP/1,
//! HTTP/2, client-first and server-first opaque TCP).

use crate::support;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{
    Backend, Blackhole, Mode, TestProxy, bounded, client, config, config_with, endpoint,
    endpoint_at, get_with, policy,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_never_completes_times_out_and_fails_over() {
    bounded(async {
        let hole = Blackhole::start().await;
        let ok = Backend::start("ok", Mode::Ok).await;
        let timeouts = "timeouts: {connect: 100ms}";
        // Round robin: the black hole's turn comes for sure.
        let lb = "loadBalancer: {algorithm: roundRobin}";
        let endpoints = [endpoint_at(hole.addr, ""), endpoint(&ok, "")];
        let proxy =
            TestProxy::start(&config_with("http", &endpoints, &policy(&[timeouts, lb]))).await;
        let client = client(false);
        for _ in 0..4 {
            let reply = get_with(&client, &proxy, &[]).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.backend(), Some("ok"));
        }
        let label = format!("endpoint=\"{}\"", hole.addr);
        assert!(proxy.metric("dataplane_proxy_upstream_connect_errors_total", &[&label]) >= 1.0);
        // Alone, every try times out after 100 ms (the request timeout,
        // 15 s, is not what ends it).
        let endpoints = [endpoint_at(hole.addr, "")];
        let yaml = config_with("http", &endpoints, &policy(&[timeouts, lb]));
        let proxy = TestProxy::start(&yaml).await;
        let started = Instant::now();
        let reply = get_with(&client, &proxy, &[]).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            reply.error(),
            Some("upstream_connect_failure, retries_exhausted")
        );
        assert!(started.elapsed() >= Duration::from_millis(300), "3 tries");
        // Opaque TCP: the next endpoint is tried after the timeout.
        let endpoints = [endpoint_at(hole.addr, ""), endpoint(&ok, "")];
        let yaml = config_with("tcp", &endpoints, &policy(&[timeouts, lb]));
        let proxy = TestProxy::start(&yaml).await;
        for _ in 0..2 {
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await.unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200"));
        }
        let label = format!("endpoint=\"{}\"", hole.addr);
        assert!(proxy.metric("dataplane_proxy_upstream_connect_errors_total", &[&label]) >= 1.0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_bounds_the_request_and_its_retries() {
    bounded(async {
        let slow = Backend::start("slow", Mode::Delay(Duration::from_secs(3))).await;
        let client = client(false);
        let extra = policy(&["timeouts: {request: 300ms}"]);
        let proxy = TestProxy::start(&config(&[&slow], &extra)).await;
        let started = Instant::now();
        let reply = get_with(&client, &proxy, &[]).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(reply.error(), Some("request_timeout"));
        assert!(started.elapsed() >= Duration::from_millis(300));
        // A per-try timeout retries, but the request deadline ends it.
        let other = Backend::start("slow-too", Mode::Delay(Duration::from_secs(3))).await;
        let extra = policy(&[
            "timeouts: {request: 300ms}",
            "retries: {perTryTimeout: 200ms}",
        ]);
        let proxy = TestProxy::start(&config(&[&slow, &other], &extra)).await;
        let before = slow.arrivals().len();
        let reply = get_with(&client, &proxy, &[]).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(reply.error(), Some("request_timeout"));
        let tries = slow.arrivals().len() - before + other.arrivals().len();
        assert_eq!(tries, 2, "the second try was cut by the request deadline");
    })
    .await
}

/// Makes one request on a fresh connection, then waits up to `limit` for
/// the proxy to close it; how long after the response it closed, if it did.
async fn closed_after_idle(proxy: &TestProxy, http2: bool, limit: Duration) -> Option<Duration> {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let req = || {
        Request::get("http://echo/")
            .header("host", "echo")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let resp = if http2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
            let _ = done_tx.send(Instant::now());
        });
        let resp = sender.send_request(req()).await.unwrap();
        tokio::spawn(async move {
            // Kept open by the client: only the proxy may close it.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(sender);
        });
        resp
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
            let _ = done_tx.send(Instant::now());
        });
        let resp = sender.send_request(req()).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(sender);
        });
        resp
    };
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    let answered = Instant::now();
    let closed = tokio::time::timeout(limit, done_rx).await.ok()?.unwrap();
    Some(closed.saturating_duration_since(answered))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_connection_is_closed_unless_idle_is_zero() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let extra = policy(&["timeouts: {idle: 300ms}"]);
        let proxy = TestProxy::start(&config(&[&backend], &extra)).await;
        for http2 in [false, true] {
            let after = closed_after_idle(&proxy, http2, Duration::from_secs(3)).await;
            let after = after.unwrap_or_else(|| panic!("h2={http2}: still open after 3 s"));
            assert!(
                after >= Duration::from_millis(280),
                "h2={http2}: closed {after:?} after the response, before idle"
            );
        }
        let extra = policy(&["timeouts: {idle: 0}"]);
        let proxy = TestProxy::start(&config(&[&backend], &extra)).await;
        for http2 in [false, true] {
            let after = closed_after_idle(&proxy, http2, Duration::from_secs(1)).await;
            assert_eq!(after, None, "h2={http2}: idle: 0 closed it");
        }
    })
    .await
}

/// Sends half a request head and waits up to `limit` for the proxy to
/// close; then, if still open, completes the head and reads the answer.
async fn half_a_head(proxy: &TestProxy, limit: Duration) -> (Option<Duration>, String) {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x").await.unwrap();
    let sent = Instant::now();
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => return (Some(sent.elapsed()), String::new()),
        Ok(Ok(n)) => panic!("unexpected answer {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(_) => {}
    }
    s.write_all(b"\r\n\r\n").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    (None, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_is_cut_after_header_read_unless_it_is_zero() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let extra = policy(&["timeouts: {headerRead: 200ms}"]);
        let proxy = TestProxy::start(&config(&[&backend], &extra)).await;
        let (closed, _) = half_a_head(&proxy, Duration::from_secs(3)).await;
        let closed = closed.expect("cut within 3 s");
        assert!(closed >= Duration::from_millis(190), "cut after {closed:?}");
        let extra = policy(&["timeouts: {headerRead: 0}"]);
        let proxy = TestProxy::start(&config(&[&backend], &extra)).await;
        let (closed, answer) = half_a_head(&proxy, Duration::from_millis(800)).await;
        assert_eq!(closed, None, "headerRead: 0 cut it");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    })
    .await
}

/// A TCP server that speaks first (`220 ready`) and then echoes.
async fn banner_server() -> SocketAddrV4 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 ready\r\n").await?;
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_detects_http1_http2_and_opaque_tcp() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let yaml = config_with("auto", &[endpoint(&backend, "")], "");
        let proxy = TestProxy::start(&yaml).await;
        for (http2, version) in [(false, "HTTP/1.1"), (true, "HTTP/2.0")] {
            let reply = get_with(&client(http2), &proxy, &[]).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.header("x-request-version"), Some(version));
        }
        // Served by the HTTP path (its metrics), not spliced.
        assert_eq!(proxy.metric("dataplane_http_responses_total", &[]), 2.0);

        let tcp = banner_server().await;
        for wait in [150u64, 600] {
            let extra = policy(&[&format!("timeouts: {{protocolDetection: {wait}ms}}")]);
            let yaml = config_with("auto", &[endpoint_at(tcp, "")], &extra);
            let proxy = TestProxy::start(&yaml).await;
            // Server-first: nothing to detect, so opaque after the wait.
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            let started = Instant::now();
            let mut banner = [0u8; 11];
            s.read_exact(&mut banner).await.unwrap();
            assert_eq!(&banner, b"220 ready\r\n");
            assert!(
                started.elapsed() >= Duration::from_millis(wait),
                "the banner came {:?} after connecting, before detection gave up ({wait} ms)",
                started.elapsed()
            );
            // Client-first bytes that are no HTTP: opaque at once.
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(b"\x16\x03\x01hello").await.unwrap();
            let mut got = [0u8; 19];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"220 ready\r\n\x16\x03\x01hello");
            assert_eq!(proxy.metric("dataplane_http_responses_total", &[]), 0.0);
        }
    })
    .await
}

/// The default per-try timeout (request / (attempts + 1)) only cuts tries
/// that a retry can follow: a slow POST keeps the whole request timeout,
/// a GET as slow is cut and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_derived_per_try_timeout_spares_requests_that_cannot_be_retried() {
    bounded(async {
        // request 1.5 s, 2 retries: each try of a GET gets 500 ms.
        let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(800))).await;
        let yaml = config(&[&slow], &policy(&["timeouts: {request: 1500ms}"]));
        let proxy = TestProxy::start(&yaml).await;
        let client = client(false);
        let post = http::Request::post(proxy.url())
            .body(Full::new(bytes::Bytes::from_static(b"once")))
            .unwrap();
        let reply = support::send(&client, post).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.error());
        assert_eq!(slow.arrivals().len(), 1, "the POST was sent once");
        let reply = get_with(&client, &proxy, &[]).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        // Cut at 500 ms and retried: the request deadline ends the last try.
        let tries = slow.arrivals().len() - 1;
        assert!(tries >= 2, "tries of the GET: {tries}");
    })
    .await
}
