//! A Kubernetes node simulated with Linux namespaces and cgroup v2.
//!
//! Layout (all names embed the node id, see [`SimNode::id`]):
//!
//! ```text
//! netns dp<id>-node      br0 198.18.0.1/24, lo; ip_forward=1;
//!                        `unreachable 198.19.0.0/16` (service VIPs), no default route
//!   vp<i> ──veth── netns dp<id>-<pod>   eth0 198.18.0.<10+i>/24, default via 198.18.0.1
//! cgroup <cgroup2>/dataplane-sim-<id>/
//!          node/                        agent, proxy (spawn_on_node)
//!          kubepods/pod<uid>/app/       a pod's processes (spawn_in_pod)
//! ```
//!
//! Service VIPs are routed to `unreachable` so that a connect the eBPF
//! program failed to capture fails at once (EHOSTUNREACH) instead of
//! timing out, and nothing can leave the machine: the node has no route
//! out. Dropping a [`SimNode`] kills its processes and removes every
//! namespace and cgroup, also when the test panicked.

mod cgroup;
mod ipcmd;
mod names;
mod privileges;
mod spawn;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, PoisonError, Weak};
use std::time::Duration;

use anyhow::{Context, bail, ensure};

pub use self::cgroup::{cgroup2_mount, procs as cgroup_procs};
pub use self::ipcmd::netns_list;
pub use self::names::{MAX_HINT_LEN, MAX_POD_NAME_LEN};
pub use self::privileges::require_privileges;
pub use crate::proc::Proc;
pub use crate::wait::eventually;

/// A fresh, unique pod UID (UUID-shaped), for [`SimNode::add_pod_as`].
pub fn new_pod_uid() -> String {
    names::pod_uid()
}

use crate::proc::{REAP_TIMEOUT, kill_and_reap, lock};

/// The node's address on its bridge; pods use it as their gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The service-VIP range (network address and prefix length). It is not
/// routed anywhere: only eBPF capture makes connects to it succeed.
pub const SERVICE_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
/// Node-to-node links (see [`link_nodes`]) use 198.18.`LINK_SUBNET`.0/24.
const LINK_SUBNET: u8 = 254;
/// Pods get 198.18.0.(10 + index), so at most this many per node.
pub const MAX_PODS: usize = 240;

/// How long teardown waits for killed processes to leave the cgroups.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A simulated pod: a network namespace plus a kubelet-style cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The name given to [`SimNode::add_pod`].
    pub name: String,
    /// A UUID-shaped, unique pod uid (as Kubernetes assigns).
    pub uid: String,
    /// The pod's address on eth0.
    pub ip: Ipv4Addr,
    /// The pod's network namespace name (for `ip netns exec`).
    pub netns: String,
    /// The pod-level cgroup `<kubepods>/pod<uid>` (cgroupfs driver naming).
    pub cgroup: PathBuf,
}

impl Pod {
    /// `<cgroup>/app`: where the pod's processes run, one level below the
    /// pod cgroup like a container's, so that code matching pods by cgroup
    /// must handle nesting.
    pub fn container_cgroup(&self) -> PathBuf {
        self.cgroup.join("app")
    }
}

/// A simulated node; dropping it tears everything down (see the module
/// docs).
#[derive(Debug)]
pub struct SimNode {
    id: String,
    /// Third octet of the node's 198.18.x.0/24 (0 for a lone node).
    subnet: u8,
    node_ns: String,
    cgroup_root: PathBuf,
    /// Set once `cgroup_root` was created by us (so teardown never touches
    /// a directory it does not own).
    owns_cgroup: bool,
    /// Namespaces we created, in creation order.
    netns: Vec<String>,
    pods: Vec<Pod>,
    /// Children spawned through this node, reaped at teardown.
    procs: Mutex<Vec<Weak<Mutex<Child>>>>,
}

