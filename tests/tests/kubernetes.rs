//! End-to-end: the agent run as the DaemonSet runs it (`--kubernetes`),
//! reading a stand-in API server in the node's namespace (recorded
//! objects, the real wire format, the real kube-rs client), on a simulated
//! node: pods are enrolled by their namespace's label, services and
//! endpoints come from Services and EndpointSlices, and changes apply
//! while traffic flows.

use std::fmt::Write as _;
use std::time::Duration;

use dataplane_tests::agent::Agent;
use dataplane_tests::http_peers;
use dataplane_tests::kubeapi::{Kind, KubeApiInNetns};
use dataplane_tests::scenario::{ECHO_VIP, backend_addr};
use dataplane_tests::{Pod, SimNode, eventually, require_privileges};

fn pod_yaml(pod: &Pod, namespace: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {namespace}, uid: {}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: app, image: registry.example/app:1}}]}}\n\
         status: {{phase: Running, podIP: {}, podIPs: [{{ip: {}}}]}}\n",
        pod.name, pod.uid, pod.ip, pod.ip
    )
}

/// The EndpointSlice of `web`: each backend with its readiness.
fn slice_yaml(backends: &[(&Pod, bool)]) -> String {
    let mut yaml = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abcde\n  \
         namespace: shop\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n",
    );
    for (pod, ready) in backends {
        let _ = write!(
            yaml,
            "- addresses: [{}]\n  conditions: {{ready: {ready}, serving: true, terminating: {}}}\n  \
             targetRef: {{kind: Pod, namespace: shop, name: {}}}\n",
            pod.ip, !ready, pod.name
        );
    }
    let port = backend_addr(backends[0].0).port();
    let _ = write!(
        yaml,
        "ports:\n- name: http\n  port: {port}\n  protocol: TCP\n"
    );
    yaml
}

/// The stand-in API server serving `cluster` in the node's namespace, and
/// the agent run as the DaemonSet runs it against it (the config file has
/// no services and no pods: all comes from the API).
struct KubeNode {
    api: KubeApiInNetns,
    agent: Agent,
    dir: std::path::PathBuf,
}

