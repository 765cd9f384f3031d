//! Driving `benchtool` inside simulated pods: the echo server, and the
//! load runs (`tcp-rr`, `http-rr`, `bulk`) with their JSON report parsed.
//!
//! Runs take an optional command prefix (e.g. `taskset -c 0`) so the
//! benchmark can pin the load generator to a CPU: on a 2-core machine a
//! client competing with the proxy for a core measures the scheduler.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize;

use crate::{Pod, Proc, SimNode, binaries};

/// `benchtool`'s defaults and fixed bounds, mirrored to size the
/// harness's own timeout.
const DEFAULT_WARMUP: Duration = Duration::from_secs(1);
const DEFAULT_BULK_CAP: Duration = Duration::from_secs(60);
/// How long requests may take after the measured window.
const DRAIN: Duration = Duration::from_secs(2);
/// Time to start, connect every connection and print, beyond the run's
/// own bounds.
const SLACK: Duration = Duration::from_secs(15);
/// How long the echo server may take to print `listening`.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// The one line `benchtool` prints. The request/response runs fill the
/// counts, rates and latencies; `bulk` fills `bytes` to `throughput_bps`.
/// Fields of the other kind are `None` (counts 0).
#[derive(Debug, Clone, Deserialize)]
pub struct BenchReport {
    /// `tcp-rr`, `http-rr` or `bulk`.
    pub mode: String,
    /// Measured requests that got their full response (2xx for HTTP).
    #[serde(default)]
    pub completed: u64,
    /// Measured requests (or the bulk transfer) that failed.
    #[serde(default)]
    pub errors: u64,
    /// Errors by class: `overload` (over `--max-in-flight`),
    /// `unfinished` (not done by the end of the drain), `status` (non-2xx),
    /// `connect`, `refused`, `reset`, `eof`, `timeout`, `closed`, ...
    #[serde(default)]
    pub error_kinds: BTreeMap<String, u64>,
    /// CPU seconds (user + system) `benchtool` itself used, setup and
    /// warm-up included.
    #[serde(default)]
    pub cpu_s: f64,
    /// Requests per second asked for; 0 for the closed loop.
    pub requested_rate: Option<f64>,
    /// Completed requests per second over the measured window.
    pub achieved_rate: Option<f64>,
    /// The measured window, until the last response if that came later.
    pub duration_s: Option<f64>,
    pub warmup_s: Option<f64>,
    pub connections: Option<u64>,
    /// From each request's due time to its response: waiting behind a
    /// late response on the same connection counts (no coordinated
    /// omission); the client's own timer wake-up delay on an idle
    /// connection does not (see `lag_us`). `None` if nothing completed.
    pub latency_us: Option<Latency>,
    /// From each request's actual send to its response.
    pub service_us: Option<Latency>,
    /// Open loop: how late the client itself sent onto idle connections.
    /// Large values mean the load generator could not keep up.
    pub lag_us: Option<Latency>,
    /// bulk: bytes that made the round trip (all of `requested` unless
    /// `error`).
    pub bytes: Option<u64>,
    /// bulk: the `--bytes` asked for.
    pub requested: Option<u64>,
    pub elapsed_s: Option<f64>,
    /// bulk: `bytes` per second, each way.
    pub throughput_bps: Option<f64>,
    /// bulk: why the transfer stopped short (`timeout`, `eof`, `reset`,
    /// `mismatch`, `no-eof`).
    pub error: Option<String>,
    /// bulk `--verify`: every byte matched, then end-of-stream.
    #[serde(default)]
    pub verified: Option<bool>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// `benchtool` is built beside `meshtool`, so it is found the same way.
pub fn benchtool() -> anyhow::Result<PathBuf> {
    let meshtool = binaries::meshtool()?;
    let path = meshtool.with_file_name("benchtool");
    ensure!(
        path.is_file(),
        "benchtool not found next to {} (cargo build -p dataplane-tests)",
        meshtool.display()
    );
    Ok(path)
}

/// Starts `benchtool echo-serve` on `port` in `pod` and waits until it
/// listens.
pub fn echo_serve(node: &SimNode, pod: &Pod, port: u16) -> anyhow::Result<Proc> {
    echo_serve_with_prefix(node, pod, port, &[])
}

/// As [`echo_serve`], started through `prefix` (e.g. `taskset -c 1`).
pub fn echo_serve_with_prefix(
    node: &SimNode,
    pod: &Pod,
    port: u16,
    prefix: &[&str],
) -> anyhow::Result<Proc> {
    let proc = node.spawn_in_pod(pod, echo_serve_command(prefix, port)?)?;
    listening(proc).with_context(|| format!("echo server in pod {} did not start", pod.name))
}

/// As [`echo_serve`], in the node's own network namespace and cgroup: a
/// server the kernel fast path does not reach, as one on another node.
pub fn echo_serve_on_node(node: &SimNode, port: u16) -> anyhow::Result<Proc> {
    let proc = node.spawn_on_node(echo_serve_command(&[], port)?)?;
    listening(proc).context("echo server on the node did not start")
}

fn echo_serve_command(prefix: &[&str], port: u16) -> anyhow::Result<Command> {
    let listen = format!("0.0.0.0:{port}");
    let mut cmd = command(prefix, &["echo-serve", "--listen", &listen])?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    Ok(cmd)
}

/// `proc`, once it said it listens.
fn listening(mut proc: Proc) -> anyhow::Result<Proc> {
    proc.wait_for_line(START_TIMEOUT, |line| line.starts_with("listening"))?;
    Ok(proc)
}

/// Runs `benchtool <args>` (subcommand first) in `pod` through `prefix`
/// (may be empty) and parses its report. The run is killed if it
/// outlives its own bounds plus slack.
pub fn run_in_pod(
    node: &SimNode,
    pod: &Pod,
    args: &[&str],
    prefix: &[&str],
) -> anyhow::Result<BenchReport> {
    let budget = budget(args)?;
    let cmd = command(prefix, args)?;
    let out = node
        .run_in_pod(pod, cmd, budget)
        .with_context(|| format!("benchtool {}", args.join(" ")))?;
    parse_report(&out, args.first().copied().unwrap_or("?"))
}

/// `prefix... benchtool args...`.
fn command(prefix: &[&str], args: &[&str]) -> anyhow::Result<Command> {
    let tool = benchtool()?;
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut cmd = Command::new(program);
            cmd.args(rest).arg(tool);
            cmd
        }
        None => Command::new(tool),
    };
    cmd.args(args);
    Ok(cmd)
}

