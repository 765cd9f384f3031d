//! The standard mesh scenario on one simulated node: an enrolled client
//! pod, backend pods serving `echo` behind a VIP, and the agent.
//! Shared by the end-to-end tests, the demo and the benchmark.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Context as _;

use crate::agent::Agent;
use crate::http_peers;
use crate::peers::{self, BACKEND_PORT};
use crate::{Pod, Proc, SimNode};

/// The `echo` service's virtual IP and port (inside the node's VIP range).
pub const ECHO_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);

/// A service for [`mesh_config`].
pub struct ServiceSpec<'a> {
    pub name: &'a str,
    pub vip: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
    /// `tcp`, `http` or `auto`.
    pub protocol: &'a str,
    /// YAML of the `trafficPolicy` mapping, as one flow mapping
    /// (e.g. `{retries: {attempts: 2}}`); empty for the defaults.
    pub policy: &'a str,
}

impl<'a> ServiceSpec<'a> {
    /// An opaque TCP service (the `meshtool` peers speak first from the
    /// server side, so protocol detection would only add its timeout).
    pub fn tcp(name: &'a str, vip: SocketAddrV4, endpoints: Vec<SocketAddrV4>) -> Self {
        Self {
            name,
            vip,
            endpoints,
            protocol: "tcp",
            policy: "",
        }
    }
}

/// Renders a mesh config: `services`, and `enrolled` pods by UID.
pub fn mesh_config(services: &[ServiceSpec<'_>], enrolled: &[&Pod]) -> String {
    let mut yaml = String::from("services:\n");
    for svc in services {
        let policy = if svc.policy.is_empty() {
            "{}"
        } else {
            svc.policy
        };
        let _ = writeln!(
            yaml,
            "  - name: {}\n    vip: {}\n    protocol: {}\n    trafficPolicy: {policy}",
            svc.name, svc.vip, svc.protocol
        );
        yaml.push_str("    endpoints:");
        if svc.endpoints.is_empty() {
            yaml.push_str(" []");
        }
        yaml.push('\n');
        for ep in &svc.endpoints {
            let _ = writeln!(yaml, "      - address: {ep}");
        }
    }
    yaml.push_str("pods:\n");
    for pod in enrolled {
        let _ = writeln!(yaml, "  - uid: {}\n    name: {}", pod.uid, pod.name);
    }
    yaml
}

/// A node with `client` enrolled and `echo` served by the backends.
/// Fields drop in order: the agent uninstalls before the node goes away.
pub struct MeshNode {
    pub agent: Agent,
    pub backends: Vec<(Pod, Option<Proc>)>,
    pub client: Pod,
    pub node: SimNode,
}

impl MeshNode {
    /// Builds the node with `backends` echo backends named `backend-<i>`.
    pub fn start(hint: &str, backends: usize) -> anyhow::Result<MeshNode> {
        Self::start_with_policy(hint, backends, "")
    }

    /// Like [`MeshNode::start`], with `policy` as the service's
    /// `trafficPolicy` (a YAML flow mapping).
    pub fn start_with_policy(
        hint: &str,
        backends: usize,
        policy: &str,
    ) -> anyhow::Result<MeshNode> {
        Self::start_with_agent(hint, backends, policy, &[])
    }

    /// Like [`MeshNode::start_with_policy`], with extra agent arguments.
    pub fn start_with_agent(
        hint: &str,
        backends: usize,
        policy: &str,
        agent_args: &[&str],
    ) -> anyhow::Result<MeshNode> {
        let mut node = SimNode::new(hint)?;
        let client = node.add_pod("client")?;
        let mut servers = Vec::new();
        for i in 1..=backends {
            let name = format!("backend-{i}");
            let pod = node.add_pod(&name)?;
            let proc = peers::serve(&node, &pod, &name)?;
            servers.push((pod, Some(proc)));
        }
        let endpoints = servers.iter().map(|(pod, _)| backend_addr(pod)).collect();
        let mut echo = ServiceSpec::tcp("echo", ECHO_VIP, endpoints);
        echo.policy = policy;
        let config = mesh_config(&[echo], &[&client]);
        let agent = Agent::start_with(&node, &config, agent_args).context("starting the agent")?;
        Ok(MeshNode {
            agent,
            backends: servers,
            client,
            node,
        })
    }

    /// Kills the backend process of `backends[index]` (its pod stays).
    pub fn kill_backend(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(mut proc) = self.backends[index].1.take() {
            proc.kill()?;
        }
        Ok(())
    }
}

/// A node with `client` enrolled and one HTTP service `web` at
/// [`ECHO_VIP`] served by `httptool` backends.
pub struct HttpMesh {
    pub agent: Agent,
    pub backends: Vec<(Pod, Proc)>,
    pub client: Pod,
    pub node: SimNode,
}

/// One backend of an [`HttpMesh`]: its name and zone (empty: none).
pub struct BackendSpec<'a> {
    pub name: &'a str,
    pub zone: &'a str,
}

