//! End-to-end: discovery from a real 3-member etcd cluster (Debian's
//! etcd 3.4, each member in its own network namespace), through the real
//! agent with eBPF capture, while members die, get cut off, or all go
//! away. Services and instances are written as an application outside the
//! mesh would: `etcdctl` and `dataplane-agent register`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use dataplane_tests::agent::Agent;
use dataplane_tests::etcd::{EtcdCluster, EtcdUser};
use dataplane_tests::http_peers::{self, LoadReport};
use dataplane_tests::scenario::{ECHO_VIP, backend_addr};
use dataplane_tests::{Pod, Proc, SimNode, binaries, eventually, require_privileges};

const SERVICE_KEY: &str = "/dataplane/v1/services/shop/web";
const INSTANCES: &str = "/dataplane/v1/instances/shop/web/";

/// A node whose one service (`shop/web` at [`ECHO_VIP`]) comes from the
/// registry; the config file only enrolls the client pod.
struct RegistryNode {
    agent: Agent,
    /// What every registry client of the test needs besides the endpoints
    /// (the CA, for TLS).
    client_args: Vec<String>,
    backends: Vec<(Pod, Proc)>,
    client: Pod,
    etcd: EtcdCluster,
    snapshot: PathBuf,
    node: SimNode,
}

impl RegistryNode {
    fn start(hint: &str, backends: &[&str], agent_args: &[&str]) -> RegistryNode {
        Self::start_with(hint, backends, agent_args, |_, _| {})
    }

    /// [`RegistryNode::start`], with `prepare` run on the registry before
    /// the agent starts.
    fn start_with(
        hint: &str,
        backends: &[&str],
        agent_args: &[&str],
        prepare: impl FnOnce(&SimNode, &EtcdCluster),
    ) -> RegistryNode {
        Self::start_opts(hint, backends, agent_args, false, prepare)
    }