impl KubeNode {
    fn start(node: &SimNode, cluster: &str, name: &str) -> Self {
        let api = KubeApiInNetns::start(node.netns(), cluster).expect("API server");
        let dir = std::env::temp_dir().join(format!("dp-kube-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let kubeconfig = api.write_kubeconfig(&dir).expect("kubeconfig");
        let agent = Agent::start_with(
            node,
            "services: []\n",
            &[
                "--kubernetes",
                &format!("--kubeconfig={}", kubeconfig.display()),
                &format!("--node-name={}", node.id()),
            ],
        )
        .expect("agent");
        Self { api, agent, dir }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn the_agent_serves_what_the_api_server_says() {
    if !require_privileges("the_agent_serves_what_the_api_server_says") {
        return;
    }
    let mut node = SimNode::new("kube").expect("node");
    let client = node.add_pod("frontend").expect("pod");
    let outsider = node.add_pod("legacy").expect("pod");
    let b1 = node.add_pod("web-0").expect("pod");
    let b2 = node.add_pod("web-1").expect("pod");
    let _s1 = http_peers::serve(&node, &b1, "web-0").expect("serve");
    let _s2 = http_peers::serve(&node, &b2, "web-1").expect("serve");
    let node_name = node.id().to_string();

    let mut cluster = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {{mesh.sidecarless.dev/enrolled: \"true\"}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: legacy}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{type: ClusterIP, clusterIP: {}, ports: [{{name: http, port: {}, protocol: TCP}}]}}\n---\n",
        ECHO_VIP.ip(),
        ECHO_VIP.port()
    );
    cluster.push_str(&slice_yaml(&[(&b1, true), (&b2, true)]));
    for (pod, ns) in [
        (&client, "shop"),
        (&outsider, "legacy"),
        (&b1, "shop"),
        (&b2, "shop"),
    ] {
        cluster.push_str("---\n");
        cluster.push_str(&pod_yaml(pod, ns, &node_name));
    }
    let mut kube = KubeNode::start(&node, &cluster, "e2e");
    let (api, agent) = (&kube.api, &mut kube.agent);
    eventually("the API state applied", Duration::from_secs(15), || {
        anyhow::ensure!(agent.metric("dataplane_kubernetes_up") == 1.0);
        // frontend, web-0 and web-1 are in the enrolled namespace.
        anyhow::ensure!(agent.metric("dataplane_kubernetes_pods") == 3.0);
        Ok(())
    })
    .expect("synced");

    let url = format!("http://{ECHO_VIP}/");
    let load = |pod: &Pod, n: &str| {
        http_peers::load(
            &node,
            pod,
            &[
                "--url",
                &url,
                "--requests",
                n,
                "--concurrency",
                "2",
                "--timeout-ms",
                "2000",
            ],
        )
    };
    // Retried: the pod is enrolled at the agent's next resync.
    eventually(
        "the enrolled pod reaches the service",
        Duration::from_secs(10),
        || {
            let report = load(&client, "1")?;
            anyhow::ensure!(report.ok == 1, "{report:?}");
            Ok(())
        },
    )
    .expect("enrolled");
    let report = load(&client, "100").expect("load");
    assert_eq!(report.ok, 100, "{report:?}");
    assert!(report.backends.contains_key("web-0") && report.backends.contains_key("web-1"));

    // The pod of a namespace that is not enrolled is not captured: the VIP
    // is nobody's address for it.
    let report = http_peers::load(
        &node,
        &outsider,
        &["--url", &url, "--requests", "1", "--timeout-ms", "500"],
    )
    .expect("load");
    assert_eq!(report.ok, 0, "not captured: {report:?}");

    // web-0 becomes not ready (its pod is terminating): it soon gets no
    // new request (the in-process tests bound the source's part at 1 s;
    // this bounds the whole path on a loaded machine).
    api.apply_yaml(&slice_yaml(&[(&b1, false), (&b2, true)]))
        .expect("apply");
    let changed = std::time::Instant::now();
    eventually("web-0 out of rotation", Duration::from_secs(3), || {
        let report = load(&client, "20")?;
        anyhow::ensure!(!report.backends.contains_key("web-0"), "{report:?}");
        Ok(())
    })
    .expect("web-0 out");
    eprintln!(
        "not ready -> out of rotation within {:?}",
        changed.elapsed()
    );
    let report = load(&client, "100").expect("load");
    assert_eq!(report.ok, 100, "{report:?}");
    assert_eq!(report.backends.get("web-0"), None, "{report:?}");

    // The frontend pod opts out by annotation: it is no longer captured.
    api.apply_yaml(&pod_yaml(&client, "shop", &node_name).replacen(
        "metadata: {",
        "metadata: {annotations: {mesh.sidecarless.dev/enrolled: \"false\"}, ",
        1,
    ))
    .expect("apply");
    eventually("the pod leaves the mesh", Duration::from_secs(10), || {
        anyhow::ensure!(agent.metric("dataplane_kubernetes_pods") == 2.0);
        Ok(())
    })
    .expect("opt-out");
    // Deleted: the VIP leaves the data plane; an enrolled pod's connect to
    // it is not captured any more (web-1's own connect, it is enrolled).
    api.delete(Kind::Service, "shop", "web").expect("delete");
    eventually("the service leaves", Duration::from_secs(10), || {
        anyhow::ensure!(agent.metric("dataplane_kubernetes_services") == 0.0);
        let report = http_peers::load(
            &node,
            &b2,
            &["--url", &url, "--requests", "1", "--timeout-ms", "500"],
        )?;
        anyhow::ensure!(report.ok == 0, "still served: {report:?}");
        Ok(())
    })
    .expect("deleted");
}

/// Tenants from namespace labels: a pod of tenant `a` cannot reach tenant
/// `b`'s service (its connect fails at once in the kernel, counted) until
/// the service is exported to `a`; `b`'s own pods can. A pod outside the
/// mesh dialling the proxy's port itself is refused.
#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn tenants_reach_their_own_services_and_those_exported_to_them() {
    if !require_privileges("tenants_reach_their_own_services_and_those_exported_to_them") {
        return;
    }
    let mut node = SimNode::new("tenants").expect("node");
    let a_client = node.add_pod("a-client").expect("pod");
    let b_client = node.add_pod("b-client").expect("pod");
    let outsider = node.add_pod("outsider").expect("pod");
    let web = node.add_pod("web-0").expect("pod");
    let _s = http_peers::serve(&node, &web, "web-0").expect("serve");
    let node_name = node.id().to_string();

    let service = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: team-b{annotations}}}\n\
             spec: {{clusterIP: {}, ports: [{{name: http, port: {}, protocol: TCP}}]}}\n",
            ECHO_VIP.ip(),
            ECHO_VIP.port()
        )
    };
    let mut cluster = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-a\n  labels: {mesh.sidecarless.dev/enrolled: \"true\", mesh.sidecarless.dev/tenant: a}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-b\n  labels: {mesh.sidecarless.dev/enrolled: \"true\", mesh.sidecarless.dev/tenant: b}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n",
    );
    cluster.push_str(&service(""));
    cluster.push_str("---\n");
    cluster.push_str(&slice_yaml(&[(&web, true)]).replace("namespace: shop", "namespace: team-b"));
    for (pod, ns) in [
        (&a_client, "team-a"),
        (&b_client, "team-b"),
        (&outsider, "legacy"),
        (&web, "team-b"),
    ] {
        cluster.push_str("---\n");
        cluster.push_str(&pod_yaml(pod, ns, &node_name));
    }
    let mut kube = KubeNode::start(&node, &cluster, "tenants");
    let (api, agent) = (&kube.api, &mut kube.agent);
    let url = format!("http://{ECHO_VIP}/");
    let one = |pod: &Pod| {
        http_peers::load(
            &node,
            pod,
            &["--url", &url, "--requests", "1", "--timeout-ms", "2000"],
        )
    };
    eventually(
        "tenant b's own pod reaches its service",
        Duration::from_secs(15),
        || {
            let report = one(&b_client)?;
            anyhow::ensure!(report.ok == 1, "{report:?}");
            Ok(())
        },
    )
    .expect("b reaches b");

