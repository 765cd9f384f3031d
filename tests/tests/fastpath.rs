//! End-to-end: the kernel fast path (`--fast-path on`), on a simulated
//! node with real processes, sockets and eBPF programs. The data between
//! the enrolled client and the node proxy, and between the proxy and the
//! backend pod, goes socket to socket; what the applications see must not
//! change: every byte, in order, half-close and reset passed on, many
//! connections at once, and no map entry left behind.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use dataplane_tests::agent::Agent;
use dataplane_tests::bench_peers;
use dataplane_tests::peers;
use dataplane_tests::scenario::{ServiceSpec, backend_addr, mesh_config};
use dataplane_tests::{Pod, Proc, SimNode, bpfmaps, require_privileges};

/// The greeting echo service (`meshtool serve`).
const ECHO_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
/// The plain echo service (`benchtool echo-serve`), for many connections.
const RR_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 20), 9000);
const RR_PORT: u16 = 9000;
/// The echo server in the node's own namespace.
const OFF_PORT: u16 = 9100;

/// A node with one enrolled client and one backend pod serving both
/// services, the agent on the fast path. Fields drop in order.
struct FastNode {
    agent: Agent,
    _echo: Proc,
    rr: Option<Proc>,
    _backend: Pod,
    client: Pod,
    node: SimNode,
}

impl FastNode {
    fn start(hint: &str) -> anyhow::Result<FastNode> {
        let mut node = SimNode::new(hint)?;
        let client = node.add_pod("client")?;
        let backend = node.add_pod("backend-1")?;
        let echo = peers::serve(&node, &backend, "backend-1")?;
        let rr = bench_peers::echo_serve(&node, &backend, RR_PORT)?;
        let services = [
            ServiceSpec::tcp("echo", ECHO_VIP, vec![backend_addr(&backend)]),
            ServiceSpec::tcp("rr", RR_VIP, vec![SocketAddrV4::new(backend.ip, RR_PORT)]),
        ];
        let config = mesh_config(&services, &[&client]);
        let agent = Agent::start_with(&node, &config, &["--fast-path=on"])?;
        Ok(FastNode {
            agent,
            _echo: echo,
            rr: Some(rr),
            _backend: backend,
            client,
            node,
        })
    }

    fn counter(&self, name: &str) -> f64 {
        self.agent
            .metrics()
            .map(|m| m.sum(&format!("dataplane_capture_{name}")))
            .unwrap_or(0.0)
    }

    /// Sockets on the fast path and their path decisions.
    fn entries(&self) -> anyhow::Result<(usize, usize)> {
        let pin_dir = self.agent.pin_dir();
        Ok((
            bpfmaps::agent_map_entries(pin_dir, "DP_FAST_SOCKS")?,
            bpfmaps::agent_map_entries(pin_dir, "DP_FAST_PATHS")?,
        ))
    }

    /// Waits until every fast-path map is empty: each socket leaves the
    /// socket map when it closes, its path decision goes with it, and the
    /// proxy removes its splice entries when a connection ends.
    fn assert_maps_empty(&self) {
        let pin_dir = self.agent.pin_dir();
        let count = |map| bpfmaps::agent_map_entries(pin_dir, map);
        let left =
            dataplane_tests::eventually("fast-path maps empty", Duration::from_secs(10), || {
                let (socks, paths) = self.entries()?;
                let (splices, reports) = (count("DP_FAST_SPLICE")?, count("DP_FAST_FORWARDED")?);
                anyhow::ensure!(
                    (socks, paths, splices, reports) == (0, 0, 0, 0),
                    "{socks} sockets, {paths} decisions, {splices} splices, {reports} reports left"
                );
                Ok(())
            });
        left.expect("no leaked entry");
    }
}

/// `benchtool bulk --verify` of `bytes` through the plain echo service.
fn verified_bulk(mesh: &FastNode, bytes: u64) -> anyhow::Result<bench_peers::BenchReport> {
    let bytes = bytes.to_string();
    let to = RR_VIP.to_string();
    bench_peers::run_in_pod(
        &mesh.node,
        &mesh.client,
        &[
            "bulk",
            "--to",
            &to,
            "--bytes",
            &bytes,
            "--duration",
            "60",
            "--verify",
        ],
        &[],
    )
}

