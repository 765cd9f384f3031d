//! The admin endpoint as the agent starts it (`Runtime::start`), in-process
//! on loopback: `/config_dump` shows the config in force, `/ready` and
//! `/metrics` answer, anything else is refused.

use crate::support;

use std::net::SocketAddr;

use dataplane_agent::state::NodeContext;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Backend, Mode, Reply, TestProxy, bounded, client, config, get_with, policy, send};

async fn admin(addr: SocketAddr, method: http::Method, path: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap();
    send(&client(false), req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_shows_the_config_in_force() {
    bounded(async {
        let a = Backend::start("a", Mode::Ok).await;
        let b = Backend::start("b", Mode::Ok).await;
        let extra = policy(&[
            "outlierDetection: {consecutive5xxErrors: 7}",
            "retries: {perTryTimeout: 250ms}",
        ]);
        let mut yaml = config(&[&a, &b], &extra);
        yaml.push_str("pods:\n  - {uid: pod-a, name: client, ip: 127.0.0.2}\n");
        let proxy = TestProxy::start_agent(&yaml, NodeContext::default()).await;
        let admin_addr = proxy.admin.unwrap();

        let dump = admin(admin_addr, http::Method::GET, "/config_dump").await;
        assert_eq!(dump.status, StatusCode::OK);
        assert_eq!(dump.header("content-type"), Some("application/json"));
        let json: serde_json::Value = serde_json::from_slice(&dump.body).unwrap();
        let service = &json["services"][0];
        assert_eq!(service["name"], "echo");
        assert_eq!(service["namespace"], "default");
        assert_eq!(service["vip"], "198.19.0.10:80");
        assert_eq!(service["protocol"], "http");
        let endpoints: Vec<&str> = service["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].as_str().unwrap())
            .collect();
        assert_eq!(endpoints, [a.addr.to_string(), b.addr.to_string()]);
        let policy = &service["trafficPolicy"];
        // What was set, and the defaults filled in around it.
        assert_eq!(policy["outlierDetection"]["consecutive5xxErrors"], 7);
        assert_eq!(policy["outlierDetection"]["maxEjectionPercent"], 10.0);
        assert_eq!(policy["retries"]["perTryTimeout"], "250ms");
        assert_eq!(policy["retries"]["attempts"], 2);
        assert_eq!(json["pods"][0]["uid"], "pod-a");
        assert_eq!(json["pods"][0]["ip"], "127.0.0.2");

        let ready = admin(admin_addr, http::Method::GET, "/ready").await;
        assert_eq!(ready.status, StatusCode::OK);
        let live = admin(admin_addr, http::Method::GET, "/healthz").await;
        assert_eq!(live.status, StatusCode::OK);
        // A request through the proxy shows in the admin's metrics.
        assert_eq!(
            get_with(&client(false), &proxy, &[]).await.status,
            StatusCode::OK
        );
        let metrics = admin(admin_addr, http::Method::GET, "/metrics").await;
        assert_eq!(metrics.status, StatusCode::OK);
        let text = String::from_utf8_lossy(&metrics.body);
        assert!(
            text.lines()
                .any(|l| l.starts_with("dataplane_http_responses_total")
                    && l.contains("code=\"200\"")
                    && l.ends_with(" 1")),
            "{text}"
        );
        let post = admin(admin_addr, http::Method::POST, "/config_dump").await;
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
        let missing = admin(admin_addr, http::Method::GET, "/nothing").await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_shows_each_endpoints_health_and_each_breakers_use() {
    bounded(async {
        let good = Backend::start("good", Mode::Ok).await;
        let bad = Backend::start("bad", Mode::Status(503)).await;
        let extra = policy(&[
            "outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 30s, maxEjectionPercent: 50}",
            "connectionPool: {maxRequests: 100}",
            // Round robin: the bad endpoint's turn comes within the four.
            "loadBalancer: {algorithm: roundRobin}",
        ]);
        let proxy = TestProxy::start_agent(&config(&[&good, &bad], &extra), NodeContext::default())
            .await;
        let admin_addr = proxy.admin.unwrap();
        for _ in 0..4 {
            get_with(&client(false), &proxy, &[]).await;
        }
        let reply = admin(admin_addr, http::Method::GET, "/clusters").await;
        assert_eq!(reply.status, StatusCode::OK);
        let clusters: dataplane_agent::admin::Clusters = serde_json::from_slice(&reply.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.body)));
        let [service] = &clusters.services[..] else {
            panic!("one service: {clusters:?}");
        };
        assert_eq!(service.service, "default/echo");
        assert!(service.outlier_detection);
        let endpoint = |addr: std::net::SocketAddrV4| {
            service
                .endpoints
                .iter()
                .find(|e| e.address == addr.to_string())
                .unwrap()
        };
        let (good, bad) = (endpoint(good.addr), endpoint(bad.addr));
        assert_eq!(good.health, "healthy");
        assert_eq!(bad.health, "ejected");
        assert_eq!(bad.ejections, Some(1));
        let left = bad.ejected_for_ms.unwrap();
        assert!((20_000..=30_000).contains(&left), "ejected for {left} ms more");
        let requests = service
            .circuit_breakers
            .iter()
            .find(|b| b.limit == "max_requests")
            .unwrap();
        assert_eq!((requests.in_use, requests.max), (0, 100));
        assert_eq!(good.active + bad.active, 0, "nothing in flight");
    })
    .await
}
