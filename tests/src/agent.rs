//! Running the node agent on a simulated node: config file, pin
//! directory, readiness, metrics, kill/restart and cleanup.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{Proc, SimNode, binaries, eventually};

/// Port of the node proxy on the node's bridge address.
pub const PROXY_PORT: u16 = 15001;
/// Admin endpoint, on loopback inside the node's network namespace.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `dataplane-agent run` in the node namespace and node cgroup.
/// Dropping it kills the agent and uninstalls its capture.
pub struct Agent {
    proc: Option<Proc>,
    netns: String,
    work_dir: PathBuf,
    pin_dir: PathBuf,
    args: Vec<String>,
    /// Its admin endpoint (in the node's namespace).
    admin: std::net::SocketAddr,
    /// Leave the capture installed when dropped: another agent took over.
    handed_over: bool,
    /// Its `RUST_LOG`.
    log_filter: &'static str,
}

/// Tests read the agent's debug lines (and its programs' records).
const TEST_LOG: &str = "info,dataplane=debug,dataplane_agent=debug";

impl Agent {
    /// Writes `config_yaml` and starts the agent; waits until it is ready.
    pub fn start(node: &SimNode, config_yaml: &str) -> anyhow::Result<Agent> {
        Self::start_with(node, config_yaml, &[])
    }

    /// As a user runs it, for measurements: the default log level (no
    /// debug lines, no per-connect records from the programs) and the
    /// default resync period, with `extra` arguments.
    pub fn start_as_deployed(
        node: &SimNode,
        config_yaml: &str,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let mut args = vec!["--resync=1s"];
        args.extend_from_slice(extra);
        Self::start_logging(node, config_yaml, &args, "info")
    }

    /// Like [`Agent::start`], with extra command-line arguments.
    pub fn start_with(node: &SimNode, config_yaml: &str, extra: &[&str]) -> anyhow::Result<Agent> {
        Self::start_logging(node, config_yaml, extra, TEST_LOG)
    }

