//! End-to-end: capture of enrolled pods and forwarding by the node proxy,
//! on a simulated node with real processes, sockets and eBPF programs.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddrV4;
use std::os::unix::fs::MetadataExt as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use dataplane_tests::agent::{Agent, attached_programs};
use dataplane_tests::peers::{self, Hello};
use dataplane_tests::scenario::{ECHO_VIP, MeshNode, ServiceSpec, backend_addr, mesh_config};
use dataplane_tests::simnode::new_pod_uid;
use dataplane_tests::{Pod, Proc, SimNode, bpfmaps, require_privileges};

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
    let mesh = MeshNode::start_with_policy("spread", 3, "{loadBalancer: {algorithm: roundRobin}}")
        .expect("mesh node");
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
    // The default path: through TCP, nothing put on the fast path.
    assert_eq!(metrics.sum("dataplane_fast_path_active"), 0.0);
    assert_eq!(metrics.sum("dataplane_capture_fast_path_direct"), 0.0);
    assert_eq!(
        bpfmaps::agent_map_entries(mesh.agent.pin_dir(), "DP_FAST_SOCKS").expect("bpftool"),
        0
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
    let node_ip = mesh.node.node_ip().to_string();
    let client_ip = mesh.client.ip.to_string();
    let up = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 1).expect("hello");
    assert!(
        up[0].ok && up[0].peer_ip() == Some(node_ip.as_str()),
        "{up:#?}"
    );

    mesh.agent.kill().expect("SIGKILL the agent");
    // The pinned programs still capture, and fail open (the default): the
    // very first connects after the crash go straight to an endpoint (the
    // backend sees the client itself), instead of failing or leaking to
    // the VIP, which is routed nowhere.
    let down = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 4).expect("hello");
    assert!(
        down.iter()
            .all(|h| h.ok && h.peer_ip() == Some(client_ip.as_str())),
        "sent direct while no proxy listens: {down:#?}"
    );
    assert!(
        attachments(&node_cgroup).is_empty(),
        "the proxy-side hook died with the proxy"
    );

    mesh.agent.spawn(&mesh.node).expect("restart");
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 10).expect("hello");
    assert_eq!(answers_by_backend(&hellos).len(), 2);
    assert!(
        hellos.iter().all(|h| h.peer_ip() == Some(node_ip.as_str())),
        "through the proxy again once it listens: {hellos:#?}"
    );
    let metrics = mesh.agent.metrics().expect("metrics");
    assert_eq!(
        metrics.sum("dataplane_capture_proxy_down_direct"),
        4.0,
        "the kernel counted the connects it sent direct"
    );
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

