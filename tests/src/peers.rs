//! Driving `meshtool` inside simulated pods: backends, hello clients and
//! bulk transfers, with their JSON output parsed.

use std::net::SocketAddrV4;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::{Pod, Proc, SimNode, binaries};

/// Port the backends listen on.
pub const BACKEND_PORT: u16 = 8080;

/// One `meshtool hello` attempt.
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    pub ok: bool,
    /// The backend's name (on success).
    #[serde(default)]
    pub backend: String,
    /// The client address the backend saw (on success).
    #[serde(default)]
    pub peer: String,
    /// `refused`, `reset`, `timeout`, `eof`, `unreachable` or `other` (on failure).
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub error: String,
    pub elapsed_us: u64,
}

impl Hello {
    /// The IP the backend saw the connection come from.
    pub fn peer_ip(&self) -> Option<&str> {
        self.peer.rsplit_once(':').map(|(ip, _)| ip)
    }
}

/// Result of `meshtool transfer`.
#[derive(Debug, Clone, Deserialize)]
pub struct Transfer {
    pub sent: u64,
    pub received: u64,
    #[serde(rename = "match")]
    pub matched: bool,
    pub backend: String,
    pub elapsed_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// Starts `meshtool serve` named `name` in `pod` and waits until it listens.
pub fn serve(node: &SimNode, pod: &Pod, name: &str) -> anyhow::Result<Proc> {
    serve_tool(node, pod, &binaries::meshtool()?, name)
}

/// Starts `<tool> serve --listen 0.0.0.0:8080 --name <name>` in `pod` and
/// waits for the `listening` line every test server prints once bound.
pub fn serve_tool(
    node: &SimNode,
    pod: &Pod,
    tool: &std::path::Path,
    name: &str,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(tool);
    cmd.args([
        "serve",
        "--listen",
        &format!("0.0.0.0:{BACKEND_PORT}"),
        "--name",
        name,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut proc = node.spawn_in_pod(pod, cmd)?;
    proc.wait_for_line(Duration::from_secs(5), |line| line.starts_with("listening"))
        .with_context(|| format!("backend {name} ({}) did not start", tool.display()))?;
    Ok(proc)
}

/// `count` sequential connections from `pod` to `to`.
pub fn hello(
    node: &SimNode,
    pod: &Pod,
    to: SocketAddrV4,
    count: u32,
) -> anyhow::Result<Vec<Hello>> {
    let mut cmd = Command::new(binaries::meshtool()?);
    cmd.args([
        "hello",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ]);
    // Each attempt is bounded by meshtool's own 2 s timeout.
    let budget = Duration::from_secs(10 + 3 * u64::from(count));
    let out = node.run_in_pod(pod, cmd, budget)?;
    if !out.status.success() {
        bail!(
            "meshtool hello failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("bad hello line {line:?}")))
        .collect()
}

/// `count` connections from `pod` to `to`, each held open until all were
/// tried (see `meshtool hold`).
pub fn hold(
    node: &SimNode,
    pod: &Pod,
    to: SocketAddrV4,
    count: u32,
    hold_ms: u64,
) -> anyhow::Result<Vec<Hello>> {
    let mut cmd = Command::new(binaries::meshtool()?);
    cmd.args([
        "hold",
        "--to",
        &to.to_string(),
        "--count",
        &count.to_string(),
    ])
    .args(["--hold-ms", &hold_ms.to_string()]);
    let budget = Duration::from_secs(10 + 3 * u64::from(count)) + Duration::from_millis(hold_ms);
    let out = node.run_in_pod(pod, cmd, budget)?;
    if !out.status.success() {
        bail!(
            "meshtool hold failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("bad hold line {line:?}")))
        .collect()
}

/// Sends `bytes` to an echo backend through `to`, half-closes, reads the
/// echo back and compares.
pub fn transfer(
    node: &SimNode,
    pod: &Pod,
    to: SocketAddrV4,
    bytes: u64,
) -> anyhow::Result<Transfer> {
    paced_transfer(node, pod, to, bytes, Duration::ZERO)
}

/// [`transfer`] with a pause of `pace` after each 64 KiB chunk: a stream
/// that stays open for `bytes / 64 KiB * pace`.
pub fn paced_transfer(
    node: &SimNode,
    pod: &Pod,
    to: SocketAddrV4,
    bytes: u64,
    pace: Duration,
) -> anyhow::Result<Transfer> {
    let mut cmd = Command::new(binaries::meshtool()?);
    cmd.args([
        "transfer",
        "--to",
        &to.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--pace-ms",
        &pace.as_millis().to_string(),
    ]);
    let out = node.run_in_pod(pod, cmd, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().with_context(|| {
        format!(
            "meshtool transfer printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    serde_json::from_str(line).with_context(|| format!("bad transfer line {line:?}"))
}