/// `benchtool tcp-rr` through the plain echo service, from the client
/// pod, with `options` (connections, rate, duration...); no warm-up.
fn tcp_rr(
    node: &SimNode,
    client: &Pod,
    options: &[&str],
) -> anyhow::Result<bench_peers::BenchReport> {
    let to = RR_VIP.to_string();
    let mut args = vec!["tcp-rr", "--to", &to, "--warmup", "0"];
    args.extend_from_slice(options);
    bench_peers::run_in_pod(node, client, &args, &[])
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn transfers_are_byte_exact_from_one_byte_to_64_mib_with_half_close() {
    if !require_privileges("transfers_are_byte_exact_from_one_byte_to_64_mib_with_half_close") {
        return;
    }
    let mesh = FastNode::start("fpx").expect("node");
    for size in [1, 100, 64 * 1024, 1 << 20, 64 << 20] {
        // Every echoed byte checked against its position, then the
        // client's half-close must come back as end-of-stream.
        let report = verified_bulk(&mesh, size).expect("bulk");
        assert_eq!(report.verified, Some(true), "{size} bytes: {report:?}");
        assert_eq!(report.bytes, Some(size), "{size} bytes: {report:?}");
    }
    // Through the proxy (the backend sees the node's address, not the
    // client's), not around it.
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 3).expect("hello");
    for hello in &hellos {
        assert!(hello.ok, "{hellos:?}");
        assert!(
            !hello.peer.starts_with(&format!("{}:", mesh.client.ip)),
            "{hellos:?}"
        );
    }
    let active = mesh
        .agent
        .metrics()
        .expect("metrics")
        .sum("dataplane_fast_path_active");
    assert_eq!(active, 1.0, "the agent reports the fast path as active");
    // Each transfer and hello has two sending directions whose peer is on
    // the fast path before they send: the proxy's to the client (hop 1)
    // and the backend's to the proxy (hop 2): 16 at least. The client's
    // and the proxy's upstream direction go direct too unless they send
    // before their peer's end of the handshake completed (then TCP,
    // counted apart).
    let direct = mesh.counter("fast_path_direct");
    let tcp = mesh.counter("fast_path_tcp");
    assert!(
        direct >= 16.0,
        "the data went socket to socket on both hops: {direct} directions direct, {tcp} through TCP"
    );
    // The client's first write of the 64 KiB, 1 MiB and 64 MiB transfers
    // is a bulk stream's: those three directions go through TCP (paced by
    // its window up to the proxy), and the proxy, seeing their sender on
    // TCP for good, moves the large ones to splice(2). Not the proxy's
    // relays of them (pods' sockets only), though its first reads are as
    // large. The echo server's first answers are at most 4 KiB (its first
    // read, `SMALL_BUFFER` in benchtool's echo), so its direction stays on
    // the fast path, which the proxy must keep copying (splice would not
    // see that data, and the transfers above would stall or fall short).
    let bulk = mesh.counter("fast_path_bulk");
    assert_eq!(
        bulk, 3.0,
        "directions taken for bulk streams at their first message: the client's three"
    );
    let switches = mesh
        .agent
        .metrics()
        .expect("metrics")
        .sum("dataplane_proxy_splice_switches");
    assert!(
        switches >= 1.0,
        "{switches} directions moved to splice with the fast path on"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_bulk_echo_with_an_endpoint_off_the_fast_path_is_spliced_both_ways() {
    if !require_privileges("a_bulk_echo_with_an_endpoint_off_the_fast_path_is_spliced_both_ways") {
        return;
    }
    // The endpoint is a server in the node's own namespace, which the fast
    // path does not reach, as it does not reach one on another node: its
    // answers come to the proxy through TCP only. The client's upload is a
    // bulk stream (through TCP too). With nothing ever queued socket to
    // socket on either of the proxy's sockets, the proxy moves both
    // directions to splice(2), as it does without the fast path.
    let mut node = SimNode::new("fpo").expect("node");
    let client = node.add_pod("client").expect("client pod");
    let _echo = bench_peers::echo_serve_on_node(&node, OFF_PORT).expect("echo on the node");
    let services = [ServiceSpec::tcp(
        "off",
        RR_VIP,
        vec![SocketAddrV4::new(node.node_ip(), OFF_PORT)],
    )];
    let config = mesh_config(&services, &[&client]);
    let agent = Agent::start_with(&node, &config, &["--fast-path=on"]).expect("agent");
    let to = RR_VIP.to_string();
    let report = bench_peers::run_in_pod(
        &node,
        &client,
        &["bulk", "--to", &to, "--bytes", "16777216", "--verify"],
        &[],
    )
    .expect("bulk");
    assert_eq!(report.verified, Some(true), "{report:?}");
    let metrics = agent.metrics().expect("metrics");
    let bulk = metrics.sum("dataplane_capture_fast_path_bulk");
    assert_eq!(bulk, 1.0, "the client's upload taken for a bulk stream");
    let switches = metrics.sum("dataplane_proxy_splice_switches");
    assert!(
        switches >= 2.0,
        "{switches} directions moved to splice: the upload and the answers"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn request_and_response_go_past_the_proxy_once_it_caught_up_and_stay_in_order() {
    if !require_privileges(
        "request_and_response_go_past_the_proxy_once_it_caught_up_and_stay_in_order",
    ) {
        return;
    }
    let mesh = FastNode::start("fps").expect("node");
    // 16 KiB requests (several kernel messages each), every echo checked
    // byte for byte against its request, each one different.
    let report = tcp_rr(
        &mesh.node,
        &mesh.client,
        &[
            "--size",
            "16384",
            "--connections",
            "4",
            "--rate",
            "0",
            "--duration",
            "2",
        ],
    )
    .expect("tcp-rr");
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.completed >= 100, "{report:?}");
    // Client and backend are both pods of this node: after the first
    // exchange the proxy has relayed everything either side sent, and the
    // kernel takes both directions of each connection past it.
    let spliced = mesh.counter("fast_path_spliced");
    assert!(
        spliced >= 8.0,
        "{spliced} directions spliced past the proxy for 4 connections"
    );
    mesh.assert_maps_empty();
    let forwarded = mesh
        .agent
        .metrics()
        .expect("metrics")
        .sum("dataplane_proxy_bytes_total");
    let moved = report.completed as f64 * 16384.0 * 2.0;
    assert!(
        forwarded >= moved,
        "spliced bytes count as forwarded: {forwarded} of {moved}"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_splice_ends_with_the_proxy_when_the_agent_dies() {
    if !require_privileges("a_splice_ends_with_the_proxy_when_the_agent_dies") {
        return;
    }
    let mut mesh = FastNode::start("fpk").expect("node");
    let FastNode {
        agent,
        node,
        client,
        ..
    } = &mut mesh;
    let (node, client) = (&*node, &*client);
    let report = std::thread::scope(|scope| {
        let rr = scope.spawn(move || {
            tcp_rr(
                node,
                client,
                &["--connections", "1", "--rate", "200", "--duration", "4"],
            )
        });
        let spliced =
            dataplane_tests::eventually("both directions spliced", Duration::from_secs(5), || {
                let n = agent.metrics()?.sum("dataplane_capture_fast_path_spliced");
                anyhow::ensure!(n >= 2.0, "{n} directions spliced");
                Ok(n)
            });
        spliced.expect("spliced before the kill");
        agent.kill().expect("kill the agent");
        rr.join().expect("thread").expect("tcp-rr")
    });
    // The proxy's sockets closed with it: the connection it relayed must
    // end as it would without the splice (the pods must not go on talking
    // past a proxy that is gone), and nothing may arrive out of order.
    assert!(
        report.errors >= 1,
        "the spliced connection went on: {report:?}"
    );
    assert!(!report.error_kinds.contains_key("mismatch"), "{report:?}");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_backend_dying_mid_stream_ends_the_clients_stream_at_once() {
    if !require_privileges("a_backend_dying_mid_stream_ends_the_clients_stream_at_once") {
        return;
    }
    let mut mesh = FastNode::start("fpr").expect("node");
    let mut rr = mesh.rr.take().expect("the echo server");
    let mesh = &mesh;
    let (report, killed) = std::thread::scope(|scope| {
        // Far more than can move in the second before the kill.
        let stream = scope.spawn(|| verified_bulk(mesh, 64 << 30));
        std::thread::sleep(Duration::from_secs(1));
        let killed = Instant::now();
        rr.kill().expect("kill the echo server");
        (stream.join().expect("thread").expect("bulk"), killed)
    });
    assert!(
        report.verified == Some(false) && report.error.is_some(),
        "the stream cannot have completed: {report:?}"
    );
    assert_ne!(report.error.as_deref(), Some("mismatch"), "{report:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "the client learnt of it promptly, not after a timeout: {report:?}"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_thousand_concurrent_connections_all_get_their_answers() {
    if !require_privileges("a_thousand_concurrent_connections_all_get_their_answers") {
        return;
    }
    let mesh = FastNode::start("fpc").expect("node");
    let report = tcp_rr(
        &mesh.node,
        &mesh.client,
        &["--connections", "1000", "--rate", "0", "--duration", "2"],
    )
    .expect("tcp-rr");
    // On failure, what the proxy saw too: its connection and endpoint
    // counters and its log, to tell where the errors came from.
    let proxy_side = || {
        let metrics = mesh.agent.get("/metrics").unwrap_or_default();
        let counters: Vec<&str> = metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                ["connect", "fail", "reset", "error", "fast_path", "active"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        format!(
            "{}\n--- agent log ---\n{}",
            counters.join("\n"),
            mesh.agent.log()
        )
    };
    assert_eq!(report.errors, 0, "{report:?}\n{}", proxy_side());
    assert!(report.completed >= 1000, "{report:?}");
    assert!(mesh.counter("fast_path_direct") >= 2000.0);
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn ten_thousand_connections_leave_no_entry_behind() {
    if !require_privileges("ten_thousand_connections_leave_no_entry_behind") {
        return;
    }
    let mesh = FastNode::start("fpl").expect("node");
    // The count is real: while 20 connections are held open, both ends
    // of both hops of each are in the map.
    let held = std::thread::scope(|scope| {
        let hold = scope.spawn(|| peers::hold(&mesh.node, &mesh.client, ECHO_VIP, 20, 3000));
        let seen =
            dataplane_tests::eventually("held sockets in the map", Duration::from_secs(5), || {
                let (socks, _) = mesh.entries()?;
                anyhow::ensure!(socks >= 80, "{socks} sockets so far");
                Ok(socks)
            });
        let hellos = hold.join().expect("thread").expect("hold");
        assert!(hellos.iter().all(|h| h.ok), "{hellos:?}");
        seen
    });
    held.expect("four sockets per held connection");
    let report = bench_peers::run_in_pod(
        &mesh.node,
        &mesh.client,
        &[
            "tcp-crr",
            "--to",
            &RR_VIP.to_string(),
            "--connections",
            "8",
            "--rate",
            "2000",
            "--duration",
            "5",
            "--warmup",
            "0",
        ],
        &[],
    )
    .expect("tcp-crr");
    // Only pacing may fail (a slow machine falling behind the schedule):
    // no connection error of any kind.
    assert!(
        report
            .error_kinds
            .keys()
            .all(|k| k == "overload" || k == "unfinished"),
        "{report:?}"
    );
    assert!(report.completed >= 9_000, "{report:?}");
    let direct = mesh.counter("fast_path_direct");
    assert!(
        direct >= 20_000.0,
        "two directions per connection at least: {direct}"
    );
    mesh.assert_maps_empty();
}