    /// `tls`: the members speak TLS to clients (the agent and `register`
    /// are given the test CA).
    fn start_opts(
        hint: &str,
        backends: &[&str],
        agent_args: &[&str],
        tls: bool,
        prepare: impl FnOnce(&SimNode, &EtcdCluster),
    ) -> RegistryNode {
        let mut node = SimNode::new(hint).expect("node");
        let etcd = if tls {
            EtcdCluster::start_tls(&mut node, 3)
        } else {
            EtcdCluster::start(&mut node, 3)
        }
        .expect("etcd cluster");
        let client = node.add_pod("client").expect("pod");
        let backends = backends
            .iter()
            .map(|name| {
                let pod = node.add_pod(name).expect("pod");
                let proc = http_peers::serve(&node, &pod, name).expect("backend");
                (pod, proc)
            })
            .collect();
        etcd.etcdctl(
            &node,
            &[
                "put",
                SERVICE_KEY,
                &format!(r#"{{"vip": "{ECHO_VIP}", "protocol": "http"}}"#),
            ],
        )
        .expect("service record");
        prepare(&node, &etcd);
        let snapshot = Agent::work_dir_of(&node).join("registry.snapshot");
        let config = format!(
            "pods:\n  - uid: {}\n    name: client\n    ip: {}\n",
            client.uid, client.ip
        );
        let client_args = if tls {
            vec![format!("--etcd-ca={}", etcd.ca().display())]
        } else {
            Vec::new()
        };
        let mut args = vec![
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("--registry-snapshot={}", snapshot.display()),
        ];
        args.extend(client_args.iter().cloned());
        // Removals apply at once unless the test is about holding them.
        if !agent_args.iter().any(|a| a.starts_with("--registry-hold=")) {
            args.push("--registry-hold=0s".to_string());
        }
        args.extend(agent_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start_with(&node, &config, &args).expect("agent");
        RegistryNode {
            agent,
            client_args,
            backends,
            client,
            etcd,
            snapshot,
            node,
        }
    }

    fn backend(&self, name: &str) -> &Pod {
        &self
            .backends
            .iter()
            .find(|(pod, _)| pod.name == name)
            .expect("backend")
            .0
    }

    /// Writes an instance record for backend `name` (no lease). Retried
    /// for a while: a write right after a member came back can meet a
    /// leader election, which etcd answers with a deadline error.
    fn put_instance(&self, name: &str) {
        let value = format!(r#"{{"address": "{}"}}"#, backend_addr(self.backend(name)));
        let key = format!("{INSTANCES}{name}");
        let put =
            dataplane_tests::eventually("etcd accepts the write", Duration::from_secs(20), || {
                self.etcd.etcdctl(&self.node, &["put", &key, &value])
            });
        if let Err(err) = put {
            panic!("{err:#}\n{}", self.etcd.logs());
        }
    }

    fn etcdctl(&self, args: &[&str]) -> String {
        self.etcd
            .etcdctl(&self.node, args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.etcd.logs()))
    }

    /// The endpoints of `shop/web` the agent has in force.
    fn endpoints_in_force(&self) -> Vec<String> {
        let dump: serde_json::Value = self
            .agent
            .get("/config_dump")
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "web" && s["namespace"] == "shop")
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["address"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until the endpoints in force are exactly `names`; how long.
    fn wait_endpoints(&self, names: &[&str], within: Duration) -> Duration {
        let mut want: Vec<String> = names
            .iter()
            .map(|n| backend_addr(self.backend(n)).to_string())
            .collect();
        want.sort();
        let started = Instant::now();
        eventually(&format!("endpoints {names:?}"), within, || {
            let mut now = self.endpoints_in_force();
            now.sort();
            anyhow::ensure!(now == want, "in force: {now:?}");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent.log()));
        started.elapsed()
    }

    fn load(&self, args: &[&str]) -> anyhow::Result<LoadReport> {
        let url = format!("http://{ECHO_VIP}/");
        let mut all = vec!["--url", url.as_str()];
        all.extend_from_slice(args);
        http_peers::load(&self.node, &self.client, &all)
    }

    fn metric(&self, name: &str) -> f64 {
        self.agent.metrics().map_or(f64::NAN, |m| m.sum(name))
    }
}

/// `dataplane-agent register` for backend `name`, on the node.
fn register(mesh: &RegistryNode, name: &str, ttl: &str) -> Proc {
    let mut cmd = Command::new(binaries::agent().expect("agent binary"));
    cmd.args([
        "register",
        &format!("--etcd-endpoints={}", mesh.etcd.endpoints()),
        "--tenant=shop",
        "--service=web",
        &format!("--id={name}"),
        &format!("--address={}", backend_addr(mesh.backend(name))),
        &format!("--ttl={ttl}"),
        "--metadata=version=2",
    ])
    .args(&mesh.client_args)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut proc = mesh.node.spawn_on_node(cmd).expect("register");
    proc.wait_for_line(Duration::from_secs(10), |l| l.starts_with("registered"))
        .expect("registered");
    proc
}

fn sigterm(proc: &mut Proc) {
    let pid = libc::pid_t::try_from(proc.pid()).expect("pid");
    // SAFETY: kill(2) on a child this test spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = proc.wait_timeout(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "deregistered cleanly: {status:?}");
}

fn steady(rate: u32, seconds: u32) -> Vec<String> {
    vec![
        "--rate".into(),
        rate.to_string(),
        "--requests".into(),
        (rate * seconds).to_string(),
        "--max-duration".into(),
        format!("{}s", seconds + 5),
        "--timeout-ms".into(),
        "10000".into(),
    ]
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn registered_instances_come_and_go_with_their_leases() {
    if !require_privileges("registered_instances_come_and_go_with_their_leases") {
        return;
    }
    let mesh = RegistryNode::start("leases", &["b1", "b2"], &[]);
    let mut b1 = register(&mesh, "b1", "3s");
    let used = mesh.wait_endpoints(&["b1"], Duration::from_secs(1));
    eprintln!("registered instance in force after {used:?}");
    let mut b2 = register(&mesh, "b2", "3s");
    mesh.wait_endpoints(&["b1", "b2"], Duration::from_secs(1));
    let report = mesh
        .load(&["--requests", "40", "--concurrency", "2"])
        .expect("load");
    assert_eq!(report.ok, 40, "{report:?}");
    assert_eq!(report.backends.len(), 2, "both instances serve: {report:?}");

    // A crashed registrant: its lease expires, its instance goes.
    b2.kill().expect("SIGKILL b2's registrant");
    let expired = mesh.wait_endpoints(&["b1"], Duration::from_secs(4));
    eprintln!("crashed instance gone after {expired:?} (TTL 3 s)");
    // A graceful stop deregisters at once.
    sigterm(&mut b1);
    let gone = mesh.wait_endpoints(&[], Duration::from_secs(1));
    eprintln!("deregistered instance gone after {gone:?}");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn member_failures_under_load_fail_no_request() {
    if !require_privileges("member_failures_under_load_fail_no_request") {
        return;
    }
    let mesh = RegistryNode::start("members", &["b1", "b2", "b3"], &[]);
    mesh.put_instance("b1");
    mesh.put_instance("b2");
    mesh.wait_endpoints(&["b1", "b2"], Duration::from_secs(2));
    let at = dataplane_tests::wait::timeline();
    let args = steady(100, 32);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = std::thread::scope(|scope| {
        let running = scope.spawn(|| mesh.load(&args));
        let leader = mesh.etcd.leader(&mesh.node).expect("leader");
        let follower = (leader + 1) % 3;
        at(2);
        mesh.etcd.kill(follower).expect("kill a follower");
        at(4);
        mesh.etcd
            .restart(&mesh.node, follower)
            .expect("follower back");
        at(6);
        mesh.etcd.kill(leader).expect("kill the leader");
        at(9);
        mesh.etcd
            .restart(&mesh.node, leader)
            .expect("old leader back");
        mesh.etcd.wait_healthy(&mesh.node).expect("quorum");
        // Every member cut off from its peers in turn, for four election
        // timeouts: the one the agent's watch is on loses its leader and
        // ends the watch (it is required), which must move elsewhere.
        for member in 0..3 {
            mesh.etcd.partition(&mesh.node, member).expect("partition");
            std::thread::sleep(Duration::from_secs(4));
            mesh.etcd.heal(&mesh.node, member).expect("heal");
        }
        mesh.etcd.wait_healthy(&mesh.node).expect("quorum");
        // Changes still arrive after all that.
        mesh.put_instance("b3");
        running.join().expect("load thread").expect("load")
    });
    eprintln!("under member failures: {report:?}");
    assert!(report.sent >= 3100, "the load ran: {report:?}");
    assert_eq!(report.ok, report.sent, "no request failed: {report:?}");
    mesh.wait_endpoints(&["b1", "b2", "b3"], Duration::from_secs(3));
    assert!(
        report.backends.contains_key("b3"),
        "the instance added at the end was used: {report:?}\nagent log:\n{}",
        mesh.agent.log()
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn with_every_member_down_traffic_flows_and_the_agent_resyncs_after() {
    if !require_privileges("with_every_member_down_traffic_flows_and_the_agent_resyncs_after") {
        return;
    }
    let mesh = RegistryNode::start("alldown", &["b1", "b2", "b3"], &[]);
    mesh.put_instance("b1");
    mesh.put_instance("b2");
    mesh.wait_endpoints(&["b1", "b2"], Duration::from_secs(2));
    let healthy = || {
        eventually("registry up", Duration::from_secs(5), || {
            let up = mesh.metric("dataplane_registry_up");
            let stale = mesh.metric("dataplane_registry_stale_seconds");
            anyhow::ensure!(up == 1.0 && stale == 0.0, "up {up}, stale {stale}");
            Ok(())
        })
        .expect("registry up");
    };
    healthy();
    let at = dataplane_tests::wait::timeline();
    let args = steady(50, 42);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (report, stale) = std::thread::scope(|scope| {
        let running = scope.spawn(|| mesh.load(&args));
        at(2);
        for member in 0..3 {
            mesh.etcd.kill(member).expect("kill");
        }
        at(27);
        let stale = (
            mesh.metric("dataplane_registry_up"),
            mesh.metric("dataplane_registry_stale_seconds"),
        );
        at(32);
        for member in 0..3 {
            mesh.etcd.restart(&mesh.node, member).expect("member back");
        }
        mesh.etcd.wait_healthy(&mesh.node).expect("quorum");
        // Made after the outage: must arrive.
        mesh.put_instance("b3");
        let resync = mesh.wait_endpoints(&["b1", "b2", "b3"], Duration::from_secs(5));
        eprintln!("change after the outage in force {resync:?} after the write");
        (running.join().expect("load thread").expect("load"), stale)
    });
    eprintln!("30 s without any member: {report:?}; up, stale seconds at 25 s: {stale:?}");
    assert!(report.sent >= 2000, "the load ran: {report:?}");
    assert_eq!(report.ok, report.sent, "no request failed: {report:?}");
    assert_eq!(stale.0, 0.0, "down while every member was");
    assert!(stale.1 >= 20.0, "staleness grows: {stale:?}");
    healthy();
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_restart_while_the_registry_is_down_routes_from_the_snapshot() {
    if !require_privileges("a_restart_while_the_registry_is_down_routes_from_the_snapshot") {
        return;
    }
    let mut mesh = RegistryNode::start("snapshot", &["b1", "b2"], &[]);
    mesh.put_instance("b1");
    mesh.put_instance("b2");
    mesh.wait_endpoints(&["b1", "b2"], Duration::from_secs(2));
    let (b1, b2) = (
        backend_addr(mesh.backend("b1")).to_string(),
        backend_addr(mesh.backend("b2")).to_string(),
    );
    eventually(
        "both endpoints in the snapshot",
        Duration::from_secs(5),
        || {
            let text = std::fs::read_to_string(&mesh.snapshot)?;
            anyhow::ensure!(text.contains(&b1) && text.contains(&b2), "{text}");
            Ok(())
        },
    )
    .expect("snapshot");
    for member in 0..3 {
        mesh.etcd.kill(member).expect("kill");
    }
    mesh.agent.kill().expect("stop the agent");
    let node = &mesh.node;
    mesh.agent
        .spawn(node)
        .expect("agent restarts with no registry");
    mesh.wait_endpoints(&["b1", "b2"], Duration::from_secs(2));
    assert_eq!(mesh.metric("dataplane_registry_from_snapshot"), 1.0);
    let report = mesh.load(&["--requests", "20"]).expect("load");
    assert_eq!(report.ok, 20, "routed from the snapshot: {report:?}");

    // A torn snapshot: refused with a clear line, the agent starts empty,
    // and recovers when the registry returns.
    let text = std::fs::read(&mesh.snapshot).expect("snapshot");
    std::fs::write(&mesh.snapshot, &text[..text.len() / 2]).expect("truncate");
    mesh.agent.kill().expect("stop the agent");
    mesh.agent.spawn(node).expect("agent restarts");
    let log = mesh.agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("truncated") && l.contains("ignored")),
        "{log}"
    );
    assert!(mesh.endpoints_in_force().is_empty());
    for member in 0..3 {
        mesh.etcd.restart(&mesh.node, member).expect("member back");
    }
    mesh.wait_endpoints(&["b1", "b2"], Duration::from_secs(15));
    let report = mesh.load(&["--requests", "20"]).expect("load");
    assert_eq!(report.ok, 20, "{report:?}");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_bad_push_removing_every_instance_is_held_before_it_applies() {
    if !require_privileges("a_bad_push_removing_every_instance_is_held_before_it_applies") {
        return;
    }
    let mesh = RegistryNode::start("badpush", &["b1", "b2", "b3"], &["--registry-hold=3s"]);
    for name in ["b1", "b2", "b3"] {
        mesh.put_instance(name);
    }
    mesh.wait_endpoints(&["b1", "b2", "b3"], Duration::from_secs(2));
    let deleted = Instant::now();
    mesh.etcdctl(&["del", "--prefix", INSTANCES]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(mesh.endpoints_in_force().len(), 3, "held");
    assert_eq!(mesh.metric("dataplane_registry_held_removals_total"), 1.0);
    let report = mesh.load(&["--requests", "20"]).expect("load");
    assert_eq!(report.ok, 20, "still routed while held: {report:?}");
    mesh.wait_endpoints(&[], Duration::from_secs(4));
    let applied = deleted.elapsed();
    assert!(
        applied >= Duration::from_secs(3),
        "applied after the hold: {applied:?}"
    );
    let log = mesh.agent.log();
    assert!(log.contains("held before it applies"), "{log}");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn bad_records_are_skipped_by_name_and_other_tenants_are_not_read() {
    if !require_privileges("bad_records_are_skipped_by_name_and_other_tenants_are_not_read") {
        return;
    }
    let mesh = RegistryNode::start("badrec", &["b1"], &["--tenant=shop"]);
    mesh.put_instance("b1");
    let bad = [
        (format!("{INSTANCES}garbage"), "not json".to_string()),
        (
            format!("{INSTANCES}badaddr"),
            r#"{"address": "198.18.0.300:8080"}"#.to_string(),
        ),
        (
            "/dataplane/v1/services/shop/web/extra".to_string(),
            "{}".to_string(),
        ),
    ];
    for (key, value) in &bad {
        mesh.etcdctl(&["put", key, value]);
    }
    // Another tenant's service: not read by this node.
    mesh.etcdctl(&[
        "put",
        "/dataplane/v1/services/other/web",
        r#"{"vip": "198.19.0.11:80"}"#,
    ]);
    mesh.put_instance("b1");
    mesh.wait_endpoints(&["b1"], Duration::from_secs(2));
    // Idle watches hold: no reconnection (so no new listing) for longer
    // than the client's keep-alive period (10 s); etcd would end them with
    // "too many pings" were that shorter than its minimum (5 s).
    let listings = mesh.metric("dataplane_registry_listings_total");
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        mesh.metric("dataplane_registry_listings_total"),
        listings,
        "no reconnection while idle:\n{}",
        mesh.agent.log()
    );
    eventually("skips counted", Duration::from_secs(3), || {
        let skipped = mesh.metric("dataplane_registry_skipped_records_total");
        anyhow::ensure!(skipped == 3.0, "skipped {skipped}");
        Ok(())
    })
    .expect("three records skipped");
    let log = mesh.agent.log();
    for (key, _) in &bad {
        assert!(log.contains(key.as_str()), "{key} named in:\n{log}");
    }
    let dump = mesh.agent.get("/config_dump").expect("config dump");
    assert!(
        !dump.contains("198.19.0.11"),
        "tenant other not read: {dump}"
    );
    let report = mesh.load(&["--requests", "20"]).expect("load");
    assert_eq!(report.ok, 20, "{report:?}");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn published_mesh_services_are_readable_by_a_client_outside_the_mesh() {
    if !require_privileges("published_mesh_services_are_readable_by_a_client_outside_the_mesh") {
        return;
    }
    let mut mesh = RegistryNode::start("publish", &["b1"], &["--publish"]);
    // A service of the config file, published for applications outside
    // the mesh.
    let b1 = backend_addr(mesh.backend("b1"));
    let config = format!(
        "services:\n  - name: echo\n    vip: 198.19.0.20:80\n    protocol: http\n    endpoints: [{{address: {b1}, zone: a}}]\npods:\n  - uid: {}\n    ip: {}\n",
        mesh.client.uid, mesh.client.ip
    );
    mesh.agent.write_config(&config).expect("config");
    let (etcd, node) = (&mesh.etcd, &mesh.node);
    let read = |key: &str| -> Option<serde_json::Value> {
        let out = etcd
            .etcdctl(node, &["get", key, "--print-value-only"])
            .ok()?;
        serde_json::from_str(out.trim()).ok()
    };
    let instance_key = format!(
        "/dataplane/v1/instances/default/echo/{}",
        b1.to_string().replace(':', "-")
    );
    eventually("published", Duration::from_secs(10), || {
        let service = read("/dataplane/v1/services/default/echo").context("no service yet")?;
        anyhow::ensure!(service["vip"] == "198.19.0.20:80", "{service}");
        let instance = read(&instance_key).context("no instance yet")?;
        anyhow::ensure!(instance["address"] == b1.to_string() && instance["zone"] == "a");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", mesh.agent.log()));
    // Read back by the agent itself, the published service is no conflict.
    assert!(
        !mesh.agent.log().contains("left out"),
        "{}",
        mesh.agent.log()
    );
    // The agent gone, what it published goes with its lease (TTL 10 s).
    mesh.agent.kill().expect("stop the agent");
    eventually("unpublished", Duration::from_secs(12), || {
        anyhow::ensure!(read(&instance_key).is_none(), "still there");
        Ok(())
    })
    .expect("the lease took the keys");
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn with_etcd_auth_a_tenant_registers_only_under_its_own_prefix() {
    if !require_privileges("with_etcd_auth_a_tenant_registers_only_under_its_own_prefix") {
        return;
    }
    let roles = |node: &SimNode, etcd: &EtcdCluster| {
        let users = [
            // The node agent reads its tenant's services and instances.
            EtcdUser {
                name: "agent",
                password: "agent-secret",
                grants: &[
                    ("read", "/dataplane/v1/services/shop/"),
                    ("read", "/dataplane/v1/instances/shop/"),
                ],
            },
            // A tenant's registrants write its instances, nothing else.
            EtcdUser {
                name: "shop-registrar",
                password: "shop-secret",
                grants: &[("readwrite", "/dataplane/v1/instances/shop/")],
            },
        ];
        etcd.enable_auth(node, &users).expect("etcd auth");
    };
    let mesh = RegistryNode::start_with(
        "auth",
        &["b1"],
        &[
            "--tenant=shop",
            "--etcd-user=agent",
            "--etcd-password=agent-secret",
        ],
        roles,
    );
    let register_as = |tenant: &str| {
        let mut cmd = Command::new(binaries::agent().expect("agent binary"));
        cmd.args([
            "register",
            &format!("--etcd-endpoints={}", mesh.etcd.endpoints()),
            "--etcd-user=shop-registrar",
            &format!("--tenant={tenant}"),
            "--service=web",
            "--id=b1",
            &format!("--address={}", backend_addr(mesh.backend("b1"))),
        ])
        .env("DATAPLANE_ETCD_PASSWORD", "shop-secret")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        mesh.node.spawn_on_node(cmd).expect("register")
    };
    // Into another tenant's service: refused, and said so.
    let out = register_as("other")
        .output_timeout(Duration::from_secs(15))
        .expect("register exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("/dataplane/v1/instances/other/web/b1")
            && stderr.contains("permission denied"),
        "{stderr}"
    );
    // Into its own: registered, and the agent (reading as its own user)
    // routes to it.
    let mut own = register_as("shop");
    own.wait_for_line(Duration::from_secs(10), |l| l.starts_with("registered"))
        .expect("registered");
    mesh.wait_endpoints(&["b1"], Duration::from_secs(2));
    let report = mesh.load(&["--requests", "20"]).expect("load");
    assert_eq!(report.ok, 20, "{report:?}");
    let pid = libc::pid_t::try_from(own.pid()).expect("pid");
    // SAFETY: kill(2) on a child this test spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = own.output_timeout(Duration::from_secs(10)).expect("exits");
    assert!(
        out.status.success(),
        "deregistered: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    mesh.wait_endpoints(&[], Duration::from_secs(1));
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn the_registry_over_tls() {
    if !require_privileges("the_registry_over_tls") {
        return;
    }
    let mesh = RegistryNode::start_opts("tls", &["b1", "b2"], &[], true, |_, _| {});
    let mut b1 = register(&mesh, "b1", "5s");
    mesh.put_instance("b2");
    mesh.wait_endpoints(&["b1", "b2"], Duration::from_secs(2));
    let report = mesh.load(&["--requests", "20"]).expect("load");
    assert_eq!(report.ok, 20, "{report:?}");
    sigterm(&mut b1);
    mesh.wait_endpoints(&["b2"], Duration::from_secs(1));
    // Without the CA, the members' certificates are not trusted: said so.
    let mut cmd = Command::new(binaries::agent().expect("agent binary"));
    cmd.args([
        "register",
        &format!("--etcd-endpoints={}", mesh.etcd.endpoints()),
        "--tenant=shop",
        "--service=web",
        "--id=b1",
        &format!("--address={}", backend_addr(mesh.backend("b1"))),
    ]);
    let out = mesh
        .node
        .run_on_node(cmd, Duration::from_secs(15))
        .expect("register exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid peer certificate"),
        "the members' certificates are not trusted: {stderr}"
    );
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn a_large_registry_is_read_in_pages() {
    if !require_privileges("a_large_registry_is_read_in_pages") {
        return;
    }
    // 1,050 instances of one service with 5 KiB of metadata each, written
    // before the agent starts: over 5 MiB, more than one gRPC answer may
    // carry (4 MiB), so only a paged listing (500 keys a page) reads it.
    let bulk = |node: &SimNode, etcd: &EtcdCluster| {
        let mut pairs = vec![(
            "/dataplane/v1/services/shop/bulk".to_string(),
            r#"{"vip": "198.19.0.12:80"}"#.to_string(),
        )];
        pairs.extend((0..1050).map(|i| {
            (
                format!("/dataplane/v1/instances/shop/bulk/i{i:04}"),
                format!(
                    r#"{{"address": "10.200.{}.{}:8080", "metadata": {{"blob": "{}"}}}}"#,
                    i / 200,
                    i % 200 + 1,
                    "x".repeat(5 * 1024)
                ),
            )
        }));
        etcd.put_many(node, &pairs).expect("bulk write");
    };
    let mesh = RegistryNode::start_with("pages", &["b1"], &[], bulk);
    eventually("every instance", Duration::from_secs(10), || {
        let dump: serde_json::Value = serde_json::from_str(&mesh.agent.get("/config_dump")?)?;
        let bulk = dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "bulk")
            .map_or(0, |s| s["endpoints"].as_array().map_or(0, Vec::len));
        anyhow::ensure!(bulk == 1050, "{bulk} endpoints");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", mesh.agent.log()));
}
