//! End-to-end: capture of enrolled pods and forwarding by the node proxy,
//! on a simulated node with real processes, sockets and eBPF programs.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use dataplane_tests::agent::{Agent, attached_programs};
use dataplane_tests::peers::{self, Hello};
use dataplane_tests::scenario::{ECHO_VIP, MeshNode, ServiceSpec, backend_addr, mesh_config};
use dataplane_tests::simnode::new_pod_uid;
use dataplane_tests::{SimNode, binaries, bpfmaps, require_privileges};

/// Answers per backend; panics with the failures if any attempt failed.
fn answers_by_backend(hellos: &[Hello]) -> BTreeMap<String, usize> {
    let failed: Vec<&Hello> = hellos.iter().filter(|h| !h.ok).collect();
    assert!(failed.is_empty(), "failed attempts: {failed:#?}");
    let mut by_backend = BTreeMap::new();
    for hello in hellos {
        *by_backend.entry(hello.backend.clone()).or_default() += 1;
    }
    by_backend
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn enrolled_pod_reaches_the_vip_spread_over_all_backends() {
    if !require_privileges("enrolled_pod_reaches_the_vip_spread_over_all_backends") {
        return;
    }
    let mesh = MeshNode::start("spread", 3).expect("mesh node");
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 30).expect("hello");
    let by_backend = answers_by_backend(&hellos);
    assert_eq!(
        by_backend.len(),
        3,
        "all three backends answer: {by_backend:?}"
    );
    assert!(
        by_backend.values().all(|&n| n == 10),
        "round robin: {by_backend:?}"
    );
    let node_ip = mesh.node.node_ip().to_string();
    assert!(
        hellos.iter().all(|h| h.peer_ip() == Some(node_ip.as_str())),
        "every connection arrives from the node proxy"
    );
    let metrics = mesh.agent.metrics().expect("metrics");
    assert_eq!(metrics.captured(), 30, "eBPF counted every redirect");
    assert_eq!(
        metrics.forwarded(),
        30,
        "the proxy forwarded every connection"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn only_enrolled_pods_and_mesh_destinations_are_captured() {
    if !require_privileges("only_enrolled_pods_and_mesh_destinations_are_captured") {
        return;
    }
    let mut mesh = MeshNode::start("scope", 1).expect("mesh node");
    let outsider = mesh.node.add_pod("outsider").expect("pod");
    let backend = backend_addr(&mesh.backends[0].0);

    // A pod outside the mesh is not captured: the VIP is not routable, so
    // its connect fails at once (host unreachable), not after a timeout.
    let hellos = peers::hello(&mesh.node, &outsider, ECHO_VIP, 3).expect("hello");
    assert!(
        hellos.iter().all(|h| !h.ok && h.kind == "unreachable"),
        "not captured: {hellos:#?}"
    );
    // An enrolled pod's traffic to a non-mesh address goes direct.
    let direct = peers::hello(&mesh.node, &mesh.client, backend, 3).expect("hello");
    let client_ip = mesh.client.ip.to_string();
    assert!(
        direct
            .iter()
            .all(|h| h.ok && h.peer_ip() == Some(client_ip.as_str())),
        "untouched: the backend sees the client itself: {direct:#?}"
    );
    // So does its traffic to a VIP port that is not a service.
    let other_port = SocketAddrV4::new(*ECHO_VIP.ip(), 81);
    let hellos = peers::hello(&mesh.node, &mesh.client, other_port, 2).expect("hello");
    assert!(
        hellos.iter().all(|h| h.kind == "unreachable"),
        "{hellos:#?}"
    );

    let metrics = mesh.agent.metrics().expect("metrics");
    assert_eq!(metrics.captured(), 0, "nothing was redirected");
    // Still captured after all that: the enrolled pod reaches the VIP.
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 1).expect("hello");
    assert!(hellos[0].ok, "{hellos:#?}");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn killed_backend_is_skipped_without_failed_connections() {
    if !require_privileges("killed_backend_is_skipped_without_failed_connections") {
        return;
    }
    let mut mesh = MeshNode::start("failover", 3).expect("mesh node");
    mesh.kill_backend(1).expect("kill backend-2");
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 30).expect("hello");
    let by_backend = answers_by_backend(&hellos);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-3"],
        "the remaining two answer everything"
    );
    let metrics = mesh.agent.metrics().expect("metrics");
    assert!(
        metrics.sum("dataplane_proxy_upstream_connect_errors_total") >= 1.0,
        "the dead endpoint was tried and counted"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn bulk_transfer_is_byte_exact_with_half_close() {
    if !require_privileges("bulk_transfer_is_byte_exact_with_half_close") {
        return;
    }
    let mesh = MeshNode::start("bulk", 1).expect("mesh node");
    // The client half-closes after sending and must still get every byte
    // of the echo back: 256 MiB each way.
    let size = 256 * 1024 * 1024;
    let transfer = peers::transfer(&mesh.node, &mesh.client, ECHO_VIP, size).expect("transfer");
    assert_eq!(transfer.error, None);
    assert_eq!((transfer.sent, transfer.received), (size, size));
    assert!(transfer.matched, "content differs: {transfer:?}");
    // A small request answered after the client's shutdown(SHUT_WR).
    let small = peers::transfer(&mesh.node, &mesh.client, ECHO_VIP, 5).expect("transfer");
    assert!(small.matched && small.received == 5, "{small:?}");
    // The counter is updated when the proxy's forwarding task ends, just
    // after the client saw EOF.
    let counted = dataplane_tests::eventually("bytes counted", Duration::from_secs(5), || {
        let metrics = mesh.agent.metrics()?;
        let upstream = metrics.sum("dataplane_proxy_bytes_total{direction=\"upstream\"}");
        anyhow::ensure!(upstream >= size as f64, "upstream bytes so far: {upstream}");
        Ok(upstream)
    });
    counted.expect("proxy counted the bytes");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn agent_restart_keeps_capture_and_cleanup_removes_it() {
    if !require_privileges("agent_restart_keeps_capture_and_cleanup_removes_it") {
        return;
    }
    let mut mesh = MeshNode::start("restart", 2).expect("mesh node");
    let pods_cgroup = mesh.node.pods_cgroup();
    let node_cgroup = mesh.node.node_cgroup();
    assert!(peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 1).expect("hello")[0].ok);

    mesh.agent.kill().expect("SIGKILL the agent");
    // The pinned programs still capture: the connect goes to the (dead)
    // proxy and is refused, instead of leaking past the mesh.
    let down = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 2).expect("hello");
    assert!(
        down.iter().all(|h| h.kind == "refused"),
        "still captured: {down:#?}"
    );
    assert!(
        attachments(&node_cgroup).is_empty(),
        "the proxy-side hook died with the proxy"
    );

    mesh.agent.spawn(&mesh.node).expect("restart");
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 10).expect("hello");
    assert_eq!(answers_by_backend(&hellos).len(), 2);
    assert_eq!(
        attachments(&pods_cgroup),
        [
            "cgroup_inet4_connect:dp_connect4",
            "cgroup_inet6_connect:dp_connect6",
            "cgroup_inet_sock_release:dp_sock_release",
            "cgroup_sock_ops:dp_sockops"
        ],
        "exactly one of each after the restart"
    );
    assert_eq!(
        attachments(&node_cgroup),
        ["cgroup_getsockopt:dp_getsockopt"]
    );

    mesh.agent.kill().expect("stop");
    let report = mesh.agent.cleanup().expect("cleanup");
    assert!(String::from_utf8_lossy(&report.stdout).contains("detached 4 links"));
    assert!(!mesh.agent.pin_dir().exists(), "no pinned object is left");
    assert!(attachments(&pods_cgroup).is_empty(), "nothing attached");
    assert!(attachments(&node_cgroup).is_empty(), "nothing attached");
}

