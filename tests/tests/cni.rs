//! End-to-end: pods enrolled at their creation by the CNI plugin. The
//! real chain a node runs (Debian's `bridge` + `host-local`, then
//! `dataplane-cni`), invoked as a container runtime invokes it, makes each
//! pod's network on a simulated node whose agent reads a stand-in
//! Kubernetes API server. The pods are not in the API yet when their
//! sandbox is made (the race the plugin closes): only the plugin can get
//! them enrolled before their first connect.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dataplane_tests::agent::Agent;
use dataplane_tests::cni::{CniChain, DEBIAN_PLUGINS, node_conflist, result_ip};
use dataplane_tests::http_peers;
use dataplane_tests::kubeapi::KubeApiInNetns;
use dataplane_tests::scenario::{ECHO_VIP, backend_addr};
use dataplane_tests::simnode::new_pod_uid;
use dataplane_tests::{Pod, SimNode, eventually, require_privileges};

const PODS: usize = 100;
const THREADS: usize = 4;

/// Namespaces `shop` (enrolled) and `legacy`, and service `web` at
/// [`ECHO_VIP`] served by `backends`; no pod of the node.
fn cluster(backends: &[&Pod]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {{mesh.sidecarless.dev/enrolled: \"true\"}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: legacy}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{clusterIP: {}, ports: [{{name: http, port: {}, protocol: TCP}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: shop\n  \
         labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n",
        ECHO_VIP.ip(),
        ECHO_VIP.port()
    );
    for b in backends {
        yaml.push_str(&format!(
            "- addresses: [{}]\n  conditions: {{ready: true}}\n",
            b.ip
        ));
    }
    let port = backend_addr(backends[0]).port();
    yaml.push_str(&format!(
        "ports:\n- name: http\n  port: {port}\n  protocol: TCP\n"
    ));
    yaml
}

/// One request from `pod` to the service's VIP: whether it was answered.
/// An uncaptured connect to the VIP fails at once (the node has no route
/// to the service network).
fn reaches_vip(node: &SimNode, pod: &Pod) -> anyhow::Result<bool> {
    let url = format!("http://{ECHO_VIP}/");
    let report = http_peers::load(
        node,
        pod,
        &["--url", &url, "--requests", "1", "--timeout-ms", "3000"],
    )?;
    Ok(report.ok == 1)
}

struct Kube {
    _api: KubeApiInNetns,
    dir: std::path::PathBuf,
}

impl Drop for Kube {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_kube(node: &SimNode, backends: &[&Pod], name: &str) -> (Kube, Vec<String>) {
    let api = KubeApiInNetns::start(node.netns(), &cluster(backends)).expect("API server");
    let dir = std::env::temp_dir().join(format!("dp-cni-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = api.write_kubeconfig(&dir).expect("kubeconfig");
    let args = vec![
        "--kubernetes".to_string(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--node-name={}", node.id()),
    ];
    (Kube { _api: api, dir }, args)
}

fn wait_synced(agent: &Agent) {
    eventually("the API state applied", Duration::from_secs(15), || {
        anyhow::ensure!(agent.metric("dataplane_kubernetes_services") == 1.0);
        Ok(())
    })
    .expect("synced");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn pods_made_in_a_burst_by_the_cni_chain_are_captured_from_their_first_connect() {
    if !require_privileges(
        "pods_made_in_a_burst_by_the_cni_chain_are_captured_from_their_first_connect",
    ) {
        return;
    }
    let mut node = SimNode::new("cniburst").expect("node");
    let b1 = node.add_pod("web-0").expect("pod");
    let b2 = node.add_pod("web-1").expect("pod");
    let _s1 = http_peers::serve(&node, &b1, "web-0").expect("serve");
    let _s2 = http_peers::serve(&node, &b2, "web-1").expect("serve");
    let (kube, args) = start_kube(&node, &[&b1, &b2], "burst");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start_with(&node, "services: []\n", &args).expect("agent");
    wait_synced(&agent);

    let conflist = node_conflist(
        &node,
        &kube.dir.join("ipam"),
        &Agent::cni_socket_of(&node),
        "closed",
    );
    let chain = CniChain::standard(&node, conflist).expect("chain");
    let mut sandboxes = Vec::new();
    for i in 0..PODS {
        sandboxes.push(
            node.add_pod_sandbox(&format!("burst-{i}"), &new_pod_uid())
                .expect("sandbox"),
        );
    }
    // A pod of a namespace that is not enrolled: made by the same chain,
    // not captured (what the burst's pods would see without the plugin).
    let outsider = node
        .add_pod_sandbox("outsider", &new_pod_uid())
        .expect("sandbox");
    chain
        .add(&outsider, "legacy")
        .expect("ADD for a pod outside the mesh");
    assert!(
        !reaches_vip(&node, &outsider).expect("request"),
        "the outsider is not captured"
    );

    // The burst: each pod's first connect the moment its ADD returns.
    let queue = Mutex::new(sandboxes.clone());
    let answered = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let results = Mutex::new(std::collections::HashMap::new());
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                loop {
                    let Some(pod) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let outcome = chain
                        .add(&pod, "shop")
                        .map_err(anyhow::Error::from)
                        .and_then(|result| {
                            result_ip(&result)?;
                            results.lock().unwrap().insert(pod.name.clone(), result);
                            reaches_vip(&node, &pod)
                        });
                    match outcome {
                        Ok(true) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{}: not captured", pod.name)),
                        Err(err) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{}: {err:#}", pod.name)),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {PODS}: {failures:?}",
        failures.len()
    );
    assert_eq!(answered.load(Ordering::Relaxed), PODS);
    assert_eq!(
        agent.metric("dataplane_cni_requests_total{command=\"ADD\",outcome=\"enrolled\"}"),
        PODS as f64
    );
    assert_eq!(
        agent.metric("dataplane_cni_requests_total{command=\"ADD\",outcome=\"not_enrolled\"}"),
        1.0,
        "the outsider"
    );

    // CHECK agrees; DEL tears the network down.
    let pod = &sandboxes[0];
    let result = results.lock().unwrap()[&pod.name].clone();
    chain.check(pod, "shop", &result).expect("CHECK");
    chain.del(pod, "shop", Some(&result)).expect("DEL");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn without_the_agent_add_fails_closed_or_lets_the_pod_start_and_is_counted() {
    if !require_privileges(
        "without_the_agent_add_fails_closed_or_lets_the_pod_start_and_is_counted",
    ) {
        return;
    }
    let mut node = SimNode::new("cnifail").expect("node");
    let b1 = node.add_pod("web-0").expect("pod");
    let _s1 = http_peers::serve(&node, &b1, "web-0").expect("serve");
    let (kube, args) = start_kube(&node, &[&b1], "fail");
    let socket = Agent::cni_socket_of(&node);
    std::fs::create_dir_all(socket.parent().expect("dir")).expect("dir");

    // No agent yet. Fail-closed: ADD fails with "try again later" and the
    // runtime would retry; its DEL succeeds all the same.
    let closed = CniChain::standard(
        &node,
        node_conflist(&node, &kube.dir.join("ipam"), &socket, "closed"),
    )
    .expect("chain");
    let pod = node
        .add_pod_sandbox("early", &new_pod_uid())
        .expect("sandbox");
    let err = closed.add(&pod, "shop").expect_err("no agent: ADD fails");
    assert_eq!(
        (err.plugin.as_str(), err.code),
        ("dataplane-cni", 11),
        "{err}"
    );
    closed
        .del(&pod, "shop", None)
        .expect("DEL without the agent");

    // Fail-open: the pod starts, and is recorded.
    let open = CniChain::standard(
        &node,
        node_conflist(&node, &kube.dir.join("ipam"), &socket, "open"),
    )
    .expect("chain");
    let late = node
        .add_pod_sandbox("late", &new_pod_uid())
        .expect("sandbox");
    open.add(&late, "shop").expect("fail-open ADD passes");

    // The agent, once up, counts it; the retried pod is enrolled.
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start_with(&node, "services: []\n", &args).expect("agent");
    wait_synced(&agent);
    eventually("the fail-open pod counted", Duration::from_secs(5), || {
        anyhow::ensure!(agent.metric("dataplane_cni_fail_open_pods") == 1.0);
        Ok(())
    })
    .expect("counted");
    closed
        .add(&pod, "shop")
        .expect("retried ADD with the agent up");
    assert!(
        reaches_vip(&node, &pod).expect("request"),
        "captured from its first connect"
    );
}

/// An agent that has not listed the API yet (the server is unreachable and
/// it has no snapshot) cannot tell whether a pod belongs in the mesh: the
/// plugin fails closed with "try again later", never lets it start
/// uncaptured.
#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn before_the_agent_has_listed_the_api_add_is_retried() {
    if !require_privileges("before_the_agent_has_listed_the_api_add_is_retried") {
        return;
    }
    let mut node = SimNode::new("cniearly").expect("node");
    let b1 = node.add_pod("web-0").expect("pod");
    let (kube, args) = start_kube(&node, &[&b1], "notyet");
    // The API server goes away before the agent ever lists it.
    kube._api.stop();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _agent = Agent::start_with(&node, "services: []\n", &args).expect("agent");
    let chain = CniChain::standard(
        &node,
        node_conflist(
            &node,
            &kube.dir.join("ipam"),
            &Agent::cni_socket_of(&node),
            "closed",
        ),
    )
    .expect("chain");
    let pod = node
        .add_pod_sandbox("early", &new_pod_uid())
        .expect("sandbox");
    let err = chain
        .add(&pod, "shop")
        .expect_err("the agent cannot tell yet");
    assert_eq!(
        (err.plugin.as_str(), err.code),
        ("dataplane-cni", 11),
        "{err}"
    );
    assert!(err.details.contains("not read the Kubernetes API"), "{err}");
    chain.del(&pod, "shop", None).expect("DEL");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn the_agent_installs_the_plugin_in_the_nodes_network_configuration_and_keeps_it_there() {
    if !require_privileges(
        "the_agent_installs_the_plugin_in_the_nodes_network_configuration_and_keeps_it_there",
    ) {
        return;
    }
    let mut node = SimNode::new("cniinst").expect("node");
    let b1 = node.add_pod("web-0").expect("pod");
    let _s1 = http_peers::serve(&node, &b1, "web-0").expect("serve");
    let (kube, args) = start_kube(&node, &[&b1], "install");
    // The node's network plugin wrote its configuration: the usual chain
    // without ours.
    let conf_dir = kube.dir.join("net.d");
    let bin_dir = kube.dir.join("bin");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let mut network = node_conflist(
        &node,
        &kube.dir.join("ipam"),
        std::path::Path::new("/unused"),
        "closed",
    );
    network["plugins"].as_array_mut().expect("plugins").pop();
    let conf = conf_dir.join("10-bridge.conflist");
    std::fs::write(&conf, network.to_string()).expect("conflist");
    let mut args: Vec<String> = args;
    args.push(format!("--cni-conf-dir={}", conf_dir.display()));
    args.push(format!("--cni-bin-dir={}", bin_dir.display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // --cni-plugin left to its default: dataplane-cni beside the agent.
    let agent = Agent::start_with(&node, "services: []\n", &args).expect("agent");
    wait_synced(&agent);
    let installed = || -> anyhow::Result<serde_json::Value> {
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&conf)?)?;
        let last = config["plugins"].as_array().and_then(|p| p.last()).cloned();
        anyhow::ensure!(
            last.as_ref().and_then(|p| p["type"].as_str()) == Some("dataplane-cni"),
            "not installed: {config}"
        );
        Ok(config)
    };
    let config =
        eventually("the plugin installed", Duration::from_secs(10), installed).expect("installed");
    assert_eq!(
        config["plugins"][1]["agentSocket"].as_str(),
        Some(Agent::cni_socket_of(&node).to_str().expect("utf-8")),
        "the entry names the agent's socket"
    );
    assert!(
        bin_dir.join("dataplane-cni").is_file(),
        "the binary beside the plugins"
    );
    assert_eq!(agent.metric("dataplane_cni_installed"), 1.0);

    // A runtime running the node's configuration as it now is, from the
    // node's plugin directories: the pod is captured from its first
    // connect.
    let chain = CniChain::new(&node, config, &[DEBIAN_PLUGINS.into(), bin_dir.clone()]);
    let pod = node
        .add_pod_sandbox("fresh", &new_pod_uid())
        .expect("sandbox");
    chain.add(&pod, "shop").expect("ADD");
    assert!(
        reaches_vip(&node, &pod).expect("request"),
        "captured from its first connect"
    );

    // The network plugin rewrites its file (its own upgrade): the entry is
    // put back at the agent's next pass.
    std::fs::write(&conf, network.to_string()).expect("rewrite");
    eventually("the plugin put back", Duration::from_secs(10), installed).expect("put back");
}
