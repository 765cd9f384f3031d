//! The kernel tables the agent owns: enrolled pods, mesh services, and the
//! programs' counters.

use std::collections::HashMap as StdHashMap;
use std::hash::Hash;
use std::sync::Arc;

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use aya::{Ebpf, Pod};
use dataplane_common::{EnrolledPod, ServiceKey, ServiceValue, maps, stats};

use super::CaptureError;

/// `E2BIG`: what the kernel answers when a hash map is full.
const E2BIG: i32 = 7;

/// Handles to the pinned maps.
pub struct Tables {
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    stats: Arc<StatsReader>,
}

/// Read access to the programs' per-CPU counters, shareable with the
/// metrics endpoint.
pub struct StatsReader(PerCpuArray<MapData, u64>);

/// Totals of the programs' counters over all CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaptureStats {
    pub captured: u64,
    pub orig_dst_full: u64,
    pub conns_full: u64,
    pub orig_dst_served: u64,
    pub orig_dst_unknown: u64,
}

/// Outcome of one table synchronisation.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub added: usize,
    pub removed: usize,
    /// Entries that could not be written, with the reason (e.g. map full).
    pub failed: Vec<String>,
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or_else(|| CaptureError::Map {
        name,
        message: "missing from the eBPF object".into(),
    })
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> CaptureError {
    move |err| CaptureError::Map {
        name,
        message: err.to_string(),
    }
}

impl Tables {
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, CaptureError> {
        let enrolled =
            HashMap::try_from(take_map(ebpf, maps::ENROLLED)?).map_err(map_err(maps::ENROLLED))?;
        let services =
            HashMap::try_from(take_map(ebpf, maps::SERVICES)?).map_err(map_err(maps::SERVICES))?;
        let stats =
            PerCpuArray::try_from(take_map(ebpf, maps::STATS)?).map_err(map_err(maps::STATS))?;
        Ok(Self {
            enrolled,
            services,
            stats: Arc::new(StatsReader(stats)),
        })
    }

    /// Makes `DP_ENROLLED` hold exactly `desired` (cgroup id -> value).
    pub fn sync_enrolled(&mut self, desired: &StdHashMap<u64, EnrolledPod>) -> SyncReport {
        sync_map(&mut self.enrolled, desired, maps::ENROLLED)
    }

    /// Makes `DP_SERVICES` hold exactly `desired`.
    pub fn sync_services(&mut self, desired: &StdHashMap<ServiceKey, ServiceValue>) -> SyncReport {
        sync_map(&mut self.services, desired, maps::SERVICES)
    }

    pub fn stats(&self) -> Arc<StatsReader> {
        Arc::clone(&self.stats)
    }
}

impl StatsReader {
    /// Sums every counter over the CPUs. A failed read counts as zero: the
    /// counters are for observation, never for decisions.
    pub fn read(&self) -> CaptureStats {
        let total = |index: u32| {
            self.0
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        CaptureStats {
            captured: total(stats::CAPTURED),
            orig_dst_full: total(stats::ORIG_DST_FULL),
            conns_full: total(stats::CONNS_FULL),
            orig_dst_served: total(stats::ORIG_DST_SERVED),
            orig_dst_unknown: total(stats::ORIG_DST_UNKNOWN),
        }
    }
}

/// Removes what is not desired, then writes what is missing or different.
/// Keeps going after a failed write so that one full map does not hide the
/// rest of the changes; every failure is reported.
fn sync_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    desired: &StdHashMap<K, V>,
    name: &str,
) -> SyncReport
where
    K: Pod + Eq + Hash + std::fmt::Debug,
    V: Pod + PartialEq,
{
    let mut report = SyncReport::default();
    let current: Vec<(K, V)> = map.iter().filter_map(Result::ok).collect();
    for (key, _) in current.iter().filter(|(k, _)| !desired.contains_key(k)) {
        match map.remove(key) {
            Ok(()) => report.removed += 1,
            Err(err) => report.failed.push(format!("{name}: remove {key:?}: {err}")),
        }
    }
    for (key, value) in desired {
        if current.iter().any(|(k, v)| k == key && v == value) {
            continue;
        }
        match map.insert(key, value, 0) {
            Ok(()) => report.added += 1,
            Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(E2BIG) => {
                report
                    .failed
                    .push(format!("{name}: map full, {key:?} not added"));
            }
            Err(err) => report.failed.push(format!("{name}: insert {key:?}: {err}")),
        }
    }
    report
}