/// Joins two nodes as if by the cluster network: a veth between their
/// network namespaces, and routes to each other's pod subnet. Both must
/// have been built with different subnets ([`SimNode::new_in_subnet`]).
pub fn link_nodes(a: &SimNode, b: &SimNode) -> anyhow::Result<()> {
    ensure!(
        a.subnet != b.subnet,
        "nodes {} and {} share a subnet",
        a.id,
        b.id
    );
    let addr = |n: &SimNode| Ipv4Addr::new(198, 18, LINK_SUBNET, n.subnet + 1);
    let (a_if, b_if) = (format!("xn{}", b.subnet), format!("xn{}", a.subnet));
    ip_in(
        &a.node_ns,
        &[
            "link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", &b.node_ns,
        ],
    )?;
    for (node, ifname, peer) in [(a, &a_if, b), (b, &b_if, a)] {
        let cidr = format!("{}/24", addr(node));
        let peer_pods = format!("198.18.{}.0/24", peer.subnet);
        let via = addr(peer).to_string();
        for args in [
            &["addr", "add", cidr.as_str(), "dev", ifname.as_str()][..],
            &["link", "set", ifname.as_str(), "up"],
            &["route", "add", peer_pods.as_str(), "via", via.as_str()],
        ] {
            ip_in(&node.node_ns, args)?;
        }
    }
    Ok(())
}

impl SimNode {
    /// Builds a node. `hint` (1..=8 of a-z0-9) makes names readable; the id
    /// adds the pid and a counter, so names are unique across threads and
    /// concurrently running test processes.
    pub fn new(hint: &str) -> anyhow::Result<SimNode> {
        Self::new_in_subnet(hint, 0)
    }

