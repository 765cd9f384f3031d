//! Runs a CNI network configuration list the way a container runtime does
//! (libcni's order, environment and stdin): each plugin of the list in
//! turn for `ADD`, with the previous plugin's result as `prevResult`; in
//! reverse for `DEL`; `CHECK` with the cached result. The plugins are the
//! real ones: Debian's `containernetworking-plugins` (`bridge`,
//! `host-local`) and ours, `dataplane-cni`. They run in the simulated
//! node's namespace, as a runtime runs them in the host's.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::simnode::{Pod, SimNode};

/// Where Debian installs the reference plugins.
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// The longest a plugin may run: `dataplane-cni` waits up to its own
/// timeout (5 s by default) for the agent.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A plugin's failure: the CNI error object it printed.
#[derive(Debug, Clone)]
pub struct CniFailure {
    pub plugin: String,
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed with code {}: {}: {}",
            self.plugin, self.code, self.msg, self.details
        )
    }
}

impl std::error::Error for CniFailure {}

/// A conflist and where its plugins are.
pub struct CniChain {
    conflist: Value,
    cni_path: String,
    node_netns: String,
}

/// The node's usual chain: `bridge` (bridge `cni0`, the pod's gateway)
/// with `host-local` addresses from the node's CNI subnet, then
/// `dataplane-cni` asking the agent at `agent_socket` with `fail_policy`.
pub fn node_conflist(
    node: &SimNode,
    ipam_dir: &Path,
    agent_socket: &Path,
    fail_policy: &str,
) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "dataplane-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.cni_subnet()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {
                "type": "dataplane-cni",
                "agentSocket": agent_socket,
                "failPolicy": fail_policy,
            }
        ]
    })
}

impl CniChain {
    /// `plugin_dirs` become `CNI_PATH`.
    pub fn new(node: &SimNode, conflist: Value, plugin_dirs: &[PathBuf]) -> Self {
        let cni_path = plugin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        Self {
            conflist,
            cni_path,
            node_netns: node.netns().to_string(),
        }
    }

    /// Debian's plugins and `dataplane-cni` (beside the agent).
    pub fn standard(node: &SimNode, conflist: Value) -> anyhow::Result<Self> {
        let ours = crate::binaries::cni_plugin()?;
        let dir = ours
            .parent()
            .context("the plugin's directory")?
            .to_path_buf();
        anyhow::ensure!(
            Path::new(DEBIAN_PLUGINS).join("bridge").is_file(),
            "{DEBIAN_PLUGINS}/bridge missing: apt-get install containernetworking-plugins (cargo xtask setup does)"
        );
        Ok(Self::new(
            node,
            conflist,
            &[PathBuf::from(DEBIAN_PLUGINS), dir],
        ))
    }

    /// `ADD` for `pod` (its netns and `CNI_ARGS` as the kubelet passes them
    /// through containerd); the chain's final result.
    pub fn add(&self, pod: &Pod, namespace: &str) -> Result<Value, CniFailure> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let out = self.exec(&plugin, "ADD", pod, namespace, prev.as_ref())?;
            prev = Some(out.unwrap_or(Value::Null));
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// `CHECK` with the result of `ADD`.
    pub fn check(&self, pod: &Pod, namespace: &str, result: &Value) -> Result<(), CniFailure> {
        for plugin in self.plugins() {
            self.exec(&plugin, "CHECK", pod, namespace, Some(result))?;
        }
        Ok(())
    }

    /// `DEL`, plugins in reverse order.
    pub fn del(
        &self,
        pod: &Pod,
        namespace: &str,
        result: Option<&Value>,
    ) -> Result<(), CniFailure> {
        for plugin in self.plugins().into_iter().rev() {
            self.exec(&plugin, "DEL", pod, namespace, result)?;
        }
        Ok(())
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// One plugin, as libcni calls it: the list's name and version in its
    /// config, `prevResult` when there is one.
    fn exec(
        &self,
        plugin: &Value,
        command: &str,
        pod: &Pod,
        namespace: &str,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, CniFailure> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let fail = |code: u64, msg: &str, details: String| CniFailure {
            plugin: kind.clone(),
            code,
            msg: msg.to_string(),
            details,
        };
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let binary = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(&kind))
            .find(|p| p.is_file())
            .ok_or_else(|| fail(0, "plugin not found in CNI_PATH", self.cni_path.clone()))?;
        let container_id = format!("sandbox-{}", pod.uid);
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={};\
             K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}",
            pod.name, pod.uid
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_netns])
            .arg(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &container_id)
            .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(0, "cannot run the plugin", e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if started.elapsed() < PLUGIN_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(0, "plugin timed out", format!("{PLUGIN_TIMEOUT:?}")));
                }
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail(0, "cannot read the plugin's output", e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let error: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
                json!({"code": 0, "msg": "no CNI error object", "details": String::from_utf8_lossy(&out.stderr)})
            });
            return Err(fail(
                error["code"].as_u64().unwrap_or_default(),
                error["msg"].as_str().unwrap_or_default(),
                error["details"].as_str().unwrap_or_default().to_string(),
            ));
        }
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(stdout.trim())
            .map(Some)
            .map_err(|e| fail(0, "unreadable result", format!("{e}: {stdout}")))
    }
}

/// The pod's IPv4 address in a CNI result.
pub fn result_ip(result: &Value) -> anyhow::Result<std::net::Ipv4Addr> {
    let Some(ips) = result["ips"].as_array() else {
        bail!("no ips in the CNI result {result}");
    };
    let cidr = ips
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .find(|a| !a.contains(':'))
        .with_context(|| format!("no IPv4 address in {result}"))?;
    let ip = cidr.split('/').next().unwrap_or_default();
    ip.parse()
        .with_context(|| format!("bad address {cidr} in the CNI result"))
}
