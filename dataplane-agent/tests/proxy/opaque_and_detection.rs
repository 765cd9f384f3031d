//! `protocol: auto` detection that never pins a connection, and the idle
//! timeout of opaque TCP, through the real proxy on loopback sockets.
//!
//! A client that is silent through detection is either waiting for a
//! server-first protocol's greeting or is an HTTP client's connection
//! opened ahead of use; both must work, and the HTTP one must keep its
//! per-request policy (balancing, retries) for the connection's life.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use support::{Backend, Mode, TestProxy, bounded, raw_server};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Copies what it reads back until the client closes.
async fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn service(kind: &str, endpoints: &[String], timeouts: &str) -> String {
    let mut yaml = format!(
        "services:\n  - name: svc\n    vip: 198.19.0.20:80\n    protocol: {kind}\n    endpoints:\n"
    );
    for e in endpoints {
        yaml.push_str(&format!("      - address: {e}\n"));
    }
    yaml.push_str(&format!("    trafficPolicy:\n      timeouts: {timeouts}\n"));
    yaml
}

/// Sends `n` GETs one after the other on one HTTP/1.1 connection opened
/// `silent_for` before the first; returns (status, x-backend) of each.
async fn requests_on_one_silent_connection(
    proxy: SocketAddr,
    silent_for: Duration,
    n: usize,
) -> Vec<(u16, String)> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    tokio::time::sleep(silent_for).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut seen = Vec::new();
    for _ in 0..n {
        let req = Request::get("/")
            .header("host", "svc")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .expect("the connection stays usable");
        let backend = resp
            .headers()
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let status = resp.status().as_u16();
        resp.into_body().collect().await.unwrap();
        seen.push((status, backend));
    }
    seen
}

#[tokio::test]
async fn a_silent_http_connection_keeps_per_request_balancing_and_retries() {
    bounded(async {
        let a = Backend::start("a", Mode::Ok).await;
        let b = Backend::start("b", Mode::Ok).await;
        let bad = Backend::start("bad", Mode::Status(503)).await;
        let endpoints = [&bad, &a, &b].map(|x| x.addr.to_string());
        let yaml = service("auto", &endpoints, "{protocolDetection: 50ms}");
        // Round robin: with six requests, least request's random draws
        // could land them all on one of the two good endpoints.
        let yaml = yaml.replace(
            "    trafficPolicy:\n",
            "    trafficPolicy:\n      retries: {retriableStatusCodes: [503]}\n      loadBalancer: {algorithm: roundRobin}\n",
        );
        let proxy = TestProxy::start(&yaml).await;
        // Silent for four detection periods, as a pooled client's spare
        // connection is.
        let seen =
            requests_on_one_silent_connection(proxy.addr, Duration::from_millis(200), 6).await;
        assert!(
            seen.iter().all(|(s, _)| *s == 200),
            "every request succeeds (503s retried): {seen:?}"
        );
        let backends: std::collections::BTreeSet<&str> =
            seen.iter().map(|(_, b)| b.as_str()).collect();
        assert_eq!(
            backends,
            ["a", "b"].into(),
            "requests of one connection are balanced per request: {seen:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_server_first_protocol_gets_its_greeting_through() {
    bounded(async {
        let (greeter, _) = raw_server(|mut s: TcpStream| async move {
            if s.write_all(b"220 ready\r\n").await.is_ok() {
                echo(s).await;
            }
        })
        .await;
        let yaml = service("auto", &[greeter.to_string()], "{protocolDetection: 50ms}");
        let proxy = TestProxy::start(&yaml).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let mut greeting = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut greeting))
            .await
            .expect("the greeting arrives without the client speaking")
            .unwrap();
        assert_eq!(&greeting, b"220 ready\r\n");
        client.write_all(b"HELO x\r\n").await.unwrap();
        let mut reply = [0u8; 8];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"HELO x\r\n", "then bytes flow both ways");
        assert_eq!(
            proxy.metric("dataplane_proxy_forwarded_connections", &[]),
            1.0
        );
    })
    .await;
}