/// `--fail-mode closed`: while no proxy listens, captured connects fail at
/// once with EPERM (never hang, never go around the proxy); once an agent
/// listens again they reach it. The agent logs JSON here
/// (`--log-format json`): every line is one object, the eBPF programs'
/// records included.
#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn failing_closed_refuses_at_once_while_no_proxy_listens() {
    if !require_privileges("failing_closed_refuses_at_once_while_no_proxy_listens") {
        return;
    }
    let mut node = SimNode::new("closed").expect("node");
    let client = node.add_pod("client").expect("pod");
    let backend = node.add_pod("backend-1").expect("pod");
    let _server = peers::serve(&node, &backend, "backend-1").expect("backend");
    let echo = ServiceSpec::tcp("echo", ECHO_VIP, vec![backend_addr(&backend)]);
    let config = mesh_config(&[echo], &[&client]);
    let flags = ["--fail-mode=closed", "--log-format=json"];
    let mut agent = Agent::start_with(&node, &config, &flags).expect("agent");
    assert!(peers::hello(&node, &client, ECHO_VIP, 1).expect("hello")[0].ok);

    agent.kill().expect("SIGKILL the agent");
    let started = Instant::now();
    let down = peers::hello(&node, &client, ECHO_VIP, 3).expect("hello");
    assert!(
        down.iter().all(|h| h.kind == "denied"),
        "refused by the connect hook: {down:#?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at once, not after a connect timeout"
    );

    agent.spawn(&node).expect("restart");
    let node_ip = node.node_ip().to_string();
    let up = peers::hello(&node, &client, ECHO_VIP, 2).expect("hello");
    assert!(
        up.iter()
            .all(|h| h.ok && h.peer_ip() == Some(node_ip.as_str())),
        "{up:#?}"
    );
    let metrics = agent.metrics().expect("metrics");
    assert_eq!(metrics.sum("dataplane_capture_proxy_down_refused"), 3.0);

    let log = agent.log();
    let records: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        records
            .iter()
            .all(|r| r["level"].is_string() && r["target"].is_string()),
        "{log}"
    );
    assert!(
        records.iter().any(|r| r["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("dataplane::"))
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("captured connect"))),
        "an eBPF record, as JSON: {log}"
    );
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
/// cgroup tree). The second pod sits in a QoS-class cgroup (`burstable/`)
/// that did not exist when the agent started: new levels are watched as
/// they appear.
///
/// kubelet creates a pod's cgroup, then the pod's sandbox, then its
/// containers: tens of milliseconds at least before the pod's first
/// process. The test stands for that step by waiting (at most
/// [`ENROLL_WAIT`]) until the pod's cgroup is in `DP_ENROLLED`, then starts
/// the pod's first process, whose very first connect must go through the
/// proxy. What it proves is what matters: a pod is enrolled before its
/// first process runs, by the watcher (the walk is a minute away). It does
/// not race the watcher against a bare fork and exec, which a loaded
/// machine may well lose and kubelet never asks for.
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
    let enrolled_map = bpfmaps::pinned_map(agent.pin_dir(), "DP_ENROLLED").expect("map");

    let node_ip = node.node_ip().to_string();
    for (name, uid, qos) in &late {
        let pod = node.add_pod_as(name, uid, *qos).expect("pod");
        let cgroup_id = std::fs::metadata(&pod.cgroup).expect("pod cgroup").ino();
        let enrolled = dataplane_tests::eventually("the pod enrolled", ENROLL_WAIT, || {
            let ids = bpfmaps::u64_keys(&enrolled_map)?;
            anyhow::ensure!(ids.contains(&cgroup_id), "{cgroup_id} not in {ids:?}");
            Ok(())
        });
        if let Err(err) = enrolled {
            panic!("{name}: {err:#}\nagent log:\n{}", agent.log());
        }
        let first = peers::hello(&node, &pod, ECHO_VIP, 1).expect("hello");
        assert!(
            first[0].ok && first[0].peer_ip() == Some(node_ip.as_str()),
            "the first connect of {name} went through the node proxy: {first:#?}\nagent log:\n{}",
            agent.log()
        );
    }
    let metrics = agent.metrics().expect("metrics");
    assert_eq!(metrics.captured(), 2, "each first connect was redirected");
    // A pod the watcher reports twice (by its event and by the scan of its
    // new QoS directory) is logged as newly enrolled once at most.
    let log = agent.log();
    for (name, uid, _) in &late {
        let logged = log
            .lines()
            .filter(|line| {
                line.contains("enrolled a new pod cgroup") && line.contains(uid.as_str())
            })
            .count();
        assert!(
            logged <= 1,
            "{name} logged as newly enrolled {logged} times:\n{log}"
        );
    }
}

/// How long a pod may take to be enrolled once its cgroup exists: the
/// watcher takes milliseconds; kubelet takes longer than that to start the
/// pod's first process.
const ENROLL_WAIT: Duration = Duration::from_secs(2);