/// `attach_type:name` of every program attached to `cgroup`, sorted.
fn attachments(cgroup: &std::path::Path) -> Vec<String> {
    let mut list: Vec<String> = attached_programs(cgroup)
        .expect("bpftool")
        .into_iter()
        .map(|(kind, name)| format!("{kind}:{name}"))
        .collect();
    list.sort();
    list
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn service_without_endpoints_is_refused_at_once() {
    if !require_privileges("service_without_endpoints_is_refused_at_once") {
        return;
    }
    let mut node = SimNode::new("noep").expect("node");
    let client = node.add_pod("client").expect("pod");
    let empty = ServiceSpec::tcp("empty", ECHO_VIP, Vec::new());
    let agent = Agent::start(&node, &mesh_config(&[empty], &[&client])).expect("agent");
    let hellos = peers::hello(&node, &client, ECHO_VIP, 3).expect("hello");
    assert!(
        hellos
            .iter()
            .all(|h| !h.ok && matches!(h.kind.as_str(), "reset" | "eof")),
        "closed by the proxy, not left hanging (a hang would be kind=timeout): {hellos:#?}"
    );
    let metrics = agent.metrics().expect("metrics");
    assert_eq!(
        metrics.sum("dataplane_proxy_refused_connections_total{reason=\"no_endpoints\"}"),
        3.0
    );
    drop(agent);
    drop(node);
}

/// Pods that start after the agent, with the periodic walk a minute away:
/// each pod's cgroup is enrolled as it appears (the agent watches the
/// cgroup tree), so its very first connect to the VIP goes through the
/// proxy. The second pod sits in a QoS-class cgroup (`burstable/`) that did
/// not exist when the agent started: new levels are watched as they appear.
#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn pods_started_after_the_agent_are_captured_from_their_first_connect() {
    if !require_privileges("pods_started_after_the_agent_are_captured_from_their_first_connect") {
        return;
    }
    let mut node = SimNode::new("late").expect("node");
    let backend = node.add_pod("backend-1").expect("pod");
    let _server = peers::serve(&node, &backend, "backend-1").expect("backend");
    let late = [
        ("late", new_pod_uid(), None),
        ("late-burstable", new_pod_uid(), Some("burstable")),
    ];
    let echo = ServiceSpec::tcp("echo", ECHO_VIP, vec![backend_addr(&backend)]);
    let mut config = mesh_config(&[echo], &[]);
    for (name, uid, _) in &late {
        config.push_str(&format!("  - uid: {uid}\n    name: {name}\n"));
    }
    let agent = Agent::start_with(&node, &config, &["--resync=60s"]).expect("agent");

    let node_ip = node.node_ip().to_string();
    for (name, uid, qos) in &late {
        let pod = node.add_pod_as(name, uid, *qos).expect("pod");
        let first = peers::hello(&node, &pod, ECHO_VIP, 1).expect("hello");
        assert!(
            first[0].ok && first[0].peer_ip() == Some(node_ip.as_str()),
            "the first connect of {name} went through the node proxy: {first:#?}\nagent log:\n{}",
            agent.log()
        );
    }
    let metrics = agent.metrics().expect("metrics");
    assert_eq!(metrics.captured(), 2, "each first connect was redirected");
}

