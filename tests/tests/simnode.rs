//! Tests of the simulated node harness itself: if these fail, no
//! end-to-end result built on the harness can be trusted.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use dataplane_tests::simnode::{self, Pod, Proc, SimNode};
use serde::Deserialize;

const MESHTOOL: &str = env!("CARGO_BIN_EXE_meshtool");
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One line of `meshtool hello` output.
#[derive(Debug, Deserialize)]
struct Hello {
    ok: bool,
    backend: Option<String>,
    peer: Option<String>,
    kind: Option<String>,
}

/// The line of `meshtool transfer` output.
#[derive(Debug, Deserialize)]
struct Transfer {
    sent: u64,
    received: u64,
    #[serde(rename = "match")]
    matched: bool,
    backend: String,
}

fn meshtool(args: &[&str]) -> Command {
    let mut cmd = Command::new(MESHTOOL);
    cmd.args(args);
    cmd
}

/// Starts `meshtool serve` on port 8080 in `pod` and waits until it listens.
fn serve(node: &SimNode, pod: &Pod, name: &str) -> anyhow::Result<Proc> {
    let listen = format!("{}:8080", pod.ip);
    let mut cmd = meshtool(&["serve", "--listen", &listen, "--name", name]);
    cmd.stdout(Stdio::piped());
    let mut server = node.spawn_in_pod(pod, cmd)?;
    server.wait_for_line(READY_TIMEOUT, |l| l.starts_with("listening "))?;
    Ok(server)
}

fn stdout_lines(out: &Output) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        out.status.success(),
        "exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout.clone())?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn hellos(node: &SimNode, pod: &Pod, to: &str, count: u32) -> anyhow::Result<Vec<Hello>> {
    let count = count.to_string();
    let out = node.run_in_pod(
        pod,
        meshtool(&["hello", "--to", to, "--count", &count]),
        RUN_TIMEOUT,
    )?;
    stdout_lines(&out)?
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {l:?}")))
        .collect()
}

