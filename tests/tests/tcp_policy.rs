//! End-to-end: connection-level policy of opaque TCP services, and
//! protocol detection for `protocol: auto`.

use dataplane_tests::agent::Agent;
use dataplane_tests::http_peers;
use dataplane_tests::peers;
use dataplane_tests::scenario::{ECHO_VIP, MeshNode, ServiceSpec, backend_addr, mesh_config};
use dataplane_tests::{SimNode, require_privileges};

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn max_connections_refuses_connections_beyond_the_limit() {
    if !require_privileges("max_connections_refuses_connections_beyond_the_limit") {
        return;
    }
    let mesh = MeshNode::start_with_policy("maxconn", 1, "{connectionPool: {maxConnections: 2}}")
        .expect("mesh");
    let held = peers::hold(&mesh.node, &mesh.client, ECHO_VIP, 4, 300).expect("hold");
    let ok = held.iter().filter(|h| h.ok).count();
    assert_eq!(ok, 2, "two held, the rest refused: {held:#?}");
    assert!(
        held[2..].iter().all(|h| !h.ok && h.kind != "timeout"),
        "refused at once: {held:#?}"
    );
    // Released slots are reusable. A slot is released when the proxy's
    // forwarding ends (the client's close passed on, the backend's close
    // back), a moment after the client closed: wait for that, not race it.
    dataplane_tests::eventually(
        "the held connections released",
        std::time::Duration::from_secs(5),
        || {
            let active = mesh
                .agent
                .metrics()?
                .sum("dataplane_proxy_active_connections");
            anyhow::ensure!(active == 0.0, "{active} still active");
            Ok(())
        },
    )
    .expect("slots released");
    let later = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 2).expect("hello");
    assert!(later.iter().all(|h| h.ok), "{later:#?}");
    let metrics = mesh.agent.metrics().expect("metrics");
    assert_eq!(
        metrics.sum("dataplane_proxy_refused_connections_total{reason=\"overflow\"}"),
        2.0
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn new_connection_rate_is_limited() {
    if !require_privileges("new_connection_rate_is_limited") {
        return;
    }
    let policy = "{rateLimit: {algorithm: tokenBucket, requestsPerSecond: 2, burst: 5}}";
    let mesh = MeshNode::start_with_policy("connrate", 1, policy).expect("mesh");
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 20).expect("hello");
    let ok = hellos.iter().filter(|h| h.ok).count();
    // The burst, plus at most a couple refilled while the 20 run.
    assert!(
        (5..=7).contains(&ok),
        "burst of 5 at 2/s: {ok} admitted: {hellos:#?}"
    );
    assert!(hellos.iter().filter(|h| !h.ok).all(|h| h.kind != "timeout"));
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn refusing_endpoint_is_ejected_for_tcp_services() {
    if !require_privileges("refusing_endpoint_is_ejected_for_tcp_services") {
        return;
    }
    let policy = "{outlierDetection: {consecutiveLocalOriginFailures: 2, interval: 1s, \
        baseEjectionTime: 30s, maxEjectionPercent: 50}}";
    let mut mesh = MeshNode::start_with_policy("tcpeject", 3, policy).expect("mesh");
    mesh.kill_backend(1).expect("kill backend-2");
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 30).expect("hello");
    assert!(
        hellos.iter().all(|h| h.ok),
        "failover hides it: {hellos:#?}"
    );
    let dead = backend_addr(&mesh.backends[1].0).to_string();
    let metrics = mesh.agent.metrics().expect("metrics");
    let errors = metrics.sum(&format!(
        "dataplane_proxy_upstream_connect_errors_total{{service=\"default/echo\",endpoint=\"{dead}\"}}"
    ));
    assert_eq!(
        errors, 2.0,
        "ejected after 2 refused connects, then not tried again"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn auto_detection_serves_http_and_opaque_tcp() {
    if !require_privileges("auto_detection_serves_http_and_opaque_tcp") {
        return;
    }
    let mut node = SimNode::new("autodet").expect("node");
    let client = node.add_pod("client").expect("pod");
    let web = node.add_pod("web").expect("pod");
    let raw = node.add_pod("raw").expect("pod");
    let _web = http_peers::serve(&node, &web, "web-1").expect("http backend");
    let _raw = peers::serve(&node, &raw, "raw-1").expect("tcp backend");
    let raw_vip = "198.19.0.11:9000".parse().expect("vip");
    let services = [
        ServiceSpec {
            protocol: "auto",
            ..ServiceSpec::tcp("web", ECHO_VIP, vec![backend_addr(&web)])
        },
        ServiceSpec {
            protocol: "auto",
            ..ServiceSpec::tcp("raw", raw_vip, vec![backend_addr(&raw)])
        },
    ];
    let agent = Agent::start(&node, &mesh_config(&services, &[&client])).expect("agent");
    let url = format!("http://{ECHO_VIP}/");
    let report =
        http_peers::load(&node, &client, &["--url", &url, "--requests", "20"]).expect("load");
    assert_eq!(report.ok, 20, "{report:?}");
    let h2 = http_peers::load(
        &node,
        &client,
        &["--url", &url, "--requests", "20", "--http2"],
    )
    .expect("load");
    assert_eq!(h2.ok, 20, "{h2:?}");
    // A server-speaks-first protocol: detection waits, then forwards bytes.
    let hellos = peers::hello(&node, &client, raw_vip, 3).expect("hello");
    assert!(
        hellos.iter().all(|h| h.ok && h.backend == "raw-1"),
        "{hellos:#?}"
    );
    let metrics = agent.metrics().expect("metrics");
    assert_eq!(
        metrics.sum("dataplane_http_responses_total{service=\"default/web\""),
        40.0,
        "HTTP was detected and served by the HTTP path"
    );
    assert_eq!(
        metrics.sum("dataplane_http_responses_total{service=\"default/raw\""),
        0.0
    );
}
