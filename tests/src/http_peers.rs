//! Driving `httptool` inside simulated pods: HTTP backends whose failure
//! mode tests switch at runtime, load runs and gRPC calls, with their
//! JSON output parsed.
//!
//! The backends' `/control` and `/stats` are reached from the node network
//! namespace, which sees every pod directly over its bridge: switching a
//! backend must not go through the proxy under test.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize;

use crate::{Pod, Proc, SimNode, binaries};

/// Port the HTTP backends listen on.
pub const BACKEND_PORT: u16 = 8080;
/// `httptool load` defaults, mirrored to size the harness's own timeout.
const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(30);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for the process to start and print beyond its own bounds.
const SLACK: Duration = Duration::from_secs(10);
/// Bound on each control-plane request to a backend.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// The summary line of `httptool load`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadReport {
    /// Requests started.
    pub sent: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses by status code.
    pub statuses: BTreeMap<String, u64>,
    /// Requests without a complete response, by class: `refused`
    /// (connect refused), `reset` (TCP RST or HTTP/2 RST_STREAM),
    /// `refused_stream` (HTTP/2 REFUSED_STREAM), `goaway` (HTTP/2 GOAWAY),
    /// `closed` (closed before a complete response), `timeout`,
    /// `unreachable`, `connect`, `other`.
    pub errors: BTreeMap<String, u64>,
    /// Responses by their `x-backend` header.
    pub backends: BTreeMap<String, u64>,
    /// Responses by their `x-dataplane-overflow` header.
    pub overflow: BTreeMap<String, u64>,
    /// Responses carrying `x-dataplane-fallback`.
    pub fallback: u64,
    /// The distinct `Retry-After` values seen.
    pub retry_after: Vec<String>,
    pub elapsed_ms: u64,
    /// Over the requests that got a complete response.
    pub latency_us: Latency,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl LoadReport {
    /// Responses with status `code`.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code.to_string()).copied().unwrap_or(0)
    }

    /// Requests that got a response, whatever its status.
    pub fn responses(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// Requests that failed with error class `kind`.
    pub fn error(&self, kind: &str) -> u64 {
        self.errors.get(kind).copied().unwrap_or(0)
    }

    /// Requests that failed, of any class.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The line of `httptool grpc`. `status` is `None` when no response came;
/// `error` then holds the failure class.
#[derive(Debug, Clone, Deserialize)]
pub struct GrpcReport {
    pub status: Option<u16>,
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub grpc_message: Option<String>,
    /// Whether a trailers frame arrived (where gRPC puts its status).
    pub trailers: bool,
    pub backend: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `httptool` is built beside `meshtool`, so it is found the same way.
pub fn httptool() -> anyhow::Result<PathBuf> {
    let meshtool = binaries::meshtool()?;
    let path = meshtool.with_file_name("httptool");
    ensure!(
        path.is_file(),
        "httptool not found next to {} (cargo build -p dataplane-tests)",
        meshtool.display()
    );
    Ok(path)
}

/// Starts `httptool serve` named `name` on port 8080 in `pod` and waits
/// until it listens.
pub fn serve(node: &SimNode, pod: &Pod, name: &str) -> anyhow::Result<Proc> {
    crate::peers::serve_tool(node, pod, &httptool()?, name)
}

/// Runs `httptool load <args>` in `pod` and parses its summary.
pub fn load(node: &SimNode, pod: &Pod, args: &[&str]) -> anyhow::Result<LoadReport> {
    let mut cmd = Command::new(httptool()?);
    cmd.arg("load").args(args);
    let out = node.run_in_pod(pod, cmd, load_budget(args)?)?;
    parse_last_line(&out, "load")
}

/// How long `httptool load` may take: its own deadline for starting
/// requests, plus one request timeout for the last ones, plus slack.
fn load_budget(args: &[&str]) -> anyhow::Result<Duration> {
    let value = |key: &str| {
        args.iter()
            .position(|a| *a == key)
            .and_then(|i| args.get(i + 1))
    };
    let max_duration = match value("--max-duration") {
        Some(text) => parse_duration(text).with_context(|| format!("--max-duration {text:?}"))?,
        None => DEFAULT_MAX_DURATION,
    };
    let timeout = match value("--timeout-ms") {
        Some(text) => Duration::from_millis(
            text.parse()
                .with_context(|| format!("--timeout-ms {text:?}"))?,
        ),
        None => DEFAULT_REQUEST_TIMEOUT,
    };
    Ok(max_duration + timeout + SLACK)
}

/// `<n>ms` or `<n>s`, as httptool reads it.
fn parse_duration(text: &str) -> Option<Duration> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    text.strip_suffix('s')?
        .parse()
        .ok()
        .map(Duration::from_secs)
}

/// `httptool until-ok` running in a pod: requests to one URL, one after
/// another, until one is answered.
pub struct UntilOk(crate::proc::Proc);

impl UntilOk {
    /// Starts it in `pod` and waits until it runs: the change it is to
    /// see may be made from then on.
    pub fn start(node: &SimNode, pod: &Pod, url: &str, deadline: Duration) -> anyhow::Result<Self> {
        let mut cmd = Command::new(httptool()?);
        cmd.args(["until-ok", "--url", url, "--attempt-timeout-ms", "20"])
            .args(["--deadline-ms", &deadline.as_millis().to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        let mut proc = node.spawn_in_pod(pod, cmd)?;
        proc.wait_for_line(Duration::from_secs(10), |l| l == "ready")?;
        Ok(Self(proc))
    }

    /// When the first answer came (wall clock), or an error if none came
    /// before the deadline.
    pub fn answered_at(mut self, deadline: Duration) -> anyhow::Result<std::time::SystemTime> {
        let line = self
            .0
            .wait_for_line(deadline + SLACK, |l| l.starts_with('{'))?;
        let report: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("httptool until-ok printed {line:?}"))?;
        let us = report["answered_unix_us"]
            .as_u64()
            .with_context(|| format!("never answered: {line}"))?;
        Ok(std::time::UNIX_EPOCH + Duration::from_micros(us))
    }
}

/// One gRPC-shaped call (HTTP/2 prior knowledge) from `pod` to `url`.
pub fn grpc(node: &SimNode, pod: &Pod, url: &str) -> anyhow::Result<GrpcReport> {
    let mut cmd = Command::new(httptool()?);
    cmd.args(["grpc", "--url", url]);
    let budget = DEFAULT_REQUEST_TIMEOUT + SLACK;
    let out = node.run_in_pod(pod, cmd, budget)?;
    parse_last_line(&out, "grpc")
}

/// What `httptool raw` received.
#[derive(Debug, Clone, Deserialize)]
pub struct RawReport {
    pub status_line: Option<String>,
    pub status: Option<u16>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Sends `request` (with `\r\n` written as escapes) from `pod` to `to`,
/// optionally padded with one header of `pad` bytes; reports the status.
pub fn raw(
    node: &SimNode,
    pod: &Pod,
    to: &str,
    request: &str,
    pad: usize,
) -> anyhow::Result<RawReport> {
    let mut cmd = Command::new(httptool()?);
    cmd.args(["raw", "--to", to, "--request", request])
        .args(["--pad-header-bytes", &pad.to_string()]);
    let out = node.run_in_pod(pod, cmd, DEFAULT_REQUEST_TIMEOUT + SLACK)?;
    parse_last_line(&out, "raw")
}

fn parse_last_line<T: serde::de::DeserializeOwned>(
    out: &std::process::Output,
    what: &str,
) -> anyhow::Result<T> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("httptool {what} exited with {}: {stderr}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("httptool {what} printed nothing: {stderr}"))?;
    serde_json::from_str(line).with_context(|| format!("bad httptool {what} line {line:?}"))
}

/// Switches `backend`'s mode (`ok`, `status:503`, `reset`,
/// `delay:300ms`, `close`).
pub fn set_mode(node: &SimNode, backend: &Pod, mode: &str) -> anyhow::Result<()> {
    let body = format!("mode={mode}");
    let (status, answer) = backend_request(node, backend, "POST", "/control", &body)?;
    ensure!(
        status == 200 && answer.trim() == body,
        "setting mode {mode} on {}: {status} {answer:?}",
        backend.name
    );
    Ok(())
}

/// The backend's current mode, as `POST /control` accepts it.
pub fn mode(node: &SimNode, backend: &Pod) -> anyhow::Result<String> {
    let (status, answer) = backend_request(node, backend, "GET", "/control", "")?;
    ensure!(status == 200, "GET /control on {}: {status}", backend.name);
    let mode = answer
        .trim()
        .strip_prefix("mode=")
        .context("no mode= in answer")?;
    Ok(mode.to_owned())
}

/// Requests the backend answered so far (control and stats excluded).
pub fn backend_requests(node: &SimNode, backend: &Pod) -> anyhow::Result<u64> {
    #[derive(Deserialize)]
    struct Stats {
        requests: u64,
    }
    let (status, answer) = backend_request(node, backend, "GET", "/stats", "")?;
    ensure!(status == 200, "GET /stats on {}: {status}", backend.name);
    let stats: Stats =
        serde_json::from_str(&answer).with_context(|| format!("bad stats {answer:?}"))?;
    Ok(stats.requests)
}

fn backend_request(
    node: &SimNode,
    backend: &Pod,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let addr = SocketAddrV4::new(backend.ip, BACKEND_PORT).into();
    http_request_in_netns(node.netns(), addr, method, path, body)
        .with_context(|| format!("{method} {path} on backend {}", backend.name))
}

/// A minimal HTTP/1.0 request from a thread that joined `netns`; returns
/// the status and the body. Like [`crate::agent::http_get_in_netns`], with
/// a method, a body and the status.
pub fn http_request_in_netns(
    netns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let worker = std::thread::spawn(move || -> anyhow::Result<String> {
        // SAFETY: setns on this thread only; the fd is valid while `ns` lives.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let mut stream = TcpStream::connect_timeout(&addr, CONTROL_TIMEOUT)?;
        stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
        stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
        stream.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    });
    let response = worker
        .join()
        .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
    parse_response(&response)
}

/// `HTTP/1.x <status> ...\r\n...\r\n\r\n<body>` into status and body.
fn parse_response(response: &str) -> anyhow::Result<(u16, String)> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_follows_the_arguments() {
        let budget = load_budget(&[
            "--requests",
            "5",
            "--max-duration",
            "2s",
            "--timeout-ms",
            "100",
        ]);
        assert_eq!(budget.ok(), Some(Duration::from_millis(2100) + SLACK));
        let default = load_budget(&["--requests", "5"]).ok();
        assert_eq!(
            default,
            Some(DEFAULT_MAX_DURATION + DEFAULT_REQUEST_TIMEOUT + SLACK)
        );
        assert!(load_budget(&["--max-duration", "30"]).is_err());
    }

    #[test]
    fn responses_parse() {
        let parsed = parse_response("HTTP/1.0 200 OK\r\nx: y\r\n\r\nmode=ok\n").ok();
        assert_eq!(parsed, Some((200, "mode=ok\n".to_owned())));
        assert!(parse_response("garbage").is_err());
    }
}