    /// Like [`SimNode::new`], for a node whose pods live in
    /// 198.18.`subnet`.0/24 (and its bridge at .1), so that several nodes
    /// can be joined with [`link_nodes`].
    pub fn new_in_subnet(hint: &str, subnet: u8) -> anyhow::Result<SimNode> {
        ensure!(subnet < LINK_SUBNET, "subnet {subnet} is reserved");
        let id = names::node_id(hint)?;
        let cgroup_root = cgroup2_mount()?.join(format!("dataplane-sim-{id}"));
        let mut node = SimNode {
            subnet,
            node_ns: format!("dp{id}-node"),
            id,
            cgroup_root,
            owns_cgroup: false,
            netns: Vec::new(),
            pods: Vec::new(),
            procs: Mutex::new(Vec::new()),
        };
        // On error `node` is dropped here and tears down what was built.
        node.build()
            .with_context(|| format!("building simulated node {}", node.id))?;
        Ok(node)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        cgroup::create(&self.cgroup_root)?;
        self.owns_cgroup = true;
        cgroup::create(&self.pods_cgroup())?;
        cgroup::create(&self.node_cgroup())?;
        let ns = self.node_ns.clone();
        self.add_netns(&ns)?;
        let br_addr = format!("{}/24", self.node_ip());
        let vips = format!("{}/{}", SERVICE_NET.0, SERVICE_NET.1);
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "br0", "type", "bridge"],
            &["addr", "add", &br_addr, "dev", "br0"],
            &["link", "set", "br0", "up"],
            &["route", "add", "unreachable", &vips],
        ] {
            ip_in(&ns, args)?;
        }
        // icmp_ratelimit=0: every uncaptured VIP connect gets its ICMP
        // error at once, not only the first few per second.
        ipcmd::netns_sysctl(&ns, &["net.ipv4.ip_forward=1", "net.ipv4.icmp_ratelimit=0"])
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ipcmd::ip(&["netns", "add", name])?;
        self.netns.push(name.to_owned());
        Ok(())
    }

    /// The unique id embedded in every name of this node.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node network namespace (`dp<id>-node`).
    pub fn netns(&self) -> &str {
        &self.node_ns
    }

    /// The node's address on br0 ([`NODE_IP`] for subnet 0).
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }

    /// `<cgroup2 mount>/dataplane-sim-<id>`.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// `<cgroup_root>/kubepods`: the agent attaches `connect4` here.
    pub fn pods_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("kubepods")
    }

    /// `<cgroup_root>/node`: leaf for node-level processes (agent, proxy),
    /// outside kubepods so that they are never captured themselves.
    pub fn node_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("node")
    }

    /// The pods added so far, in order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Adds a pod: netns `dp<id>-<name>`, a veth to br0, address
    /// 198.18.0.(10 + index), and cgroups `pod<uid>/app`.
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<Pod> {
        self.add_pod_as(name, &new_pod_uid(), None)
    }

    /// Like [`SimNode::add_pod`], with a UID chosen beforehand (so that a
    /// config can enroll the pod before it exists; see [`new_pod_uid`]) and,
    /// with `qos`, placed below that QoS-class cgroup as kubelet's cgroupfs
    /// driver places burstable and best-effort pods:
    /// `kubepods/<qos>/pod<uid>/app` (the class directory is created when
    /// missing).
    pub fn add_pod_as(&mut self, name: &str, uid: &str, qos: Option<&str>) -> anyhow::Result<Pod> {
        self.add_pod_inner(name, uid, qos, true)
    }

    /// A pod whose network a CNI chain makes (see [`crate::cni`]): only
    /// its netns and kubelet-style cgroups, as the kubelet and the runtime
    /// have them when they call the CNI plugins. Its address is
    /// 0.0.0.0 until the chain gives it one ([`SimNode::set_pod_ip`]).
    pub fn add_pod_sandbox(&mut self, name: &str, uid: &str) -> anyhow::Result<Pod> {
        self.add_pod_inner(name, uid, None, false)
    }

    /// Records the address a CNI chain gave `pod`.
    pub fn set_pod_ip(&mut self, pod: &mut Pod, ip: Ipv4Addr) {
        pod.ip = ip;
        if let Some(p) = self.pods.iter_mut().find(|p| p.uid == pod.uid) {
            p.ip = ip;
        }
    }

    /// The subnet CNI-made pods of this node get (see [`crate::cni`]).
    pub fn cni_subnet(&self) -> String {
        format!("198.18.{}.0/24", 200 + self.subnet % 50)
    }

    fn add_pod_inner(
        &mut self,
        name: &str,
        uid: &str,
        qos: Option<&str>,
        wired: bool,
    ) -> anyhow::Result<Pod> {
        names::check_pod_name(name)?;
        ensure!(
            self.pods.iter().all(|p| p.name != name && p.uid != uid),
            "pod {name:?} or uid {uid} already exists on node {}",
            self.id
        );
        let parent = match qos {
            Some(class) => {
                names::check_pod_name(class)?;
                self.pods_cgroup().join(class)
            }
            None => self.pods_cgroup(),
        };
        let index = self.pods.len();
        ensure!(
            index < MAX_PODS,
            "node {} is full ({MAX_PODS} pods)",
            self.id
        );
        let pod = Pod {
            name: name.to_owned(),
            ip: if wired {
                Ipv4Addr::new(198, 18, self.subnet, 10 + index as u8)
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            netns: format!("dp{}-{name}", self.id),
            cgroup: parent.join(format!("pod{uid}")),
            uid: uid.to_owned(),
        };
        self.add_netns(&pod.netns)
            .and_then(|()| match wired {
                true => self.wire_pod(&pod, index),
                false => Ok(()),
            })
            .and_then(|()| match parent.exists() {
                true => Ok(()),
                false => cgroup::create(&parent),
            })
            .and_then(|()| cgroup::create(&pod.cgroup))
            .and_then(|()| cgroup::create(&pod.container_cgroup()))
            .with_context(|| format!("adding pod {name} to node {}", self.id))?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Connects a pod's netns to br0 and configures its address and route.
    fn wire_pod(&self, pod: &Pod, index: usize) -> anyhow::Result<()> {
        let host_if = format!("vp{index}");
        let node = self.node_ns.as_str();
        let addr = format!("{}/24", pod.ip);
        let gateway = self.node_ip().to_string();
        ip_in(
            node,
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
                &pod.netns,
            ],
        )?;
        ip_in(node, &["link", "set", &host_if, "master", "br0"])?;
        ip_in(node, &["link", "set", &host_if, "up"])?;
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", &addr, "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "via", &gateway],
        ] {
            ip_in(&pod.netns, args)?;
        }
        Ok(())
    }

    /// Starts `cmd` in the node netns and the node cgroup.
    pub fn spawn_on_node(&self, cmd: Command) -> anyhow::Result<Proc> {
        let proc = spawn::spawn_in(&self.node_ns, &self.node_cgroup(), cmd)?;
        self.track(&proc);
        Ok(proc)
    }

    /// Starts `cmd` in the pod's netns and its container cgroup.
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> anyhow::Result<Proc> {
        self.check_owns(pod)?;
        let proc = spawn::spawn_in(&pod.netns, &pod.container_cgroup(), cmd)?;
        self.track(&proc);
        Ok(proc)
    }

    /// Runs `cmd` in the pod and waits for it (stdin closed, stdout and
    /// stderr captured) for at most `timeout`; on timeout it is killed and
    /// an error returned. The exit status is not judged.
    pub fn run_in_pod(
        &self,
        pod: &Pod,
        mut cmd: Command,
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn_in_pod(pod, cmd)?.output_timeout(timeout)
    }

    /// As [`SimNode::run_in_pod`], on the node.
    pub fn run_on_node(&self, mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn_on_node(cmd)?.output_timeout(timeout)
    }

    fn check_owns(&self, pod: &Pod) -> anyhow::Result<()> {
        if !self
            .pods
            .iter()
            .any(|p| p.netns == pod.netns && p.uid == pod.uid)
        {
            bail!(
                "pod {} ({}) does not belong to node {}",
                pod.name,
                pod.uid,
                self.id
            );
        }
        Ok(())
    }

    fn track(&self, proc: &Proc) {
        let mut procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        procs.retain(|weak| weak.strong_count() > 0);
        procs.push(proc.handle());
    }

    /// Tears the node down now and reports every failure (drop does the
    /// same but can only log). Useful for tests that assert a clean exit.
    pub fn close(mut self) -> anyhow::Result<()> {
        let errors = self.teardown();
        match errors.is_empty() {
            true => Ok(()),
            false => bail!("tearing down node {}: {}", self.id, join_errors(&errors)),
        }
    }

    /// Kills processes, reaps our children, removes cgroups (deepest
    /// first) and namespaces (pods, then node). Best effort, idempotent:
    /// every step runs even if an earlier one failed.
    fn teardown(&mut self) -> Vec<anyhow::Error> {
        let mut errors = Vec::new();
        if self.owns_cgroup
            && let Err(e) = cgroup::kill_tree(&self.cgroup_root, KILL_TIMEOUT)
        {
            errors.push(e.context("killing processes"));
        }
        errors.extend(self.reap_children());
        if self.owns_cgroup {
            match cgroup::remove_tree(&self.cgroup_root) {
                Ok(()) => self.owns_cgroup = false,
                Err(e) => errors.push(e),
            }
        }
        while let Some(ns) = self.netns.pop() {
            if let Err(e) = ipcmd::ip(&["netns", "del", &ns]) {
                errors.push(e);
            }
        }
        errors
    }

    fn reap_children(&mut self) -> Vec<anyhow::Error> {
        let procs = std::mem::take(self.procs.get_mut().unwrap_or_else(PoisonError::into_inner));
        procs
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|child| {
                let mut child = lock(&child);
                let pid = child.id();
                kill_and_reap(&mut child, REAP_TIMEOUT)
                    .err()
                    .map(|e| e.context(format!("reaping pid {pid}")))
            })
            .collect()
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        let errors = self.teardown();
        if !errors.is_empty() {
            eprintln!(
                "dataplane-tests: teardown of node {} incomplete: {}",
                self.id,
                join_errors(&errors)
            );
        }
    }
}

/// Runs `ip -n <netns> <args>`.
fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ipcmd::ip(&all).map(drop)
}

fn join_errors(errors: &[anyhow::Error]) -> String {
    errors
        .iter()
        .map(|e| format!("{e:#}"))
        .collect::<Vec<_>>()
        .join("; ")
}