/// Removes an agent's pin directory (with `dataplane-agent cleanup`) when
/// a test put something there before any agent ran.
struct PinDirGuard(PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let Ok(agent) = binaries::agent() else { return };
        let _ = Command::new(agent)
            .arg("cleanup")
            .arg(format!("--pin-dir={}", self.0.display()))
            .output();
    }
}

/// A pinned map of another layout, as a release that changed a map without
/// bumping the maps directory would leave: the agent replaces it, saying
/// which map and both layouts, and captures as usual. Restarted, it keeps
/// the map (no false alarm when the layouts match).
#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_pinned_map_of_another_layout_is_replaced_with_a_warning() {
    if !require_privileges("a_pinned_map_of_another_layout_is_replaced_with_a_warning") {
        return;
    }
    let mut node = SimNode::new("layout").expect("node");
    let client = node.add_pod("client").expect("pod");
    let backend = node.add_pod("backend-1").expect("pod");
    let _server = peers::serve(&node, &backend, "backend-1").expect("backend");
    let pin_dir = Agent::pin_dir_of(&node);
    let _guard = PinDirGuard(pin_dir.clone());
    let maps_dir = pin_dir.join("maps-v1");
    std::fs::create_dir_all(&maps_dir).expect("pin dir on bpffs");
    let stale = maps_dir.join("DP_ENROLLED");
    bpfmaps::create_pinned_map(&stale, "DP_ENROLLED", "hash", 4, 4, 16).expect("stale map");

    let echo = ServiceSpec::tcp("echo", ECHO_VIP, vec![backend_addr(&backend)]);
    let mut agent = Agent::start(&node, &mesh_config(&[echo], &[&client])).expect("agent");
    let log = agent.log();
    let warning = log
        .lines()
        .find(|line| line.contains("layout differs"))
        .unwrap_or_else(|| panic!("no warning about the stale map in:\n{log}"));
    for want in [
        "DP_ENROLLED",
        "Hash (key 4 B, value 4 B, 16 entries",
        "Hash (key 8 B, value 4 B, 4096 entries",
    ] {
        assert!(warning.contains(want), "{want:?} missing from: {warning}");
    }
    let replaced = bpfmaps::map_shape(&stale).expect("map");
    assert_eq!(
        (
            replaced.kind.as_str(),
            replaced.key_size,
            replaced.value_size
        ),
        ("hash", 8, 4),
        "the programs' layout is pinned now"
    );
    let hello = peers::hello(&node, &client, ECHO_VIP, 1).expect("hello");
    let node_ip = node.node_ip().to_string();
    assert!(
        hello[0].ok && hello[0].peer_ip() == Some(node_ip.as_str()),
        "captured through the replaced map: {hello:#?}"
    );

    agent.kill().expect("stop");
    agent.spawn(&node).expect("restart");
    assert_eq!(
        bpfmaps::map_shape(&stale).expect("map").id,
        replaced.id,
        "a map of the right layout is kept across restarts"
    );
    assert_eq!(agent.log().matches("layout differs").count(), 1);
}