impl HttpMesh {
    /// Builds the node; `policy` is the service's `trafficPolicy` (a YAML
    /// flow mapping), `agent_args` extra agent flags (e.g. `--zone=a`).
    pub fn start(
        hint: &str,
        backends: &[BackendSpec<'_>],
        policy: &str,
        agent_args: &[&str],
    ) -> anyhow::Result<HttpMesh> {
        Self::start_as(hint, backends, "http", policy, agent_args)
    }

    /// [`HttpMesh::start`] with the service's `protocol` (`http`, `auto`).
    pub fn start_as(
        hint: &str,
        backends: &[BackendSpec<'_>],
        protocol: &str,
        policy: &str,
        agent_args: &[&str],
    ) -> anyhow::Result<HttpMesh> {
        let mut node = SimNode::new(hint)?;
        let client = node.add_pod("client")?;
        let mut servers = Vec::new();
        for spec in backends {
            let pod = node.add_pod(spec.name)?;
            let proc = http_peers::serve(&node, &pod, spec.name)?;
            servers.push((pod, proc));
        }
        let config = service_config(&servers, backends, protocol, policy, &client);
        let agent = Agent::start_with(&node, &config, agent_args).context("starting the agent")?;
        Ok(HttpMesh {
            agent,
            backends: servers,
            client,
            node,
        })
    }

    /// SIGKILLs backend `index`'s server, as a crash would (its pod stays).
    pub fn kill_backend(&mut self, index: usize) -> anyhow::Result<()> {
        self.backends[index].1.kill()?;
        Ok(())
    }

    /// Starts backend `index`'s server again (after `kill_backend`).
    pub fn revive_backend(&mut self, index: usize) -> anyhow::Result<()> {
        let (pod, proc) = &mut self.backends[index];
        *proc = http_peers::serve(&self.node, pod, &pod.name)?;
        Ok(())
    }

    /// The backend pod named `name`.
    pub fn backend(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .map(|(pod, _)| pod)
            .find(|pod| pod.name == name)
            .unwrap_or(&self.client)
    }

    /// `httptool load` from the client against the service, with `args`
    /// after `--url`.
    pub fn load(&self, args: &[&str]) -> anyhow::Result<http_peers::LoadReport> {
        let url = format!("http://{ECHO_VIP}/");
        let mut all = vec!["--url", url.as_str()];
        all.extend_from_slice(args);
        http_peers::load(&self.node, &self.client, &all)
    }
}

/// The config of an [`HttpMesh`]: service `web` (HTTP) with endpoints and
/// zones, the client pod enrolled with its address.
pub fn http_config(
    servers: &[(Pod, Proc)],
    specs: &[BackendSpec<'_>],
    policy: &str,
    client: &Pod,
) -> String {
    service_config(servers, specs, "http", policy, client)
}

fn service_config(
    servers: &[(Pod, Proc)],
    specs: &[BackendSpec<'_>],
    protocol: &str,
    policy: &str,
    client: &Pod,
) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: {ECHO_VIP}\n    protocol: {protocol}\n    trafficPolicy: {}\n    endpoints:\n",
        if policy.is_empty() { "{}" } else { policy }
    );
    for ((pod, _), spec) in servers.iter().zip(specs) {
        let _ = writeln!(yaml, "      - address: {}", backend_addr(pod));
        if !spec.zone.is_empty() {
            let _ = writeln!(yaml, "        region: r1\n        zone: {}", spec.zone);
        }
    }
    let _ = write!(
        yaml,
        "pods:\n  - uid: {}\n    name: client\n    ip: {}\n",
        client.uid, client.ip
    );
    yaml
}

/// Where a backend pod serves.
pub fn backend_addr(pod: &Pod) -> SocketAddrV4 {
    SocketAddrV4::new(pod.ip, BACKEND_PORT)
}
