//! Configuration of the per-service load balancer.
//!
//! Names follow Istio's `DestinationRule.trafficPolicy.loadBalancer` where one exists
//! (`consistentHash.minimumRingSize`, `localityLbSetting`) and Envoy's cluster fields otherwise
//! (`choice_count`, `overprovisioning_factor`, `healthy_panic_threshold`,
//! `maglev_lb_config.table_size`). Validation happens in `TryFrom<Raw…>` so that the YAML parser
//! reports the path and line of a bad value.

use serde::{Deserialize, Serialize};

mod sections;

pub use sections::{HashConfig, HashSource, LocalityConfig, PeakEwmaConfig};

/// Largest accepted `ringSize`: Envoy's default `maximum_ring_size` (8M entries).
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Largest accepted `maglevTableSize`: Envoy's upper bound for `table_size`.
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;
/// Largest accepted `choiceCount`: beyond a handful of choices P2C degenerates into "global
/// least loaded", which herds every proxy onto the same endpoint.
pub const MAX_CHOICE_COUNT: u32 = 16;

/// How an endpoint is chosen inside one locality priority level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Algorithm {
    /// Weighted round robin (deterministic smooth schedule).
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of `choiceCount` choices on outstanding requests / weight. The
    /// default: an endpoint that slows down or hangs keeps its requests
    /// outstanding and so loses almost every comparison long before outlier
    /// detection could call it bad (Envoy's and Linkerd's choice too).
    #[default]
    LeastRequest,
    /// Power of `choiceCount` choices on peak-EWMA latency x (outstanding + 1) / weight.
    PeakEwma,
    /// Ketama-style consistent hashing ring.
    RingHash,
    /// Maglev lookup table.
    Maglev,
}

impl Algorithm {
    /// True for the consistent-hashing algorithms, which need `Pick::hash`.
    pub fn is_hash(self) -> bool {
        matches!(self, Algorithm::RingHash | Algorithm::Maglev)
    }
}

/// Per-service load balancer policy.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(
    try_from = "RawLoadBalancerConfig",
    deny_unknown_fields,
    rename_all = "camelCase"
)]
pub struct LoadBalancerConfig {
    pub algorithm: Algorithm,
    /// Candidates compared by `leastRequest` / `peakEwma` (Envoy `choice_count`, default 2).
    pub choice_count: u32,
    /// What the integrator hashes for `ringHash` / `maglev`.
    pub hash: HashConfig,
    /// Minimum number of ring entries per priority level (Istio `minimumRingSize`, default 1024).
    pub ring_size: u64,
    /// Maglev table size per priority level; must be prime (Envoy default 65537).
    pub maglev_table_size: u64,
    pub peak_ewma: PeakEwmaConfig,
    pub locality: LocalityConfig,
    /// Percent of available weight below which availability is ignored (Envoy default 50).
    pub panic_threshold: f64,
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::LeastRequest,
            choice_count: 2,
            hash: HashConfig::default(),
            ring_size: 1024,
            maglev_table_size: 65537,
            peak_ewma: PeakEwmaConfig::default(),
            locality: LocalityConfig::default(),
            panic_threshold: 50.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawLoadBalancerConfig {
    algorithm: Algorithm,
    choice_count: u32,
    hash: HashConfig,
    ring_size: u64,
    maglev_table_size: u64,
    peak_ewma: PeakEwmaConfig,
    locality: LocalityConfig,
    panic_threshold: f64,
}

impl Default for RawLoadBalancerConfig {
    fn default() -> Self {
        let d = LoadBalancerConfig::default();
        Self {
            algorithm: d.algorithm,
            choice_count: d.choice_count,
            hash: d.hash,
            ring_size: d.ring_size,
            maglev_table_size: d.maglev_table_size,
            peak_ewma: d.peak_ewma,
            locality: d.locality,
            panic_threshold: d.panic_threshold,
        }
    }
}

impl TryFrom<RawLoadBalancerConfig> for LoadBalancerConfig {
    type Error = String;

    fn try_from(r: RawLoadBalancerConfig) -> Result<Self, String> {
        if !(2..=MAX_CHOICE_COUNT).contains(&r.choice_count) {
            return Err(format!(
                "choiceCount: must be between 2 and {MAX_CHOICE_COUNT}"
            ));
        }
        if !(1..=MAX_RING_SIZE).contains(&r.ring_size) {
            return Err(format!("ringSize: must be between 1 and {MAX_RING_SIZE}"));
        }
        if r.maglev_table_size > MAX_MAGLEV_TABLE_SIZE || !is_prime(r.maglev_table_size) {
            return Err(format!(
                "maglevTableSize: must be a prime <= {MAX_MAGLEV_TABLE_SIZE}"
            ));
        }
        if !(0.0..=100.0).contains(&r.panic_threshold) {
            return Err("panicThreshold: must be a percentage between 0 and 100".into());
        }
        if r.algorithm.is_hash() && r.hash.source().is_none() {
            return Err("hash: ringHash and maglev need hash.header or hash.sourceIp".into());
        }
        Ok(Self {
            algorithm: r.algorithm,
            choice_count: r.choice_count,
            hash: r.hash,
            ring_size: r.ring_size,
            maglev_table_size: r.maglev_table_size,
            peak_ewma: r.peak_ewma,
            locality: r.locality,
            panic_threshold: r.panic_threshold,
        })
    }
}

/// Trial division; table sizes are <= 5M so at most ~1.1k divisions, once per config load.
pub(super) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}
