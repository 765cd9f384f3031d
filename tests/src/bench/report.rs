//! The benchmark report, as written to `target/bench/report.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything one `cargo xtask bench` run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    /// `git rev-parse --short HEAD` (with `-dirty` when the tree differs).
    pub commit: String,
    /// UTC, RFC 3339.
    pub generated_at: String,
    /// `--quick`: every mode briefly, for CI; numbers are not meaningful.
    pub quick: bool,
    /// Latency/throughput runs: one per mode x workload x pinning x rate.
    pub results: Vec<RunResult>,
    /// Total proxy memory against the number of pods, per mode.
    pub memory: Vec<MemoryPoint>,
    /// The pinned 100-byte ping-pong at its first rate, measured again
    /// in separate runs, for the spread between runs of one benchmark.
    #[serde(default)]
    pub repeats: Vec<RunResult>,
    /// The agent's memory under connection bursts and churn (absent when
    /// that part did not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<Churn>,
    /// Discovery from the Kubernetes API at scale (absent when that part
    /// did not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryScale>,
}

/// The agent reading a large cluster (see `bench/discovery.rs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiscoveryScale {
    pub services: u32,
    pub endpoints: u32,
    /// Pods of the node in the API.
    pub pods: u32,
    /// From the agent's start to every Service in its state.
    pub sync_s: f64,
    /// The agent's memory 5 s after that.
    pub rss_bytes: u64,
    pub pss_bytes: u64,
    /// What the agent holds on its heap then (its allocator's count): the
    /// rest of its RSS is code, stacks and memory the allocator keeps.
    #[serde(default)]
    pub heap_allocated_bytes: u64,
    /// Endpoint changes made at the API during the churn window, and its
    /// length.
    pub changes: u64,
    pub churn_s: f64,
    /// The agent's CPU over the churn window, in cores.
    pub churn_cpu_cores: f64,
    /// From a new Service at the API to the first request answered
    /// through its VIP, each sample (ms), while the churn runs.
    pub effective_ms: Vec<f64>,
    pub effective_p50_ms: f64,
    pub effective_p99_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub kernel: String,
}

/// One measurement.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// `direct`, `sidecar` (ours), `haproxy` (HAProxy sidecars), `node`
    /// (the node proxy, captured by eBPF).
    pub mode: String,
    /// `tcp-rr` (100-byte ping-pong), `tcp-rr-poll` (the same, the client
    /// waiting in poll(2)), `tcp-crr` (a new connection per ping-pong),
    /// `http-rr` (HTTP/1.1 keep-alive GET), `bulk` (bytes each way through
    /// an echo server).
    pub workload: String,
    /// `unpinned`, or `pinned` (every process on CPU 0).
    pub pinning: String,
    /// Requested rate in requests/s; 0 for closed loop (maximum rate).
    pub rate: f64,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    /// Achieved requests per second.
    pub rps: f64,
    /// CPU time of all proxy processes per 1000 requests (None: direct).
    pub cpu_s_per_1k_req: Option<f64>,
    /// Bulk only: bytes per second each way.
    pub throughput_bps: Option<f64>,
    pub completed: u64,
    pub errors: u64,
}

/// Memory of the proxies when `pods` pods are on the node (idle ones
/// included).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemoryPoint {
    pub mode: String,
    pub pods: u32,
    /// Number of proxy processes (1 for the node proxy, one per pod for
    /// sidecars).
    pub proxies: u32,
    /// Sum of their resident set sizes (pages shared between the
    /// proxies, such as the binary's, counted once per process).
    pub proxy_rss_bytes: u64,
    /// Sum of their proportional set sizes: a shared page counted once
    /// over all of them, which is what the node pays.
    #[serde(default)]
    pub proxy_pss_bytes: u64,
    /// Node mode: the kernel memory of the capture's eBPF maps (their
    /// `memlock`), which the node pays beside the proxy's own.
    #[serde(default)]
    pub bpf_map_bytes: u64,
}

/// The agent's resident memory through bursts of connections, then a
/// soak with connections, endpoints, services and pods churning (see
/// `bench::churn`). Sizes are VmRSS in bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Churn {
    /// `node`: the agent on a simulated node.
    pub mode: String,
    pub bursts: u32,
    /// Connections each burst opens at once.
    pub burst_connections: u32,
    pub requests_per_connection: u32,
    /// Started, warmed up by a small burst, idle.
    pub baseline_rss_bytes: u64,
    /// The agent's open descriptors at each reading (mostly sockets: it
    /// tells memory the allocator keeps from connections still held,
    /// such as idle pooled upstream connections).
    #[serde(default)]
    pub baseline_fds: u64,
    /// The highest RSS sampled (every 50 ms) during the bursts.
    pub peak_rss_bytes: u64,
    /// `gap_s` after each burst's connections closed.
    pub after_burst_rss_bytes: Vec<u64>,
    #[serde(default)]
    pub after_burst_fds: Vec<u64>,
    pub gap_s: f64,
    /// After the last burst and `settle_s` more of quiet.
    pub settled_rss_bytes: u64,
    #[serde(default)]
    pub settled_fds: u64,
    pub settle_s: f64,
    /// Over all bursts: connections opened, requests completed and failed.
    pub burst_connections_opened: u64,
    pub burst_completed: u64,
    pub burst_errors: u64,
    /// Failed requests by kind (`benchtool burst`'s classes).
    #[serde(default)]
    pub burst_error_kinds: BTreeMap<String, u64>,
    pub soak: Soak,
}

