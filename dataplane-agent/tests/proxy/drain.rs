//! Graceful drain through the real proxy, in-process on loopback: what a
//! SIGTERM does (`Runtime::drain` calls the same `Proxy::drain`). HTTP
//! clients finish what is in flight and are told to go; nothing new is
//! accepted; the drain returns as soon as no connection is left, or at its
//! deadline with what is left.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use support::{Backend, Mode, TestProxy, bounded, client, config, raw_server};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Drains the proxy in a task of its own; resolves to what was left.
fn start_drain(proxy: &TestProxy) -> tokio::task::JoinHandle<i64> {
    let proxy = std::sync::Arc::clone(&proxy.proxy);
    tokio::spawn(async move { proxy.drain(Duration::from_secs(10)).await })
}

/// The rest of the connection is one 200 saying `Connection: close`,
/// then the close.
async fn assert_last_response(stream: &mut TcpStream) {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the connection closes after the response")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

#[tokio::test]
async fn an_http1_request_in_flight_finishes_with_connection_close() {
    bounded(async {
        let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(400))).await;
        let proxy = TestProxy::start(&config(&[&slow], "")).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            .await
            .unwrap();
        slow.arrived(1).await;
        let started = Instant::now();
        let drained = start_drain(&proxy);
        assert_last_response(&mut stream).await;
        assert_eq!(drained.await.unwrap(), 0, "no connection left");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the drain ended with the last connection"
        );
        assert!(
            TcpStream::connect(proxy.addr).await.is_err(),
            "no new connection is accepted"
        );
    })
    .await;
}

#[tokio::test]
async fn an_http2_stream_in_flight_finishes_after_goaway() {
    bounded(async {
        let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(400))).await;
        let proxy = TestProxy::start(&config(&[&slow], "")).await;
        let h2 = client(true);
        let in_flight = tokio::spawn({
            let h2 = h2.clone();
            let uri = format!("http://{}/", proxy.addr);
            async move {
                let resp = h2
                    .request(Request::get(uri).body(Full::<Bytes>::default()).unwrap())
                    .await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
            }
        });
        slow.arrived(1).await;
        let left = proxy.proxy.drain(Duration::from_secs(10)).await;
        assert_eq!(in_flight.await.unwrap().unwrap(), StatusCode::OK);
        assert_eq!(left, 0, "the connection ended after its last stream");
        let after = h2
            .request(
                Request::get(format!("http://{}/", proxy.addr))
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert!(
            after.is_err(),
            "no new stream or connection after the drain"
        );
    })
    .await;
}

#[tokio::test]
async fn opaque_connections_run_until_the_deadline() {
    bounded(async {
        let (server, _) = raw_server(|mut s: TcpStream| async move {
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
        let yaml = format!(
            "services:\n  - name: db\n    vip: 198.19.0.30:5432\n    protocol: tcp\n    endpoints:\n      - address: {server}\n"
        );
        let proxy = TestProxy::start(&yaml).await;
        let mut open = TcpStream::connect(proxy.addr).await.unwrap();
        open.write_all(b"hello").await.unwrap();
        support::eventually(Duration::from_secs(5), || {
            proxy.metric("dataplane_proxy_forwarded_connections", &[]) == 1.0
        })
        .await;
        let started = Instant::now();
        let left = proxy.proxy.drain(Duration::from_millis(400)).await;
        assert_eq!(left, 1, "the TCP connection is not cut before the deadline");
        assert!(started.elapsed() >= Duration::from_millis(400));
        open.write_all(b"still here").await.expect("still open during the drain");
    })
    .await;
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body).
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed mid-response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn an_idle_http1_connection_is_answered_once_more_with_connection_close() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let proxy = TestProxy::start(&config(&[&backend], "")).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let request = b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n";
        stream.write_all(request).await.unwrap();
        let first = read_response(&mut stream).await;
        assert!(first.starts_with("http/1.1 200"), "{first}");
        assert!(!first.contains("connection: close"), "{first}");
        // The connection is idle when the drain starts: closing it now
        // would race the client's next request.
        let drained = start_drain(&proxy);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(request).await.expect("still open");
        assert_last_response(&mut stream).await;
        assert_eq!(drained.await.unwrap(), 0, "no connection left");
    })
    .await;
}

#[tokio::test]
async fn an_http1_connection_idle_through_the_grace_is_closed() {
    bounded(async {
        let backend = Backend::start("b", Mode::Ok).await;
        let proxy = TestProxy::start(&config(&[&backend], "")).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut stream).await;
        let started = Instant::now();
        let left = proxy.proxy.drain(Duration::from_secs(10)).await;
        assert_eq!(left, 0, "closed before the deadline");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1900),
            "kept open for its next request a while: {waited:?}"
        );
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "closed without a response: {rest:?}");
    })
    .await;
}