    // Refused at once: well within the client's own 10 s timeout.
    let started = std::time::Instant::now();
    let report = http_peers::load(
        &node,
        &a_client,
        &["--url", &url, "--requests", "1", "--timeout-ms", "10000"],
    )
    .expect("load");
    let took = started.elapsed();
    assert_eq!(report.ok, 0, "a may not call b's service: {report:?}");
    assert!(
        took < Duration::from_secs(3),
        "refused at once, not timed out: {took:?}"
    );
    assert!(
        agent.metric("dataplane_capture_tenant_denied") >= 1.0,
        "counted by the connect hook"
    );

    api.apply_yaml(&service(
        ", annotations: {mesh.sidecarless.dev/export-to: a}",
    ))
    .expect("export");
    eventually(
        "a reaches b's service once exported",
        Duration::from_secs(10),
        || {
            let report = one(&a_client)?;
            anyhow::ensure!(report.ok == 1, "{report:?}");
            Ok(())
        },
    )
    .expect("exported");

    // Outside the mesh, dialling the proxy's own port: no original
    // destination, refused.
    let proxy_url = format!("http://{}:15001/", node.node_ip());
    let report = http_peers::load(
        &node,
        &outsider,
        &[
            "--url",
            &proxy_url,
            "--requests",
            "1",
            "--timeout-ms",
            "2000",
        ],
    )
    .expect("load");
    assert_eq!(report.ok, 0, "{report:?}");
    let refused = agent.get("/metrics").unwrap_or_default();
    assert!(
        refused.lines().any(
            |l| l.starts_with("dataplane_proxy_refused_connections_total")
                && l.contains("unknown_destination")
        ),
        "refused for want of an original destination"
    );
}

/// An agent restarted while the API server is unreachable routes from its
/// snapshot of the API's last state: enrolled pods stay captured and the
/// service keeps its endpoints.
#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn an_agent_restarted_while_the_api_server_is_down_keeps_serving() {
    if !require_privileges("an_agent_restarted_while_the_api_server_is_down_keeps_serving") {
        return;
    }
    let mut node = SimNode::new("kubesnap").expect("node");
    let client = node.add_pod("frontend").expect("pod");
    let b1 = node.add_pod("web-0").expect("pod");
    let _s1 = http_peers::serve(&node, &b1, "web-0").expect("serve");
    let node_name = node.id().to_string();
    let mut cluster = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {{mesh.sidecarless.dev/enrolled: \"true\"}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{clusterIP: {}, ports: [{{name: http, port: {}, protocol: TCP}}]}}\n---\n",
        ECHO_VIP.ip(),
        ECHO_VIP.port()
    );
    cluster.push_str(&slice_yaml(&[(&b1, true)]));
    for pod in [&client, &b1] {
        cluster.push_str("---\n");
        cluster.push_str(&pod_yaml(pod, "shop", &node_name));
    }
    let mut kube = KubeNode::start(&node, &cluster, "snap");
    let (api, agent) = (&kube.api, &mut kube.agent);
    let url = format!("http://{ECHO_VIP}/");
    let load = |n: &str| {
        http_peers::load(
            &node,
            &client,
            &[
                "--url",
                &url,
                "--requests",
                n,
                "--concurrency",
                "2",
                "--timeout-ms",
                "2000",
            ],
        )
    };
    eventually(
        "served from the API's state",
        Duration::from_secs(15),
        || {
            let report = load("1")?;
            anyhow::ensure!(report.ok == 1, "{report:?}");
            Ok(())
        },
    )
    .expect("served");
    let snapshot = Agent::work_dir_of(&node).join("kubernetes.snapshot");
    eventually("the snapshot written", Duration::from_secs(10), || {
        anyhow::ensure!(snapshot.is_file());
        Ok(())
    })
    .expect("snapshot");

    api.stop();
    agent.kill().expect("kill");
    agent.spawn(&node).expect("restart");
    let report = load("50").expect("load");
    assert_eq!(report.ok, 50, "served from the snapshot: {report:?}");
    assert_eq!(agent.metric("dataplane_kubernetes_from_snapshot"), 1.0);
    assert_eq!(agent.metric("dataplane_kubernetes_up"), 0.0);
}