/// How long a run may take: warm-up, window and drain for the
/// request/response modes, the cap for `bulk`, plus slack.
fn budget(args: &[&str]) -> anyhow::Result<Duration> {
    let value = |key: &str| {
        args.iter()
            .position(|a| *a == key)
            .and_then(|i| args.get(i + 1))
    };
    let seconds = |key: &str, default: Option<Duration>| -> anyhow::Result<Duration> {
        match value(key) {
            Some(text) => parse_seconds(text).with_context(|| format!("{key} {text:?}")),
            None => default.with_context(|| format!("{key} is required")),
        }
    };
    let run = match args.first() {
        Some(&"bulk") => seconds("--duration", Some(DEFAULT_BULK_CAP))?,
        Some(&("tcp-rr" | "tcp-crr" | "http-rr")) => {
            seconds("--warmup", Some(DEFAULT_WARMUP))? + seconds("--duration", None)? + DRAIN
        }
        other => bail!("not a benchtool run: {other:?}"),
    };
    Ok(run + SLACK)
}

/// Seconds as benchtool reads them: `2`, `0.5`, `2s` or `500ms`.
fn parse_seconds(text: &str) -> Option<Duration> {
    let (number, scale) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (text.strip_suffix('s').unwrap_or(text), 1.0),
    };
    let value: f64 = number.parse().ok()?;
    Duration::try_from_secs_f64(value * scale).ok()
}

fn parse_report(out: &Output, what: &str) -> anyhow::Result<BenchReport> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("benchtool {what} exited with {}: {stderr}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("benchtool {what} printed nothing: {stderr}"))?;
    serde_json::from_str(line).with_context(|| format!("bad benchtool {what} line {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_follows_the_arguments() {
        let rr = budget(&["tcp-rr", "--rate", "10", "--duration", "2"]).ok();
        assert_eq!(rr, Some(Duration::from_secs(3) + DRAIN + SLACK));
        let rr = budget(&["http-rr", "--duration", "1.5", "--warmup", "500ms"]).ok();
        assert_eq!(rr, Some(Duration::from_secs(2) + DRAIN + SLACK));
        let bulk = budget(&["bulk", "--to", "x", "--bytes", "1"]).ok();
        assert_eq!(bulk, Some(DEFAULT_BULK_CAP + SLACK));
        assert!(budget(&["tcp-rr", "--rate", "10"]).is_err());
        assert!(budget(&["echo-serve"]).is_err());
    }

    #[test]
    fn reports_parse() -> anyhow::Result<()> {
        let rr: BenchReport = serde_json::from_str(
            r#"{"mode":"tcp-rr","requested_rate":1000.0,"achieved_rate":999.9,
            "completed":2000,"errors":1,"error_kinds":{"reset":1},"duration_s":2.0,
            "warmup_s":1.0,"connections":1,"cpu_s":0.2,
            "latency_us":{"p50":60,"p90":70,"p99":80,"p999":90,"max":100,"mean":61.5},
            "service_us":{"p50":50,"p90":60,"p99":70,"p999":80,"max":90,"mean":51.5},
            "lag_us":null}"#,
        )?;
        assert_eq!(rr.latency_us.map(|l| l.p50), Some(60));
        assert_eq!(rr.achieved_rate, Some(999.9));
        assert!(rr.bytes.is_none() && rr.lag_us.is_none());
        assert_eq!(rr.error_kinds.get("reset"), Some(&1));
        let bulk: BenchReport = serde_json::from_str(
            r#"{"mode":"bulk","bytes":10,"requested":10,"elapsed_s":0.5,
            "throughput_bps":20.0,"errors":0,"cpu_s":0.1}"#,
        )?;
        assert!(bulk.latency_us.is_none() && bulk.achieved_rate.is_none());
        assert_eq!((bulk.bytes, bulk.requested), (Some(10), Some(10)));
        assert_eq!(bulk.throughput_bps, Some(20.0));
        Ok(())
    }
}
