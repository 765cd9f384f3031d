//! The benchmark's topologies on a simulated node: a client pod and a
//! server pod (an echo server for TCP, an HTTP server), connected
//! directly, through per-pod sidecars (ours or HAProxy), or through the
//! node proxy.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::agent::Agent;
use crate::bench_peers;
use crate::http_peers;
use crate::sidecar::Sidecar;
use crate::{Pod, Proc, SimNode};

/// Echo server port (tcp-rr, bulk) and HTTP server port (http-rr).
pub const ECHO_PORT: u16 = 9000;
pub const HTTP_PORT: u16 = 8080;
pub const TCP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), ECHO_PORT);
pub const HTTP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 11), 80);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Node,
    /// The node proxy with the kernel fast path (`--fast-path on`).
    NodeFast,
    Sidecar,
    Haproxy,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Node,
        Mode::NodeFast,
        Mode::Sidecar,
        Mode::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Node => "node",
            Mode::NodeFast => "node-fast",
            Mode::Sidecar => "sidecar",
            Mode::Haproxy => "haproxy",
        }
    }
}

/// A built topology; dropping it tears everything down (proxies and
/// servers before their nodes).
pub struct Topology {
    pub mode: Mode,
    /// Client and server on two nodes joined by a link.
    pub spread: bool,
    proxies: Proxies,
    _servers: Vec<Proc>,
    pub client: Pod,
    pub server: Pod,
    /// The client's node (and the server's, unless `spread`).
    pub node: SimNode,
    /// Kept (not read) so the second node lives as long as the topology.
    _server_node: Option<SimNode>,
}

/// The proxy processes of a topology.
enum Proxies {
    None,
    Node(Agent),
    Sidecars(Vec<Sidecar>),
    Haproxy(Vec<Proc>),
}

impl Topology {
    /// `spread`: the server on a second node, reached over the link
    /// between the nodes (in node mode only the client's node has a node
    /// proxy; sidecar modes have one on each side).
    pub fn build(mode: Mode, spread: bool) -> anyhow::Result<Topology> {
        let short = match mode {
            Mode::NodeFast => "nfa",
            other => &other.name()[..3],
        };
        let hint = format!("b{short}{}", if spread { "2" } else { "" });
        let mut node = SimNode::new(&hint)?;
        let mut server_node = if spread {
            let other = SimNode::new_in_subnet(&format!("{hint}s"), 1)?;
            crate::simnode::link_nodes(&node, &other)?;
            Some(other)
        } else {
            None
        };
        let client = node.add_pod("client")?;
        let snode = server_node.as_mut().unwrap_or(&mut node);
        let server = snode.add_pod("server")?;
        let snode: &SimNode = server_node.as_ref().unwrap_or(&node);
        let servers = vec![
            bench_peers::echo_serve(snode, &server, ECHO_PORT)?,
            http_peers::serve(snode, &server, "server")?,
        ];
        let config = mesh_config(&server, &[&client], 0);
        let ports = [ECHO_PORT, HTTP_PORT];
        let proxies = match mode {
            Mode::Direct => Proxies::None,
            Mode::Node => Proxies::Node(Agent::start_as_deployed(&node, &config, &[])?),
            Mode::NodeFast => Proxies::Node(Agent::start_as_deployed(
                &node,
                &config,
                &["--fast-path=on"],
            )?),
            Mode::Sidecar => Proxies::Sidecars(vec![
                Sidecar::start(&node, &client, &config, &ports)?,
                Sidecar::start(snode, &server, &config, &ports)?,
            ]),
            Mode::Haproxy => Proxies::Haproxy(vec![
                haproxy_sidecar(&node, &client, &server, 0)?,
                haproxy_sidecar(snode, &server, &server, 0)?,
            ]),
        };
        Ok(Topology {
            mode,
            spread,
            proxies,
            _servers: servers,
            client,
            server,
            node,
            _server_node: server_node,
        })
    }

    /// Where the client sends TCP work: the server itself, or the VIP.
    pub fn tcp_target(&self) -> SocketAddrV4 {
        match self.mode {
            Mode::Direct => SocketAddrV4::new(self.server.ip, ECHO_PORT),
            _ => TCP_VIP,
        }
    }

    pub fn http_url(&self) -> String {
        match self.mode {
            Mode::Direct => format!("http://{}:{HTTP_PORT}/", self.server.ip),
            _ => format!("http://{HTTP_VIP}/"),
        }
    }

    /// Every proxy process (for CPU accounting and pinning).
    pub fn proxy_pids(&self) -> Vec<u32> {
        match &self.proxies {
            Proxies::None => Vec::new(),
            Proxies::Node(agent) => agent.pid().into_iter().collect(),
            Proxies::Sidecars(s) => s.iter().filter_map(Sidecar::pid).collect(),
            Proxies::Haproxy(p) => p.iter().map(Proc::pid).collect(),
        }
    }

    /// Proxies and servers: everything but the client.
    pub fn service_pids(&self) -> Vec<u32> {
        let mut pids = self.proxy_pids();
        pids.extend(self._servers.iter().map(Proc::pid));
        pids
    }
}