/// An upgrade that changed a map's layout without bumping the maps
/// directory: the previous agent's programs are still attached (pinned
/// links) with the map they were loaded with, and a map of another layout
/// is pinned under the name the new programs want. The new agent replaces
/// that map, with a warning naming both layouts, and there is no instant
/// without capture: a client that connects to the VIP over and over, a
/// fraction of a millisecond apart, through the whole start sees its
/// connects refused (captured by the previous programs, no proxy yet), then
/// reach the new proxy, and never once uncaptured (the VIP is routed
/// nowhere: an uncaptured connect fails as unreachable). The new tables are
/// filled before the new programs replace the old ones, so the very first
/// connect they see is captured. Restarted, the agent keeps the map (no
/// false alarm when the layouts match).
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
    let echo = ServiceSpec::tcp("echo", ECHO_VIP, vec![backend_addr(&backend)]);
    // Failing closed, a connect the previous programs capture while no
    // agent runs is told apart from one that reaches a proxy.
    let config = mesh_config(&[echo], &[&client]);
    let mut agent = Agent::start_with(&node, &config, &["--fail-mode=closed"]).expect("agent");
    let node_ip = node.node_ip().to_string();
    let hello = peers::hello(&node, &client, ECHO_VIP, 1).expect("hello");
    assert!(hello[0].ok, "captured before the upgrade: {hello:#?}");

    // The previous agent is gone; its programs stay attached and keep the
    // DP_ENROLLED they were loaded with (the client enrolled) after it is
    // unpinned, and a map of another layout takes its name.
    agent.kill().expect("stop the previous agent");
    let stale = bpfmaps::pinned_map(agent.pin_dir(), "DP_ENROLLED").expect("pinned map");
    std::fs::remove_file(&stale).expect("unpin DP_ENROLLED");
    bpfmaps::create_pinned_map(&stale, "DP_ENROLLED", "hash", 4, 4, 16).expect("stale map");

    let mut prober = Prober::start(&node, &client, ECHO_VIP).expect("prober");
    prober
        .wait_for("a connect captured by the previous programs", |kind| {
            kind == "denied"
        })
        .expect("the previous programs capture while no agent runs");
    agent.spawn(&node).expect("the upgraded agent");
    // What was read so far was tried while the agent started; what comes
    // next, once it is ready (its programs attached).
    prober.read_queued();
    prober
        .more(PROBES_AFTER)
        .expect("connects after the upgrade");
    let outcomes = prober.stop();
    let escaped = outcomes
        .iter()
        .filter(|&kind| kind == "unreachable")
        .count();
    assert_eq!(
        escaped,
        0,
        "connects during the upgrade were not captured; outcomes in order: {}\nagent log:\n{}",
        runs(&outcomes),
        agent.log()
    );
    let last = &outcomes[outcomes.len() - PROBES_AFTER..];
    assert!(
        last.iter().any(|kind| kind == "connected"),
        "the upgraded agent captures: {}",
        runs(&outcomes)
    );

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

    agent.kill().expect("stop");
    agent.spawn(&node).expect("restart");
    assert_eq!(
        bpfmaps::map_shape(&stale).expect("map").id,
        replaced.id,
        "a map of the right layout is kept across restarts"
    );
    assert_eq!(agent.log().matches("layout differs").count(), 1);
    let hello = peers::hello(&node, &client, ECHO_VIP, 1).expect("hello");
    assert!(
        hello[0].ok && hello[0].peer_ip() == Some(node_ip.as_str()),
        "captured through the replaced map: {hello:#?}"
    );
}

/// How long a [`Prober`] waits for an outcome it was asked about.
const PROBE_WAIT: Duration = Duration::from_secs(20);
/// Connects tried once the upgraded agent is ready.
const PROBES_AFTER: usize = 100;

/// The prober's client: connects to `host:port` over and over, a fraction
/// of a millisecond apart, and prints one word per connect: `connected`
/// (only a captured connect can reach the proxy: the VIP is routed
/// nowhere), `denied` (captured, no proxy listening, failing closed),
/// `refused` (captured, sent to a proxy that is not listening), `unreachable` (not
/// captured: the node answers that it has no route), `pending` (no answer
/// within a millisecond: the SYN was dropped because the proxy's accept
/// queue is full while the agent starts), or `other:<errno>`. Each
/// connection is closed at once, unused.
const PY_PROBE: &str = r#"
import errno, select, socket, sys, time
addr = (sys.argv[1], int(sys.argv[2]))
kinds = {0: "connected", errno.ECONNREFUSED: "refused", errno.EPERM: "denied",
         errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable"}
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    err = s.connect_ex(addr)
    if err == errno.EINPROGRESS:
        _, ready, _ = select.select([], [s], [], 0.001)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ready else None
    s.close()
    if err is None:
        kind = "pending"
    else:
        kind = kinds.get(err, "other:" + errno.errorcode.get(err, str(err)))
    print(kind, flush=True)
    time.sleep(0.0002)
"#;

/// A client connecting from a pod to one address over and over (see
/// [`PY_PROBE`]), its outcomes read as they come.
struct Prober {
    proc: Proc,
    outcomes: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Prober {
    fn start(node: &SimNode, pod: &Pod, to: SocketAddrV4) -> anyhow::Result<Prober> {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", PY_PROBE, &to.ip().to_string(), &to.port().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = node.spawn_in_pod(pod, cmd)?;
        let stdout = proc.take_stdout().context("the prober's stdout")?;
        let (tx, outcomes) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Prober {
            proc,
            outcomes,
            seen: Vec::new(),
        })
    }

    fn next(&mut self, what: &str) -> anyhow::Result<&str> {
        match self.outcomes.recv_timeout(PROBE_WAIT) {
            Ok(kind) => {
                self.seen.push(kind);
                Ok(self.seen.last().map_or("", String::as_str))
            }
            Err(_) => bail!(
                "no {what} within {PROBE_WAIT:?}; outcomes so far: {}",
                runs(&self.seen)
            ),
        }
    }

    /// Waits for an outcome that satisfies `pred`.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + PROBE_WAIT;
        while !pred(self.next(what)?) {
            if Instant::now() > deadline {
                bail!("no {what} within {PROBE_WAIT:?}: {}", runs(&self.seen));
            }
        }
        Ok(())
    }

    /// Takes the outcomes read so far without waiting.
    fn read_queued(&mut self) {
        self.seen.extend(self.outcomes.try_iter());
    }

    /// Waits for `count` more outcomes.
    fn more(&mut self, count: usize) -> anyhow::Result<()> {
        for _ in 0..count {
            self.next("further connect")?;
        }
        Ok(())
    }

    /// Stops the client; every outcome, in order.
    fn stop(mut self) -> Vec<String> {
        let _ = self.proc.kill();
        // The reader ends at EOF, once the killed client's output is read.
        while let Ok(kind) = self.outcomes.recv_timeout(PROBE_WAIT) {
            self.seen.push(kind);
        }
        self.seen
    }
}