/// Answers HTTP/1.1 keep-alive requests with 200 and `x-backend: h1`,
/// except that it closes its `close_first` first connections at once
/// without a byte, as a server enforcing its own wait-for-request limit.
async fn http1_backend(close_first: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    raw_server(move |mut s: TcpStream| {
        let nth = count.fetch_add(1, Ordering::SeqCst);
        async move {
            if nth < close_first {
                return;
            }
            let mut buf = [0u8; 4096];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                let reply = b"HTTP/1.1 200 OK\r\nx-backend: h1\r\ncontent-length: 0\r\n\r\n";
                if s.write_all(reply).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_endpoint_closing_the_unused_early_connection_is_not_a_greeting() {
    bounded(async {
        // One endpoint, so the early connection surely goes to it.
        let (backend, accepted) = http1_backend(1).await;
        let yaml = service("auto", &[backend.to_string()], "{protocolDetection: 50ms}");
        let proxy = TestProxy::start(&yaml).await;
        let seen =
            requests_on_one_silent_connection(proxy.addr, Duration::from_millis(300), 2).await;
        assert!(
            seen.iter().all(|(s, b)| *s == 200 && b == "h1"),
            "the client's HTTP is still served: {seen:?}"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the early connection, then the pool's"
        );
        assert_eq!(
            proxy.metric("dataplane_proxy_forwarded_connections", &[]),
            0.0,
            "nothing was spliced"
        );
    })
    .await;
}

/// An HTTP/2-only server (h2's, which sends SETTINGS first, as every
/// HTTP/2 server does) answering 200 with `x-backend: h2`.
async fn http2_backend() -> SocketAddr {
    let (addr, _) = raw_server(|stream: TcpStream| async move {
        let Ok(mut conn) = h2::server::handshake(stream).await else {
            return;
        };
        while let Some(Ok((_, mut respond))) = conn.accept().await {
            let response = http::Response::builder()
                .header("x-backend", "h2")
                .body(())
                .unwrap();
            let _ = respond.send_response(response, true);
        }
    })
    .await;
    addr
}

#[tokio::test]
async fn an_http2_servers_settings_are_no_greeting() {
    bounded(async {
        let backend = http2_backend().await;
        let yaml = service("auto", &[backend.to_string()], "{protocolDetection: 50ms}").replace(
            "    endpoints:\n",
            "    upstreamProtocol: http2\n    endpoints:\n",
        );
        let proxy = TestProxy::start(&yaml).await;
        let seen =
            requests_on_one_silent_connection(proxy.addr, Duration::from_millis(300), 3).await;
        assert!(
            seen.iter().all(|(s, b)| *s == 200 && b == "h2"),
            "an HTTP/1.1 client reaches the HTTP/2 server through the HTTP path: {seen:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_silent_client_meets_the_connection_policy_before_any_endpoint_does() {
    bounded(async {
        // A connection rate limit of one: the second and third silent
        // clients are refused before an endpoint sees them.
        let (greeter, accepted) = raw_server(|mut s: TcpStream| async move {
            if s.write_all(b"220 ready\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        })
        .await;
        let yaml = service("auto", &[greeter.to_string()], "{protocolDetection: 50ms}").replace(
            "    trafficPolicy:\n",
            "    trafficPolicy:\n      rateLimit: {requestsPerSecond: 1, burst: 1}\n",
        );
        let proxy = TestProxy::start(&yaml).await;
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(proxy.addr).await.unwrap());
        }
        let mut greeted = 0;
        for client in &mut clients {
            let mut line = [0u8; 11];
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut line));
            if matches!(read.await, Ok(Ok(_))) {
                greeted += 1;
            }
        }
        assert_eq!(greeted, 1, "one client admitted");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the endpoint saw only it"
        );
        let refused = proxy.metric("dataplane_proxy_refused_connections", &["rate_limited"]);
        assert_eq!(refused, 2.0);
    })
    .await;
}

#[tokio::test]
async fn a_silent_client_with_no_reachable_endpoint_is_refused_at_once() {
    bounded(async {
        let dead = Backend::start("dead", Mode::Ok).await;
        dead.kill();
        let yaml = service(
            "auto",
            &[dead.addr.to_string()],
            "{protocolDetection: 50ms}",
        );
        let proxy = TestProxy::start(&yaml).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let closed = closed_within(&mut client, Duration::from_secs(3)).await;
        assert_eq!(
            closed,
            Some(0),
            "refused, not left waiting for the idle timeout"
        );
    })
    .await;
}

#[tokio::test]
async fn an_early_connection_counts_neither_for_nor_against_its_endpoint() {
    bounded(async {
        // consecutive5xxErrors: 2 and one endpoint answering 503 without
        // retries: 503, a silent client's early connection, 503 must
        // eject. Were the early connect a success, it would reset the
        // count in between.
        let bad = Backend::start("bad", Mode::Status(503)).await;
        let yaml = service("auto", &[bad.addr.to_string()], "{protocolDetection: 50ms}").replace(
            "    trafficPolicy:\n",
            "    trafficPolicy:\n      retries: {attempts: 0}\n      outlierDetection: {consecutive5xxErrors: 2}\n",
        );
        let proxy = TestProxy::start(&yaml).await;
        let first = requests_on_one_silent_connection(proxy.addr, Duration::ZERO, 1).await;
        let second =
            requests_on_one_silent_connection(proxy.addr, Duration::from_millis(200), 1).await;
        assert_eq!((first[0].0, second[0].0), (503, 503));
        assert_eq!(proxy.ejections(), 1.0, "{}", proxy.metrics());
    })
    .await;
}

#[tokio::test]
async fn the_early_connection_is_given_back_after_the_greeting_window() {
    bounded(async {
        // An HTTP client silent for longer than the window: its early
        // connection (and maxConnections slot) is closed meanwhile.
        let closed = Arc::new(AtomicUsize::new(0));
        let seen_close = Arc::clone(&closed);
        let (quiet, _) = raw_server(move |mut s: TcpStream| {
            let seen_close = Arc::clone(&seen_close);
            async move {
                let mut buf = [0u8; 64];
                if matches!(s.read(&mut buf).await, Ok(0)) {
                    seen_close.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .await;
        let yaml = service("auto", &[quiet.to_string()], "{protocolDetection: 50ms}");
        let proxy = TestProxy::start(&yaml).await;
        let _client = TcpStream::connect(proxy.addr).await.unwrap();
        let given_back = async {
            while closed.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), given_back)
            .await
            .expect("the early connection is closed after the greeting window");
    })
    .await;
}

/// Reads until EOF or `within`; Some(bytes read) if the proxy closed.
async fn closed_within(client: &mut TcpStream, within: Duration) -> Option<usize> {
    let mut total = 0;
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, client.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(total),
            Ok(Ok(n)) => total += n,
        }
    }
}

#[tokio::test]
async fn opaque_tcp_is_closed_after_the_idle_timeout_and_idle_zero_disables_it() {
    bounded(async {
        let (server, _) = raw_server(echo).await;
        for (idle, expect_closed) in [("300ms", true), ("0s", false)] {
            let yaml = service("tcp", &[server.to_string()], &format!("{{idle: {idle}}}"));
            let proxy = TestProxy::start(&yaml).await;
            let mut client = TcpStream::connect(proxy.addr).await.unwrap();
            client.write_all(b"ping").await.unwrap();
            let mut pong = [0u8; 4];
            client.read_exact(&mut pong).await.unwrap();
            let closed = closed_within(&mut client, Duration::from_millis(1500)).await;
            assert_eq!(closed.is_some(), expect_closed, "idle: {idle}");
            let counted = proxy.metric("dataplane_proxy_idle_timeouts", &["kind=\"tcp\""]);
            assert_eq!(
                counted,
                if expect_closed { 1.0 } else { 0.0 },
                "idle: {idle}"
            );
            if expect_closed {
                for direction in ["upstream", "downstream"] {
                    let bytes = proxy.metric("dataplane_proxy_bytes", &[direction]);
                    assert_eq!(bytes, 4.0, "{direction} bytes of an idle-closed connection");
                }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn one_way_traffic_keeps_an_opaque_connection_alive() {
    bounded(async {
        // Streams a byte every 50 ms for 1.2 s to a client that never
        // sends anything after its first bytes.
        let (streamer, _) = raw_server(|mut s: TcpStream| async move {
            let mut first = [0u8; 4];
            if s.read_exact(&mut first).await.is_err() {
                return;
            }
            for _ in 0..24 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if s.write_all(b".").await.is_err() {
                    return;
                }
            }
            // Then quiet, but open.
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let yaml = service("tcp", &[streamer.to_string()], "{idle: 300ms}");
        let proxy = TestProxy::start(&yaml).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        client.write_all(b"go!!").await.unwrap();
        // The stream lasts 1.2 s, four idle periods; then the server goes
        // quiet and the idle timeout closes the pair.
        let received = closed_within(&mut client, Duration::from_secs(5)).await;
        assert_eq!(
            received,
            Some(24),
            "every byte arrived before the idle close"
        );
        assert_eq!(
            proxy.metric("dataplane_proxy_idle_timeouts", &["kind=\"tcp\""]),
            1.0
        );
    })
    .await;
}
