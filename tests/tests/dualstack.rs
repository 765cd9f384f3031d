//! End-to-end: dual-stack clients. An `AF_INET6` socket without
//! `IPV6_V6ONLY` (how Java and gRPC open sockets, and how curl dials a
//! bracketed address) reaches an IPv4 service by its mapped address
//! `::ffff:<VIP>`. The kernel runs only the connect6 hook for such a
//! socket, so these tests prove that enrolled pods' dual-stack connects go
//! through the node proxy like IPv4 ones, that nothing else is captured,
//! and that no per-connection map entry is left behind.
//!
//! The clients are real programs, not our own socket code: `curl`, and a
//! Python 3 client opening exactly the socket Java and gRPC open.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use dataplane_tests::agent::{Agent, attached_programs};
use dataplane_tests::bpfmaps::agent_map_entries;
use dataplane_tests::http_peers;
use dataplane_tests::peers;
use dataplane_tests::scenario::{ECHO_VIP, ServiceSpec, backend_addr, mesh_config};
use dataplane_tests::{Pod, Proc, SimNode, eventually, require_privileges};
use serde::Deserialize;

/// The HTTP service `web`, beside `echo` at [`ECHO_VIP`].
const WEB_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 20), 80);
/// The per-connection maps that must be empty once connections are done.
const CONNECTION_MAPS: [&str; 2] = ["DP_ORIG_DST", "DP_CONNS"];

/// The dual-stack client: `count` sequential connections from an
/// `AF_INET6` socket with `IPV6_V6ONLY=0` to `host` (an IPv6 literal),
/// each reading a `meshtool` greeting (`<backend> <peer>\n`). Prints one
/// JSON summary line. Every operation is bounded by a 2 s timeout.
const PY_CLIENT: &str = r#"
import collections, errno, json, socket, sys

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
kinds = collections.Counter()
backends = collections.Counter()
seen_by_backend = collections.Counter()
connected_to = collections.Counter()
errors = []
for _ in range(count):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.settimeout(2.0)
        s.connect((host, port))
        peer = s.getpeername()
        connected_to["[%s]:%d" % (peer[0], peer[1])] += 1
        buf = b""
        while b"\n" not in buf and len(buf) < 1024:
            chunk = s.recv(1024)
            if not chunk:
                break
            buf += chunk
        line = buf.decode(errors="replace").strip()
        name, _, seen = line.partition(" ")
        if not seen:
            kinds["eof"] += 1
            continue
        ok += 1
        backends[name] += 1
        seen_by_backend[seen.rsplit(":", 1)[0]] += 1
    except TimeoutError:
        kinds["timeout"] += 1
    except ConnectionRefusedError:
        kinds["refused"] += 1
    except ConnectionResetError:
        kinds["reset"] += 1
    except OSError as e:
        unreachable = e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
        kinds["unreachable" if unreachable else "other"] += 1
        if not unreachable and len(errors) < 5:
            errors.append(repr(e))
    finally:
        s.close()
print(json.dumps({
    "family": "AF_INET6",
    "ok": ok,
    "failed": dict(kinds),
    "backends": dict(backends),
    "seen_by_backend": dict(seen_by_backend),
    "connected_to": dict(connected_to),
    "errors": errors,
}))
"#;

/// The summary line of [`PY_CLIENT`].
#[derive(Debug, Deserialize)]
struct PyReport {
    ok: u64,
    /// Failed attempts by kind: `refused`, `reset`, `timeout`, `eof`,
    /// `unreachable` (EHOSTUNREACH or ENETUNREACH), `other`.
    failed: BTreeMap<String, u64>,
    /// Greetings by backend name.
    backends: BTreeMap<String, u64>,
    /// The client address each backend saw (IP only).
    seen_by_backend: BTreeMap<String, u64>,
    /// `getpeername()` of the client's socket once connected, as `[ip]:port`.
    connected_to: BTreeMap<String, u64>,
    errors: Vec<String>,
}

impl PyReport {
    fn failed(&self, kind: &str) -> u64 {
        self.failed.get(kind).copied().unwrap_or(0)
    }
}

/// `::ffff:a.b.c.d`, the mapped form a dual-stack client dials.
fn mapped(ip: Ipv4Addr) -> String {
    ip.to_ipv6_mapped().to_string()
}