/// The soak part of [`Churn`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Soak {
    pub duration_s: f64,
    /// Connections per round, and the pause between rounds.
    pub connections_per_round: u32,
    #[serde(default)]
    pub pause_s: f64,
    pub reconfigure_interval_s: f64,
    /// Config versions written, and how many of them the agent applied
    /// or rejected (from its reload counters).
    pub config_writes: u64,
    pub config_reloads: u64,
    pub config_rejected: u64,
    pub connections: u64,
    pub completed: u64,
    pub errors: u64,
    #[serde(default)]
    pub error_kinds: BTreeMap<String, u64>,
    /// RSS from the start of the churn on.
    pub samples: Vec<RssSample>,
    pub start_rss_bytes: u64,
    pub end_rss_bytes: u64,
    pub max_rss_bytes: u64,
    /// Least-squares slope of RSS over the second half of the samples,
    /// bytes per minute: a leak shows as a steady positive trend.
    pub trend_bytes_per_min: f64,
    /// After the churn stopped and the burst part's `settle_s` of quiet.
    pub settled_rss_bytes: u64,
    #[serde(default)]
    pub settled_fds: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RssSample {
    /// Seconds since the soak started.
    pub t_s: f64,
    pub rss_bytes: u64,
    /// The agent's open descriptors.
    #[serde(default)]
    pub fds: u64,
}

impl Soak {
    /// Fills start, end, max and trend from the samples.
    pub fn summarise(&mut self) {
        let rss = |s: Option<&RssSample>| s.map_or(0, |s| s.rss_bytes);
        self.start_rss_bytes = rss(self.samples.first());
        self.end_rss_bytes = rss(self.samples.last());
        self.max_rss_bytes = self.samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0);
        self.trend_bytes_per_min = slope(&self.samples[self.samples.len() / 2..]) * 60.0;
    }
}

/// Least-squares slope of RSS against time, bytes per second (0 with
/// fewer than two distinct times).
fn slope(samples: &[RssSample]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.t_s).sum::<f64>() / n;
    let mean_r = samples.iter().map(|s| s.rss_bytes as f64).sum::<f64>() / n;
    let (mut cov, mut var) = (0.0, 0.0);
    for s in samples {
        let dt = s.t_s - mean_t;
        cov += dt * (s.rss_bytes as f64 - mean_r);
        var += dt * dt;
    }
    if var > 0.0 { cov / var } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(f64, u64)]) -> Vec<RssSample> {
        points
            .iter()
            .map(|&(t_s, rss_bytes)| RssSample {
                t_s,
                rss_bytes,
                fds: 0,
            })
            .collect()
    }

    #[test]
    fn soak_summary_reads_start_end_max_and_the_second_half_trend() {
        let mut soak = Soak {
            // Flat at 10 in the first half, then +1 per 10 s.
            samples: samples(&[
                (0.0, 10),
                (10.0, 30),
                (20.0, 10),
                (30.0, 11),
                (40.0, 12),
                (50.0, 13),
            ]),
            ..Soak::default()
        };
        soak.summarise();
        assert_eq!(
            (soak.start_rss_bytes, soak.end_rss_bytes, soak.max_rss_bytes),
            (10, 13, 30)
        );
        assert!(
            (soak.trend_bytes_per_min - 6.0).abs() < 1e-9,
            "{}",
            soak.trend_bytes_per_min
        );
        let mut empty = Soak::default();
        empty.summarise();
        assert_eq!((empty.max_rss_bytes, empty.trend_bytes_per_min), (0, 0.0));
    }

    #[test]
    fn reports_without_churn_still_parse() -> serde_json::Result<()> {
        let report: Report = serde_json::from_str(
            r#"{"machine":{"cpus":2,"cpu_model":"x","memory_bytes":1,"kernel":"6"},
            "commit":"c","generated_at":"t","quick":true,"results":[],"memory":[]}"#,
        )?;
        assert!(report.churn.is_none());
        assert!(!serde_json::to_string(&report)?.contains("churn"));
        Ok(())
    }
}