    fn start_logging(
        node: &SimNode,
        config_yaml: &str,
        extra: &[&str],
        log_filter: &'static str,
    ) -> anyhow::Result<Agent> {
        // A second agent on the node (an upgrade) has its own admin port,
        // and its own directory for its log and config.
        let admin: std::net::SocketAddr = extra
            .iter()
            .find_map(|a| a.strip_prefix("--admin-addr="))
            .unwrap_or(ADMIN_ADDR)
            .parse()?;
        let suffix = match admin.port() {
            15000 => String::new(),
            port => format!("-{port}"),
        };
        let work_dir =
            Self::work_dir_of(node).with_file_name(format!("dataplane-{}{suffix}", node.id()));
        std::fs::create_dir_all(&work_dir)?;
        let config = work_dir.join("mesh.yaml");
        std::fs::write(&config, config_yaml)?;
        let pin_dir = Self::pin_dir_of(node);
        let proxy = SocketAddrV4::new(node.node_ip(), PROXY_PORT);
        let mut args = vec![
            "run".to_string(),
            format!("--config={}", config.display()),
            format!("--proxy-addr={proxy}"),
            format!("--admin-addr={ADMIN_ADDR}"),
            format!("--pods-cgroup={}", node.pods_cgroup().display()),
            format!("--pin-dir={}", pin_dir.display()),
            "--resync=200ms".to_string(),
            // Each agent of a test its own socket and snapshot: tests run
            // side by side.
            format!("--cni-socket={}", work_dir.join("cni.sock").display()),
            format!(
                "--kubernetes-snapshot={}",
                work_dir.join("kubernetes.snapshot").display()
            ),
        ];
        // An extra `--flag=value` replaces the default of that flag (the
        // agent refuses a flag given twice).
        for arg in extra {
            if let Some((flag, _)) = arg.split_once('=') {
                args.retain(|a| !a.starts_with(&format!("{flag}=")));
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut agent = Agent {
            proc: None,
            netns: node.netns().to_string(),
            work_dir,
            pin_dir,
            args,
            admin,
            handed_over: false,
            log_filter,
        };
        agent.spawn(node)?;
        Ok(agent)
    }

    /// Starts the agent process again (after [`Agent::kill`]).
    pub fn spawn(&mut self, node: &SimNode) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(binaries::agent()?);
        cmd.args(&self.args)
            .env("RUST_LOG", self.log_filter)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        self.proc = Some(node.spawn_on_node(cmd)?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let result = eventually("agent ready", READY_TIMEOUT, || {
            if let Some(status) = self.proc.as_mut().and_then(|p| p.try_wait().ok().flatten()) {
                bail!("agent exited with {status}");
            }
            let body = self.get("/ready")?;
            if body.trim() != "ready" {
                bail!("not ready: {body}");
            }
            Ok(())
        });
        result.with_context(|| format!("agent log:\n{}", self.log()))
    }

    /// The directory of the (first) agent of `node`: its log, its config,
    /// and whatever a test puts there for it (a registry snapshot).
    pub fn work_dir_of(node: &SimNode) -> PathBuf {
        std::env::temp_dir().join(format!("dataplane-{}", node.id()))
    }

    /// Where the (first) agent of `node` listens for the CNI plugin.
    pub fn cni_socket_of(node: &SimNode) -> PathBuf {
        Self::work_dir_of(node).join("cni.sock")
    }

    /// The bpffs directory the agent for `node` pins its objects in (so a
    /// test can put something there before the agent starts).
    pub fn pin_dir_of(node: &SimNode) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/dataplane-{}", node.id()))
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.work_dir.join("mesh.yaml")
    }

    /// Replaces the config file (atomically: write then rename), as an
    /// operator or a ConfigMap update would.
    pub fn write_config(&self, yaml: &str) -> anyhow::Result<()> {
        let staging = self.work_dir.join("mesh.yaml.new");
        std::fs::write(&staging, yaml)?;
        std::fs::rename(&staging, self.config_path())?;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.work_dir.join("agent.log")
    }

    /// Everything the agent wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGTERM, as Kubernetes stops a pod, then waits up to `timeout` for
    /// the agent to exit (it drains first).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut proc) = self.proc.take() else {
            bail!("the agent is not running");
        };
        let pid = libc::pid_t::try_from(proc.pid())?;
        // SAFETY: kill(2) with a pid this harness spawned.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to the agent: {}", std::io::Error::last_os_error());
        }
        proc.wait_timeout(timeout)
    }

    /// Another agent took over the node: dropping this one must not
    /// uninstall the capture they share.
    pub fn hand_over(&mut self) {
        self.handed_over = true;
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.kill()?;
        }
        Ok(())
    }

    /// Runs `dataplane-agent cleanup` for this agent's pin directory.
    pub fn cleanup(&self) -> anyhow::Result<Output> {
        let out = Command::new(binaries::agent()?)
            .args(["cleanup", &format!("--pin-dir={}", self.pin_dir.display())])
            .output()?;
        if !out.status.success() {
            bail!("cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    }

    /// `dataplane-agent status` (with `extra` arguments) against this
    /// agent, run in the node's namespace as an operator would: its output.
    pub fn status(&self, node: &SimNode, extra: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(binaries::agent()?);
        cmd.args(["status", &format!("--admin-addr={}", self.admin)])
            .args(extra);
        let out = node.run_on_node(cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `GET path` on the admin endpoint.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        http_get_in_netns(&self.netns, self.admin, path)
    }

    /// The sum of the samples whose `name{labels}` starts with `prefix`;
    /// 0 while the admin endpoint does not answer.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics().map_or(0.0, |m| m.sum(prefix))
    }

    /// The Prometheus metrics, by `name{labels}` as printed.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        Ok(Metrics::parse(&self.get("/metrics")?))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.kill();
        if !self.handed_over
            && let Err(err) = self.cleanup()
        {
            eprintln!("agent teardown: {err:#}");
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Parsed Prometheus text.
#[derive(Debug, Default)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let values = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect();
        Self(values)
    }

    /// Sum of every series whose `name{labels}` starts with `prefix`.
    pub fn sum(&self, prefix: &str) -> f64 {
        self.0
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, value)| value)
            .sum()
    }

    pub fn captured(&self) -> u64 {
        self.sum("dataplane_capture_captured_connections_total") as u64
    }

    pub fn forwarded(&self) -> u64 {
        self.sum("dataplane_proxy_forwarded_connections_total") as u64
    }
}

/// A minimal HTTP/1.0 GET from a thread that joined `netns`; the admin
/// endpoint is only reachable inside the node's namespace.
pub fn http_get_in_netns(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    let path = path.to_string();
    let worker = std::thread::spawn(move || -> anyhow::Result<String> {
        // SAFETY: setns on this thread only; the fd is valid while `ns` lives.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let timeout = Duration::from_secs(2);
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (_, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        Ok(body.to_string())
    });
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("admin request thread panicked"))?
}

/// `bpftool cgroup show`: the programs attached to `cgroup`, as
/// `(attach_type, program name)`.
pub fn attached_programs(cgroup: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!("bpftool: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    Ok(entries
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("attach_type"), field("name"))
        })
        .collect())
}
