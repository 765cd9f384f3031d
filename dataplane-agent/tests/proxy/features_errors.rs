//! Every failure reason the README lists reaches the caller through the
//! real proxy, in-process on loopback: the proxy's own replies carry
//! `x-dataplane-error` (and are counted by reason), a retry the proxy
//! refused is named on the backend's own response with its status kept,
//! circuit-breaker overflows name their limit, and a fallback replaces the
//! bare 503.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Backend, Mode, Reply, TestProxy, bounded, client, config, get_with, policy, send};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn get(proxy: &TestProxy) -> Reply {
    get_with(&client(false), proxy, &[]).await
}

/// A raw HTTP/1 exchange: the status and the head's header lines
/// (lowercased names), read until the proxy closes or 3 s pass.
async fn raw(proxy: &TestProxy, request: &[u8]) -> (u16, Vec<(String, String)>) {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !all.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .expect("an answer");
    let text = String::from_utf8_lossy(&all).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

fn local_replies(proxy: &TestProxy, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    proxy.metric("dataplane_http_local_replies_total", &[&label])
}

/// The proxy's answer for `reason`, from a setup that provokes it.
async fn provoke(reason: &str) -> (TestProxy, u16, Option<String>, Vec<(String, String)>) {
    let no_retry = "retries: {attempts: 0}";
    let reply = |proxy: TestProxy, r: Reply| {
        let headers = r
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        (
            proxy,
            r.status.as_u16(),
            r.error().map(str::to_string),
            headers,
        )
    };
    match reason {
        "no_healthy_upstream" => {
            let b = Backend::start("b", Mode::Status(503)).await;
            let extra = policy(&[
                no_retry,
                "outlierDetection: {consecutive5xxErrors: 1}",
                "loadBalancer: {panicThreshold: 0}",
            ]);
            let proxy = TestProxy::start(&config(&[&b], &extra)).await;
            assert_eq!(get(&proxy).await.backend(), Some("b"), "ejects it");
            let r = get(&proxy).await;
            assert_eq!(b.hits(), 1, "nothing sent to an ejected endpoint");
            reply(proxy, r)
        }
        "upstream_connect_failure" => {
            let b = Backend::start("b", Mode::Ok).await;
            b.kill();
            let proxy = TestProxy::start(&config(&[&b], &policy(&[no_retry]))).await;
            let r = get(&proxy).await;
            reply(proxy, r)
        }
        "upstream_reset" => {
            let b = Backend::start("b", Mode::Reset).await;
            let proxy = TestProxy::start(&config(&[&b], &policy(&[no_retry]))).await;
            let r = get(&proxy).await;
            reply(proxy, r)
        }
        "upstream_per_try_timeout" => {
            let b = Backend::start("b", Mode::Hang).await;
            let extra = policy(&["retries: {attempts: 0, perTryTimeout: 100ms}"]);
            let proxy = TestProxy::start(&config(&[&b], &extra)).await;
            let r = get(&proxy).await;
            reply(proxy, r)
        }
        "request_timeout" => {
            let b = Backend::start("b", Mode::Delay(Duration::from_secs(3))).await;
            let extra = policy(&["timeouts: {request: 200ms}"]);
            let proxy = TestProxy::start(&config(&[&b], &extra)).await;
            let r = get(&proxy).await;
            reply(proxy, r)
        }
        "rate_limited" => {
            let b = Backend::start("b", Mode::Ok).await;
            let extra = policy(&["rateLimit: {requestsPerSecond: 1, burst: 1}"]);
            let proxy = TestProxy::start(&config(&[&b], &extra)).await;
            assert_eq!(get(&proxy).await.status, StatusCode::OK);
            let r = get(&proxy).await;
            reply(proxy, r)
        }
        "overflow" => {
            let b = Backend::start("b", Mode::Delay(Duration::from_millis(300))).await;
            let extra = policy(&["connectionPool: {maxRequests: 1}"]);
            let proxy = TestProxy::start(&config(&[&b], &extra)).await;
            let client = client(false);
            let first = get_with(&client, &proxy, &[]);
            let second = async {
                b.arrived(1).await;
                get_with(&client, &proxy, &[]).await
            };
            let (first, r) = tokio::join!(first, second);
            assert_eq!(first.status, StatusCode::OK);
            reply(proxy, r)
        }
        "bad_request_body" | "upgrade_not_supported" | "connect_not_supported" => {
            let b = Backend::start("b", Mode::Echo).await;
            let proxy = TestProxy::start(&config(&[&b], "")).await;
            let request: &[u8] = match reason {
                "bad_request_body" => {
                    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"
                }
                // Upgrades are carried over HTTP/1.1 only.
                "upgrade_not_supported" => {
                    b"GET / HTTP/1.0\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                }
                _ => b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            };
            let (status, headers) = raw(&proxy, request).await;
            let error = headers
                .iter()
                .find(|(n, _)| n == "x-dataplane-error")
                .map(|(_, v)| v.clone());
            if reason != "bad_request_body" {
                assert_eq!(b.hits(), 0, "{reason}: never sent");
            }
            (proxy, status, error, headers)
        }
        other => unreachable!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_replies_name_why() {
    bounded(async {
        let cases = [
            ("no_healthy_upstream", 503),
            ("upstream_connect_failure", 503),
            ("upstream_reset", 503),
            ("upstream_per_try_timeout", 504),
            ("request_timeout", 504),
            ("rate_limited", 429),
            ("overflow", 503),
            ("bad_request_body", 400),
            ("upgrade_not_supported", 501),
            ("connect_not_supported", 501),
        ];
        for (reason, status) in cases {
            let (proxy, got, error, headers) = provoke(reason).await;
            assert_eq!(got, status, "{reason}: {headers:?}");
            assert_eq!(error.as_deref(), Some(reason), "{headers:?}");
            assert_eq!(local_replies(&proxy, reason), 1.0, "{reason}: counted");
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
            };
            match reason {
                "overflow" => assert_eq!(header("x-dataplane-overflow"), Some("max_requests")),
                "rate_limited" => assert_eq!(header("retry-after"), Some("1")),
                _ => assert_eq!(header("x-dataplane-overflow"), None, "{reason}"),
            }
            assert_eq!(header("x-backend"), None, "{reason}: no backend answered");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_retry_is_named_on_the_backends_own_response() {
    bounded(async {
        // (policy, backend mode, request body, the refusal)
        let big = vec![7u8; 70_000];
        let cases: [(&str, Mode, Option<&[u8]>, &str); 4] = [
            (
                "retries: {budget: {retryPercent: 0, minRetriesPerSecond: 0}}",
                Mode::Status(503),
                None,
                "retry_budget_exhausted",
            ),
            (
                "connectionPool: {maxRetries: 0}",
                Mode::Status(503),
                None,
                "retry_overflow",
            ),
            (
                "retries: {attempts: 1}",
                Mode::Status(503),
                None,
                "retries_exhausted",
            ),
            (
                "retries: {}",
                Mode::DrainThen(503),
                Some(&big),
                "retry_body_too_large",
            ),
        ];
        for (section, mode, body, reason) in cases {
            let b = Backend::start("b", mode).await;
            let proxy = TestProxy::start(&config(&[&b], &policy(&[section]))).await;
            let r = match body {
                // PUT: idempotent, so only the size stops the retry.
                Some(body) => {
                    let req = Request::put(proxy.url())
                        .body(Full::new(Bytes::copy_from_slice(body)))
                        .unwrap();
                    send(&client(false), req).await
                }
                None => get(&proxy).await,
            };
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{reason}: kept");
            assert_eq!(r.backend(), Some("b"), "{reason}: the backend's answer");
            assert_eq!(r.error(), Some(reason));
            let tries = if reason == "retries_exhausted" { 2 } else { 1 };
            assert_eq!(b.hits(), tries, "{reason}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_up_after_a_local_failure_names_both() {
    bounded(async {
        let b = Backend::start("b", Mode::Ok).await;
        b.kill();
        let proxy = TestProxy::start(&config(&[&b], "")).await;
        let started = Instant::now();
        let r = get(&proxy).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.error(),
            Some("upstream_connect_failure, retries_exhausted")
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refused, not hung"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_replaces_the_bare_503() {
    bounded(async {
        let fallback = "fallback: {status: 200, headers: {x-sorry: \"yes\"}, body: \"try later\"}";
        // No usable endpoint.
        let b = Backend::start("b", Mode::Status(503)).await;
        let extra = policy(&[
            "retries: {attempts: 0}",
            "outlierDetection: {consecutive5xxErrors: 1}",
            "loadBalancer: {panicThreshold: 0}",
            fallback,
        ]);
        let proxy = TestProxy::start(&config(&[&b], &extra)).await;
        get(&proxy).await;
        let r = get(&proxy).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"try later");
        assert_eq!(r.header("x-sorry"), Some("yes"));
        assert_eq!(
            r.header("x-dataplane-fallback"),
            Some("no_healthy_upstream")
        );
        // A circuit breaker: the fallback, still naming the limit.
        let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(300))).await;
        let extra = policy(&["connectionPool: {maxRequests: 1}", fallback]);
        let proxy = TestProxy::start(&config(&[&slow], &extra)).await;
        let client = client(false);
        let first = get_with(&client, &proxy, &[]);
        let second = async {
            slow.arrived(1).await;
            get_with(&client, &proxy, &[]).await
        };
        let (_, r) = tokio::join!(first, second);
        assert_eq!(&r.body[..], b"try later");
        assert_eq!(r.header("x-dataplane-fallback"), Some("max_requests"));
        assert_eq!(r.header("x-dataplane-overflow"), Some("max_requests"));
        assert_eq!(
            proxy.metric(
                "dataplane_policy_fallbacks_total",
                &["reason=\"max_requests\""]
            ),
            1.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_overflows_http_requests_and_refuses_tcp_connections() {
    bounded(async {
        let slow = Backend::start("slow", Mode::Delay(Duration::from_millis(300))).await;
        let extra = policy(&["connectionPool: {maxConnections: 1}"]);
        let proxy = TestProxy::start(&config(&[&slow], &extra)).await;
        let client = client(false);
        // The first request holds the only upstream connection.
        let first = get_with(&client, &proxy, &[]);
        let second = async {
            slow.arrived(1).await;
            get_with(&client, &proxy, &[]).await
        };
        let (first, r) = tokio::join!(first, second);
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error(), Some("overflow"));
        assert_eq!(r.header("x-dataplane-overflow"), Some("max_connections"));
        assert_eq!(slow.hits(), 1);
        // Opaque TCP: the connection beyond the limit is refused at once.
        let ok = Backend::start("ok", Mode::Ok).await;
        let yaml = support::config_with("tcp", &[support::endpoint(&ok, "")], &extra);
        let proxy = TestProxy::start(&yaml).await;
        let mut held = TcpStream::connect(proxy.addr).await.unwrap();
        held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        held.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        // Reset at once: on loopback even the connect may report it.
        let refused = async {
            let mut s = TcpStream::connect(proxy.addr).await?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
            let mut buf = [0u8; 64];
            s.read(&mut buf).await
        };
        let read = tokio::time::timeout(Duration::from_secs(3), refused).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the second connection was served: {read:?}"
        );
        let label = "reason=\"overflow\"";
        assert_eq!(
            proxy.metric("dataplane_proxy_refused_connections_total", &[label]),
            1.0
        );
        drop(held);
    })
    .await
}