/// Names this node's namespaces still listed by `ip netns list`.
fn leftover_netns(id: &str) -> Vec<String> {
    let prefix = format!("dp{id}-");
    let all = simnode::netns_list().expect("ip netns list");
    all.into_iter().filter(|n| n.starts_with(&prefix)).collect()
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn two_pods_talk_and_teardown_is_complete() -> anyhow::Result<()> {
    if !simnode::require_privileges("two_pods_talk_and_teardown_is_complete") {
        return Ok(());
    }
    let mut node = SimNode::new("talk")?;
    let a = node.add_pod("server")?;
    let b = node.add_pod("client")?;
    let server = serve(&node, &a, "backend-a")?;
    let to = format!("{}:8080", a.ip);

    let answers = hellos(&node, &b, &to, 3)?;
    assert_eq!(answers.len(), 3, "{answers:?}");
    for hello in &answers {
        assert!(hello.ok, "{hello:?}");
        assert_eq!(hello.backend.as_deref(), Some("backend-a"));
        let peer = hello.peer.as_deref().unwrap_or_default();
        assert_eq!(
            peer.split(':').next(),
            Some(b.ip.to_string().as_str()),
            "{hello:?}"
        );
    }

    let cmd = meshtool(&["transfer", "--to", &to, "--bytes", "8388608"]);
    let out = node.run_in_pod(&b, cmd, Duration::from_secs(90))?;
    let lines = stdout_lines(&out)?;
    let transfer: Transfer = serde_json::from_str(lines.first().context("no transfer output")?)?;
    assert!(transfer.matched, "{transfer:?}");
    assert_eq!((transfer.sent, transfer.received), (8_388_608, 8_388_608));
    assert_eq!(transfer.backend, "backend-a");

    let procs = simnode::cgroup_procs(&a.container_cgroup())?;
    assert!(
        procs.contains(&server.pid()),
        "{} not in {procs:?}",
        server.pid()
    );

    // Teardown with the server still running: the node must kill it.
    let (id, root) = (node.id().to_owned(), node.cgroup_root().to_path_buf());
    drop(node);
    assert_eq!(leftover_netns(&id), Vec::<String>::new());
    assert!(!root.exists(), "{} still exists", root.display());
    drop(server);
    Ok(())
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn uncaptured_service_vip_fails_fast() -> anyhow::Result<()> {
    if !simnode::require_privileges("uncaptured_service_vip_fails_fast") {
        return Ok(());
    }
    let mut node = SimNode::new("vip")?;
    let pod = node.add_pod("client")?;
    let answers = hellos(&node, &pod, "198.19.0.10:80", 5)?;
    assert_eq!(answers.len(), 5, "{answers:?}");
    for hello in &answers {
        assert!(!hello.ok, "{hello:?}");
        // Not "timeout": the unreachable route answers at once.
        let kind = hello.kind.as_deref().unwrap_or_default();
        assert!(kind == "unreachable" || kind == "refused", "{hello:?}");
    }
    node.close()
}

/// The cgroup path of `pid`, relative to the cgroup2 mount, as the kernel
/// reports it in /proc/<pid>/cgroup (`0::<path>`).
fn own_cgroup(out: &Output) -> anyhow::Result<PathBuf> {
    let lines = stdout_lines(out)?;
    let line = lines.iter().find_map(|l| l.strip_prefix("0::"));
    Ok(PathBuf::from(line.context("no cgroup v2 line")?))
}

fn ip_addr_show() -> Command {
    let mut ip = Command::new("ip");
    ip.args(["-4", "-o", "addr", "show"]);
    ip
}

/// (device, address/prefix) pairs from `ip -4 -o addr show` output, whose
/// lines read `<n>: <dev> inet <addr>/<len> ...`.
fn ipv4_addrs(out: Output) -> anyhow::Result<Vec<(String, String)>> {
    let lines = stdout_lines(&out)?;
    let pairs = lines.iter().filter_map(|line| {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        match tokens.as_slice() {
            [_, dev, "inet", addr, ..] => Some((dev.to_string(), addr.to_string())),
            _ => None,
        }
    });
    Ok(pairs.collect())
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn processes_start_in_their_netns_and_cgroup() -> anyhow::Result<()> {
    if !simnode::require_privileges("processes_start_in_their_netns_and_cgroup") {
        return Ok(());
    }
    let mut node = SimNode::new("spawn")?;
    let pod = node.add_pod("app")?;
    let mount = simnode::cgroup2_mount()?;
    let rel = |p: PathBuf| -> anyhow::Result<PathBuf> {
        Ok(PathBuf::from("/").join(p.strip_prefix(&mount)?))
    };

    let cat = || {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        cmd
    };
    let in_pod = own_cgroup(&node.run_in_pod(&pod, cat(), RUN_TIMEOUT)?)?;
    assert_eq!(in_pod, rel(pod.container_cgroup())?);
    let on_node = own_cgroup(&node.run_on_node(cat(), RUN_TIMEOUT)?)?;
    assert_eq!(on_node, rel(node.node_cgroup())?);

    let pod_addrs = ipv4_addrs(node.run_in_pod(&pod, ip_addr_show(), RUN_TIMEOUT)?)?;
    assert!(
        pod_addrs.contains(&("eth0".into(), format!("{}/24", pod.ip))),
        "{pod_addrs:?}"
    );
    let node_addrs = ipv4_addrs(node.run_on_node(ip_addr_show(), RUN_TIMEOUT)?)?;
    assert!(
        node_addrs.contains(&("br0".into(), format!("{}/24", node.node_ip()))),
        "{node_addrs:?}"
    );
    node.close()
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn node_is_torn_down_on_panic() {
    if !simnode::require_privileges("node_is_torn_down_on_panic") {
        return;
    }
    let built = std::panic::catch_unwind(|| {
        let mut node = SimNode::new("panic").expect("node");
        node.add_pod("victim").expect("pod");
        let names = (node.id().to_owned(), node.cgroup_root().to_path_buf());
        std::panic::panic_any(names);
    });
    let payload = built.expect_err("the closure panics");
    let (id, root) = payload
        .downcast_ref::<(String, PathBuf)>()
        .expect("panic payload is the node's names")
        .clone();
    assert_eq!(leftover_netns(&id), Vec::<String>::new());
    assert!(!root.exists(), "{} still exists", root.display());
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn run_in_pod_is_bounded_in_time() -> anyhow::Result<()> {
    if !simnode::require_privileges("run_in_pod_is_bounded_in_time") {
        return Ok(());
    }
    let mut node = SimNode::new("bound")?;
    let pod = node.add_pod("app")?;
    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let err = node
        .run_in_pod(&pod, sleep, Duration::from_millis(300))
        .expect_err("sleep 30 must be cut off");
    assert!(format!("{err:#}").contains("did not finish"), "{err:#}");

    // The child exits while a background grandchild keeps stdout open:
    // its output still comes back, without waiting for the grandchild.
    let mut sh = Command::new("sh");
    sh.args(["-c", "sleep 30 & echo done"]);
    let out = node.run_in_pod(&pod, sh, RUN_TIMEOUT)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
    // close() must kill the orphaned `sleep` through cgroup.kill.
    node.close()
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn linked_nodes_route_between_their_pods() {
    if !simnode::require_privileges("linked_nodes_route_between_their_pods") {
        return;
    }
    let mut a = SimNode::new("linka").expect("node a");
    let mut b = SimNode::new_in_subnet("linkb", 1).expect("node b");
    dataplane_tests::simnode::link_nodes(&a, &b).expect("link");
    let client = a.add_pod("client").expect("pod");
    let server = b.add_pod("server").expect("pod");
    assert_eq!(
        server.ip.octets()[2],
        1,
        "pods of node b live in 198.18.1.0/24"
    );
    let _srv = dataplane_tests::peers::serve(&b, &server, "far").expect("serve");
    let to = std::net::SocketAddrV4::new(server.ip, dataplane_tests::peers::BACKEND_PORT);
    let hellos = dataplane_tests::peers::hello(&a, &client, to, 2).expect("hello");
    let client_ip = client.ip.to_string();
    assert!(
        hellos
            .iter()
            .all(|h| h.ok && h.peer_ip() == Some(client_ip.as_str())),
        "routed across the link, no NAT: {hellos:#?}"
    );
}
