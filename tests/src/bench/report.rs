//! The benchmark report, as written to `target/bench/report.json`.

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
    /// `tcp-rr` (100-byte ping-pong), `http-rr` (HTTP/1.1 keep-alive GET),
    /// `bulk` (bytes each way through an echo server).
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
    /// Sum of their resident set sizes.
    pub proxy_rss_bytes: u64,
}