/// Runs [`PY_CLIENT`] in `pod` against `[host]:port`, `count` times.
fn py_connect(
    node: &SimNode,
    pod: &Pod,
    host: &str,
    port: u16,
    count: u32,
) -> anyhow::Result<PyReport> {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_CLIENT, host, &port.to_string(), &count.to_string()]);
    // Each attempt is bounded by the client's own 2 s timeouts.
    let budget = Duration::from_secs(15 + 3 * u64::from(count));
    let out = node.run_in_pod(pod, cmd, budget)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "python3 client failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("python3 client printed nothing: {stderr}"))?;
    let report: PyReport =
        serde_json::from_str(line).with_context(|| format!("bad client line {line:?}"))?;
    // Refused, unreachable... are outcomes the tests judge; anything else
    // means the test environment is broken, not the data plane.
    ensure!(
        report.failed("other") == 0,
        "unexpected socket errors: {:?}",
        report.errors
    );
    Ok(report)
}

/// Makes sure `AF_INET6` sockets work in `pod`: IPv6 enabled on every
/// interface of its namespace and `bindv6only` off (curl does not clear
/// `IPV6_V6ONLY` itself). New namespaces usually start that way, but a
/// host with `devconf_inherit_init_net` set passes its own settings on.
/// `sysctl` runs inside the pod, so `/proc/sys/net` is the pod's.
fn enable_ipv6(node: &SimNode, pod: &Pod) -> anyhow::Result<()> {
    let keys = [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
        "net.ipv6.conf.lo.disable_ipv6",
        "net.ipv6.conf.eth0.disable_ipv6",
        "net.ipv6.bindv6only",
    ];
    let mut set = Command::new("sysctl");
    set.arg("-qw").args(keys.iter().map(|k| format!("{k}=0")));
    let out = node.run_in_pod(pod, set, Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "sysctl in pod {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut get = Command::new("sysctl");
    get.arg("-n").args(keys);
    let out = node.run_in_pod(pod, get, Duration::from_secs(10))?;
    let values = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && values.lines().all(|v| v.trim() == "0"),
        "IPv6 settings in pod {}: {values:?} (want all 0 for {keys:?})",
        pod.name
    );
    Ok(())
}

/// One node: `client` (enrolled) and `outsider` (not), both with IPv6
/// enabled; `echo` (TCP, two `meshtool` backends) at [`ECHO_VIP`] and
/// `web` (HTTP, one `httptool` backend) at [`WEB_VIP`]. Fields drop in
/// order: the agent uninstalls before the node goes away.
struct DualStackNode {
    agent: Agent,
    _servers: Vec<Proc>,
    echo_backends: Vec<Pod>,
    web: Pod,
    client: Pod,
    outsider: Pod,
    node: SimNode,
}

impl DualStackNode {
    fn start(hint: &str) -> anyhow::Result<DualStackNode> {
        let mut node = SimNode::new(hint)?;
        let client = node.add_pod("client")?;
        let outsider = node.add_pod("outsider")?;
        let mut servers = Vec::new();
        let mut echo_backends = Vec::new();
        for name in ["backend-1", "backend-2"] {
            let pod = node.add_pod(name)?;
            servers.push(peers::serve(&node, &pod, name)?);
            echo_backends.push(pod);
        }
        let web = node.add_pod("web-1")?;
        servers.push(http_peers::serve(&node, &web, "web-1")?);
        for pod in [&client, &outsider] {
            enable_ipv6(&node, pod)?;
        }
        let mut echo = ServiceSpec::tcp(
            "echo",
            ECHO_VIP,
            echo_backends.iter().map(backend_addr).collect(),
        );
        // Round robin, so that the spread over both backends is exact.
        echo.policy = "{loadBalancer: {algorithm: roundRobin}}";
        let mut web_service = ServiceSpec::tcp("web", WEB_VIP, vec![backend_addr(&web)]);
        web_service.protocol = "http";
        let config = mesh_config(&[echo, web_service], &[&client]);
        let agent = Agent::start(&node, &config).context("starting the agent")?;
        Ok(DualStackNode {
            agent,
            _servers: servers,
            echo_backends,
            web,
            client,
            outsider,
            node,
        })
    }

