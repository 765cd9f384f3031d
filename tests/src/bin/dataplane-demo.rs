//! The demo: a simulated node (Linux namespaces + cgroups named like
//! kubelet's) with one client pod and three backend pods, no sidecar
//! anywhere. The client calls the `echo` service by its virtual IP; the
//! eBPF capture sends each connection to the shared node proxy, which
//! balances it over the backends. Run by `cargo xtask demo`.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use dataplane_tests::peers;
use dataplane_tests::scenario::{ECHO_VIP, MeshNode};

const REQUESTS: u32 = 9;
const BACKENDS: usize = 3;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo: FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    if !dataplane_tests::require_privileges("demo") {
        bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }
    println!("demo: building a simulated node: 1 client pod, {BACKENDS} backend pods, node agent");
    let mesh = MeshNode::start("demo", BACKENDS)?;
    let node_ip = mesh.node.node_ip().to_string();
    println!(
        "demo: client pod {} (enrolled) calls service echo at {ECHO_VIP}; backends at {}",
        mesh.client.ip,
        mesh.backends
            .iter()
            .map(|(pod, _)| format!("{}={}", pod.name, pod.ip))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let hellos = peers::hello(&mesh.node, &mesh.client, ECHO_VIP, REQUESTS)?;
    let mut answered = BTreeSet::new();
    for (i, hello) in hellos.iter().enumerate() {
        if hello.ok {
            let via = if hello.peer_ip() == Some(node_ip.as_str()) {
                "via the node proxy"
            } else {
                "NOT via the node proxy"
            };
            println!(
                "request {:>2}: answered by {} ({via}: the backend saw {}) in {} us",
                i + 1,
                hello.backend,
                hello.peer,
                hello.elapsed_us
            );
            answered.insert(hello.backend.clone());
        } else {
            println!(
                "request {:>2}: FAILED ({}: {})",
                i + 1,
                hello.kind,
                hello.error
            );
        }
    }
    let metrics = mesh
        .agent
        .metrics()
        .context("reading the agent's metrics")?;
    let (captured, forwarded) = (metrics.captured(), metrics.forwarded());
    let all_ok = hellos
        .iter()
        .all(|h| h.ok && h.peer_ip() == Some(node_ip.as_str()));
    let ok = all_ok
        && answered.len() >= 2
        && captured >= u64::from(REQUESTS)
        && forwarded >= u64::from(REQUESTS);
    let verdict = if ok { "ok" } else { "FAILED" };
    println!(
        "demo: {verdict} backends={} captured={captured} forwarded={forwarded}",
        answered.len()
    );
    if !ok {
        bail!("agent log:\n{}", mesh.agent.log());
    }
    Ok(())
}