/// The mesh config: the two services on `server`, `extra` more services
/// (for memory tests), and the `enrolled` pods.
pub fn mesh_config(server: &Pod, enrolled: &[&Pod], extra: u32) -> String {
    let mut yaml = format!(
        "services:\n  - name: echo\n    vip: {TCP_VIP}\n    protocol: tcp\n    endpoints: [{{address: {}:{ECHO_PORT}}}]\n  \
         - name: web\n    vip: {HTTP_VIP}\n    protocol: http\n    endpoints: [{{address: {}:{HTTP_PORT}}}]\n",
        server.ip, server.ip
    );
    for i in 0..extra {
        let _ = writeln!(
            yaml,
            "  - name: svc-{i}\n    vip: 198.19.{}.{}:80\n    protocol: http\n    endpoints: [{{address: {}:{HTTP_PORT}}}]",
            1 + i / 250,
            1 + i % 250,
            server.ip
        );
    }
    yaml.push_str("pods:\n");
    for pod in enrolled {
        let _ = writeln!(
            yaml,
            "  - {{uid: {}, name: {}, ip: {}}}",
            pod.uid, pod.name, pod.ip
        );
    }
    yaml
}

/// HAProxy as `pod`'s sidecar, with settings equivalent to ours (round
/// robin, 2 retries with redispatch, 1 s connect timeout): outbound
/// frontends for the two services (TCP and HTTP mode), inbound frontends
/// to the local servers, and nftables rules sending traffic to them.
///
/// `extra`: more HTTP services, as [`mesh_config`]'s, each with a
/// frontend, a backend and a redirect rule of its own (HAProxy does not
/// read the original destination), so memory is compared at equal
/// config.
pub fn haproxy_sidecar(
    node: &SimNode,
    pod: &Pod,
    server: &Pod,
    extra: u32,
) -> anyhow::Result<Proc> {
    let dir = std::env::temp_dir().join(format!("dataplane-{}-{}", node.id(), pod.name));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(server, extra))?;
    let rules = dir.join("rules.nft");
    std::fs::write(&rules, haproxy_rules(extra))?;
    let mut nft = Command::new("nft");
    nft.arg("-f").arg(&rules);
    let out = node.run_in_pod(pod, nft, Duration::from_secs(5))?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = node.spawn_in_pod(pod, cmd).context("starting haproxy")?;
    // Ready when the outbound port accepts connections.
    crate::eventually("haproxy listening", Duration::from_secs(5), || {
        let mut check = Command::new("bash");
        check.args(["-c", "exec 3<>/dev/tcp/127.0.0.1/15001"]);
        let out = node.run_in_pod(pod, check, Duration::from_secs(2))?;
        anyhow::ensure!(out.status.success(), "not yet");
        Ok(())
    })?;
    Ok(proc)
}

/// The VIP of [`mesh_config`]'s extra service `i`, and the port its
/// HAProxy frontend listens on.
fn extra_service(i: u32) -> (Ipv4Addr, u16) {
    let vip = Ipv4Addr::new(198, 19, (1 + i / 250) as u8, (1 + i % 250) as u8);
    (vip, 16000 + i as u16)
}

fn haproxy_config(server: &Pod, extra: u32) -> String {
    let mut config = format!(
        "global\n  maxconn 4096\n\
         defaults\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  retries 2\n  option redispatch\n\
         frontend out_tcp\n  mode tcp\n  bind 0.0.0.0:15001\n  default_backend echo\n\
         backend echo\n  mode tcp\n  balance roundrobin\n  server s1 {ip}:{ECHO_PORT}\n\
         frontend out_http\n  mode http\n  bind 0.0.0.0:15002\n  default_backend web\n\
         backend web\n  mode http\n  balance roundrobin\n  http-reuse always\n  server s1 {ip}:{HTTP_PORT}\n\
         frontend in_tcp\n  mode tcp\n  bind 0.0.0.0:15006\n  default_backend local_echo\n\
         backend local_echo\n  mode tcp\n  server app 127.0.0.1:{ECHO_PORT}\n\
         frontend in_http\n  mode http\n  bind 0.0.0.0:15007\n  default_backend local_web\n\
         backend local_web\n  mode http\n  http-reuse always\n  server app 127.0.0.1:{HTTP_PORT}\n",
        ip = server.ip
    );
    for i in 0..extra {
        let (_, port) = extra_service(i);
        let _ = write!(
            config,
            "frontend out_svc{i}\n  mode http\n  bind 0.0.0.0:{port}\n  default_backend svc{i}\n\
             backend svc{i}\n  mode http\n  balance roundrobin\n  http-reuse always\n  server s1 {ip}:{HTTP_PORT}\n",
            ip = server.ip
        );
    }
    config
}

/// Outbound VIPs to HAProxy's frontends (one port per service, since
/// HAProxy does not read the original destination), inbound ports to the
/// inbound frontends.
fn haproxy_rules(extra: u32) -> String {
    let extra_rules: String = (0..extra)
        .map(|i| {
            let (vip, port) = extra_service(i);
            format!("    ip daddr {vip} tcp dport 80 redirect to :{port}\n")
        })
        .collect();
    format!(
        "table ip haproxy_sidecar {{\n  chain outbound {{\n    type nat hook output priority -100; policy accept;\n    \
         ip daddr {} tcp dport {ECHO_PORT} redirect to :15001\n    ip daddr {} tcp dport 80 redirect to :15002\n{extra_rules}  }}\n  \
         chain inbound {{\n    type nat hook prerouting priority -100; policy accept;\n    \
         tcp dport {ECHO_PORT} redirect to :15006\n    tcp dport {HTTP_PORT} redirect to :15007\n  }}\n}}\n",
        TCP_VIP.ip(),
        HTTP_VIP.ip()
    )
}