/// Outcomes in order, repeats folded: `refused x412, connected x97`.
fn runs(outcomes: &[String]) -> String {
    let mut runs: Vec<(&str, usize)> = Vec::new();
    for kind in outcomes {
        match runs.last_mut() {
            Some((last, count)) if last == kind => *count += 1,
            _ => runs.push((kind, 1)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|(kind, count)| format!("{kind} x{count}"))
        .collect();
    runs.join(", ")
}

/// The kernel's service map follows the config with writes of what
/// changed only: a removed service leaves it at the next pass, and an
/// agent started after another removes what its predecessor wrote that its
/// own config no longer lists.
#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn the_kernel_service_map_follows_the_config_across_changes_and_restarts() {
    if !require_privileges("the_kernel_service_map_follows_the_config_across_changes_and_restarts")
    {
        return;
    }
    let mut mesh = MeshNode::start("svcmap", 1).expect("mesh node");
    let backend = backend_addr(&mesh.backends[0].0);
    let vip = |i: u8| SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 0, 100 + i), 80);
    let names: Vec<String> = (0..3).map(|i| format!("extra-{i}")).collect();
    let config = |extra: u8| {
        let mut services = vec![ServiceSpec::tcp("echo", ECHO_VIP, vec![backend])];
        for (i, name) in (0..extra).zip(&names) {
            services.push(ServiceSpec::tcp(name, vip(i), vec![backend]));
        }
        mesh_config(&services, &[&mesh.client])
    };
    let entries = |agent: &Agent| bpfmaps::agent_map_entries(agent.pin_dir(), "DP_SERVICES");
    let wait_for = |agent: &Agent, n: usize, what: &str| {
        dataplane_tests::eventually(what, Duration::from_secs(10), || {
            let now = entries(agent)?;
            anyhow::ensure!(now == n, "{now} entries, want {n}");
            Ok(())
        })
        .expect(what);
    };
    mesh.agent.write_config(&config(3)).expect("config");
    wait_for(&mesh.agent, 4, "three services added");
    mesh.agent.write_config(&config(1)).expect("config");
    wait_for(&mesh.agent, 2, "two services removed");

    // The next agent's config lists none of the extra services.
    mesh.agent.kill().expect("kill");
    mesh.agent.write_config(&config(0)).expect("config");
    assert_eq!(
        entries(&mesh.agent).expect("entries"),
        2,
        "pinned: kept while no agent runs"
    );
    mesh.agent.spawn(&mesh.node).expect("restart");
    // Before it reports ready (its first pass reads the map back), not at
    // a later periodic verification.
    assert_eq!(
        entries(&mesh.agent).expect("entries"),
        1,
        "the predecessor's service removed at start"
    );
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, 3).expect("hello");
    assert!(hellos.iter().all(|h| h.ok), "{hellos:#?}");
}