    /// Waits until no per-connection entry is left in the agent's maps.
    /// The proxy deletes the `DP_CONNS` entry when it reads it, right after
    /// accepting, so this settles at once unless something leaks.
    fn assert_no_connection_entries(&self, after: &str) {
        let result = eventually("empty per-connection maps", Duration::from_secs(5), || {
            let counts = CONNECTION_MAPS
                .iter()
                .map(|name| Ok((*name, agent_map_entries(self.agent.pin_dir(), name)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            ensure!(
                counts.iter().all(|(_, n)| *n == 0),
                "entries left: {counts:?}"
            );
            Ok(())
        });
        result.unwrap_or_else(|err| panic!("after {after}: {err:#}"));
    }
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn python_dual_stack_client_goes_through_the_node_proxy_and_leaves_no_entry() {
    if !require_privileges(
        "python_dual_stack_client_goes_through_the_node_proxy_and_leaves_no_entry",
    ) {
        return;
    }
    let mesh = DualStackNode::start("dspy").expect("node");
    let count = 300;
    let report = py_connect(
        &mesh.node,
        &mesh.client,
        &mapped(*ECHO_VIP.ip()),
        ECHO_VIP.port(),
        count,
    )
    .expect("python client");
    assert_eq!(
        report.ok,
        u64::from(count),
        "every connect answered: {report:#?}"
    );
    // The client's own socket shows the rewrite: connect6 replaced the VIP
    // by the proxy's address, still in mapped form.
    let proxy = format!(
        "[{}]:{}",
        mapped(mesh.node.node_ip()),
        dataplane_tests::agent::PROXY_PORT
    );
    assert_eq!(
        report.connected_to,
        BTreeMap::from([(proxy, u64::from(count))]),
        "connected to the node proxy"
    );
    // Both backends saw every connection come from the node proxy.
    let node_ip = mesh.node.node_ip().to_string();
    assert_eq!(
        report.seen_by_backend,
        BTreeMap::from([(node_ip, u64::from(count))]),
        "{report:#?}"
    );
    let names: Vec<&str> = mesh.echo_backends.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        report.backends,
        names.iter().map(|n| ((*n).to_string(), 150)).collect(),
        "round robin over both backends"
    );

    let metrics = mesh.agent.metrics().expect("metrics");
    assert_eq!(
        metrics.captured(),
        u64::from(count),
        "eBPF counted every redirect"
    );
    assert_eq!(
        metrics.forwarded(),
        u64::from(count),
        "the proxy forwarded each"
    );
    // The proxy found every original destination by the IPv4 4-tuple that
    // sock_ops stored for the dual-stack sockets.
    assert_eq!(
        metrics.sum("dataplane_capture_orig_dst_served_total"),
        f64::from(count)
    );
    assert_eq!(metrics.sum("dataplane_capture_orig_dst_unknown_total"), 0.0);
    mesh.assert_no_connection_entries("300 dual-stack connections");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn curl_to_a_mapped_vip_is_served_by_the_http_proxy() {
    if !require_privileges("curl_to_a_mapped_vip_is_served_by_the_http_proxy") {
        return;
    }
    let mesh = DualStackNode::start("dscurl").expect("node");
    let count: u64 = 50;
    let url = format!("http://[{}]:{}/", mapped(*WEB_VIP.ip()), WEB_VIP.port());
    let mut curl = Command::new("curl");
    // -g: brackets are an address, not a glob. `Connection: close` makes
    // every request a new connection, so each one is a new capture.
    curl.args(["-sS", "-g", "--max-time", "5"])
        .args(["-H", "Connection: close"])
        .args(["-w", "%{http_code} %header{x-backend}\\n"]);
    for _ in 0..count {
        // `-o` applies to one URL only: bodies must not mix into the lines.
        curl.args(["-o", "/dev/null"]).arg(&url);
    }
    let out = mesh
        .node
        .run_in_pod(&mesh.client, curl, Duration::from_secs(60))
        .expect("curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {} {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len() as u64, count, "{stdout}");
    assert!(
        lines.iter().all(|line| *line == "200 web-1"),
        "every request answered by the backend: {stdout}"
    );
    assert_eq!(
        http_peers::backend_requests(&mesh.node, &mesh.web).expect("stats"),
        count
    );
    let metrics = mesh.agent.metrics().expect("metrics");
    assert_eq!(metrics.captured(), count, "one capture per connection");
    assert_eq!(
        metrics.sum("dataplane_capture_orig_dst_served_total"),
        count as f64
    );
    mesh.assert_no_connection_entries("curl's connections");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn dual_stack_connects_of_other_pods_and_to_other_addresses_are_left_alone() {
    if !require_privileges(
        "dual_stack_connects_of_other_pods_and_to_other_addresses_are_left_alone",
    ) {
        return;
    }
    let mesh = DualStackNode::start("dsscope").expect("node");
    let vip = mapped(*ECHO_VIP.ip());

    // A pod outside the mesh is not captured: the VIP is not routable, so
    // the connect fails at once.
    let outsider =
        py_connect(&mesh.node, &mesh.outsider, &vip, ECHO_VIP.port(), 5).expect("python client");
    assert_eq!(
        outsider.failed("unreachable"),
        5,
        "not captured: {outsider:#?}"
    );
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-g", "--max-time", "5", "-o", "/dev/null"])
        .arg(format!(
            "http://[{}]:{}/",
            mapped(*WEB_VIP.ip()),
            WEB_VIP.port()
        ));
    let out = mesh
        .node
        .run_in_pod(&mesh.outsider, curl, Duration::from_secs(20))
        .expect("curl");
    // curl exit code 7: failed to connect.
    assert_eq!(
        out.status.code(),
        Some(7),
        "not captured: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The enrolled pod: a VIP port that is not a service goes direct
    // (and fails: unroutable).
    let other_port = py_connect(&mesh.node, &mesh.client, &vip, 81, 2).expect("python client");
    assert_eq!(other_port.failed("unreachable"), 2, "{other_port:#?}");
    // Pure IPv6 destinations are never captured, even when they embed the
    // VIP (NAT64 and IPv4-compatible forms); no IPv6 route exists here.
    for host in ["64:ff9b::c613:a", "::c613:a"] {
        let report =
            py_connect(&mesh.node, &mesh.client, host, ECHO_VIP.port(), 1).expect("python client");
        assert_eq!(report.failed("unreachable"), 1, "{host}: {report:#?}");
    }
    // A mapped non-mesh address goes direct: the backend sees the client.
    let backend = backend_addr(&mesh.echo_backends[0]);
    let direct = py_connect(
        &mesh.node,
        &mesh.client,
        &mapped(*backend.ip()),
        backend.port(),
        3,
    )
    .expect("python client");
    assert_eq!(
        direct.seen_by_backend,
        BTreeMap::from([(mesh.client.ip.to_string(), 3)]),
        "untouched: {direct:#?}"
    );

    let metrics = mesh.agent.metrics().expect("metrics");
    assert_eq!(metrics.captured(), 0, "nothing was redirected");
    // Still captured after all that.
    let report =
        py_connect(&mesh.node, &mesh.client, &vip, ECHO_VIP.port(), 1).expect("python client");
    assert_eq!(report.ok, 1, "{report:#?}");
    mesh.assert_no_connection_entries("the uncaptured connects");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn dual_stack_capture_fails_open_without_agent_and_leaves_no_entries() {
    if !require_privileges("dual_stack_capture_fails_open_without_agent_and_leaves_no_entries") {
        return;
    }
    let mut mesh = DualStackNode::start("dsrest").expect("node");
    let vip = mapped(*ECHO_VIP.ip());
    mesh.agent.kill().expect("SIGKILL the agent");

    // The pinned connect6 link still captures and, no proxy listening,
    // fails open: each connect goes straight to an endpoint (the backends
    // see the client itself), none leaks to the VIP (routed nowhere).
    let count = 100;
    let down =
        py_connect(&mesh.node, &mesh.client, &vip, ECHO_VIP.port(), count).expect("python client");
    assert_eq!(down.ok, u64::from(count), "{down:#?}");
    assert_eq!(
        down.seen_by_backend,
        BTreeMap::from([(mesh.client.ip.to_string(), u64::from(count))]),
        "direct: {down:#?}"
    );
    // A connect sent direct stores no original destination.
    mesh.assert_no_connection_entries("connects sent direct while no agent ran");

    mesh.agent.spawn(&mesh.node).expect("restart");
    let connect6: Vec<_> = attached_programs(&mesh.node.pods_cgroup())
        .expect("bpftool")
        .into_iter()
        .filter(|(kind, _)| kind == "cgroup_inet6_connect")
        .collect();
    assert_eq!(
        connect6,
        [(
            "cgroup_inet6_connect".to_string(),
            "dp_connect6".to_string()
        )],
        "exactly one connect6 program after the restart"
    );
    let up =
        py_connect(&mesh.node, &mesh.client, &vip, ECHO_VIP.port(), 20).expect("python client");
    assert_eq!(up.ok, 20, "{up:#?}");
    mesh.assert_no_connection_entries("connections after the restart");
}
