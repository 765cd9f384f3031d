//! The kernel tables the agent owns: enrolled pods, mesh services, and the
//! programs' counters.

use std::collections::HashMap as StdHashMap;
use std::hash::Hash;
use std::sync::Arc;

use std::os::fd::AsRawFd;

use aya::maps::{HashMap, MapData, MapError, PerCpuArray, SockMap};
use aya::{Ebpf, Pod};
use dataplane_common::{EnrolledPod, ExportKey, ServiceKey, ServiceValue, capacity, maps, stats};

use super::CaptureError;

/// `E2BIG`: what the kernel answers when a hash map is full.
const E2BIG: i32 = 7;

/// Handles to the pinned maps.
pub struct Tables {
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    exports: HashMap<MapData, ExportKey, u8>,
    listeners: SockMap<MapData>,
    stats: Arc<StatsReader>,
    /// What the last sync of `DP_EXPORTS` left there, when every write
    /// succeeded: the next sync diffs against it rather than reading the
    /// map back. [`Tables::forget_written`] makes the next one read the
    /// map again, which repairs what another writer changed.
    exports_written: Option<StdHashMap<ExportKey, u8>>,
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
    pub proxy_down_refused: u64,
    pub proxy_down_direct: u64,
    pub fast_direct: u64,
    pub fast_tcp: u64,
    pub fast_spliced: u64,
    pub fast_bulk: u64,
    pub fast_full: u64,
    pub tenant_denied: u64,
}

/// What [`Tables::enroll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolled {
    /// The entry was written.
    New,
    /// The same entry was there already: nothing was written.
    Already,
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
        let exports =
            HashMap::try_from(take_map(ebpf, maps::EXPORTS)?).map_err(map_err(maps::EXPORTS))?;
        let stats =
            PerCpuArray::try_from(take_map(ebpf, maps::STATS)?).map_err(map_err(maps::STATS))?;
        let listeners = SockMap::try_from(take_map(ebpf, maps::PROXY_LISTENERS)?)
            .map_err(map_err(maps::PROXY_LISTENERS))?;
        Ok(Self {
            enrolled,
            services,
            exports,
            listeners,
            stats: Arc::new(StatsReader(stats)),
            exports_written: None,
        })
    }

    /// Puts the proxy's listening socket in a free slot of
    /// `DP_PROXY_LISTENERS`, which tells the connect hooks that a proxy
    /// listens; the kernel drops it when the socket closes (drain, exit or
    /// crash). Returns the slot.
    pub fn register_listener(&mut self, listener: &impl AsRawFd) -> Result<u32, CaptureError> {
        /// `BPF_NOEXIST`: fail on a slot another agent holds.
        const NOEXIST: u64 = 1;
        let mut last = None;
        for slot in 0..capacity::PROXY_LISTENERS {
            match self.listeners.set(slot, listener, NOEXIST) {
                Ok(()) => return Ok(slot),
                Err(err) => last = Some(err),
            }
        }
        Err(CaptureError::Map {
            name: maps::PROXY_LISTENERS,
            message: format!(
                "no free slot for this agent's listener ({} agents listening already?): {}",
                capacity::PROXY_LISTENERS,
                last.map_or_else(String::new, |e| e.to_string())
            ),
        })
    }

    /// Makes `DP_ENROLLED` hold exactly `desired` (cgroup id -> value).
    pub fn sync_enrolled(
        &mut self,
        desired: &StdHashMap<u64, EnrolledPod>,
        mode: SyncMode,
    ) -> SyncReport {
        sync_map(&mut self.enrolled, &mut None, desired, maps::ENROLLED, mode)
    }

    /// Enrolls one cgroup and leaves every other entry alone: a pod whose
    /// cgroup just appeared, between two full syncs. An entry already there
    /// with this value is left as it is ([`Enrolled::Already`]).
    pub fn enroll(&mut self, cgroup_id: u64, pod: EnrolledPod) -> Result<Enrolled, String> {
        if self
            .enrolled
            .get(&cgroup_id, 0)
            .is_ok_and(|current| current == pod)
        {
            return Ok(Enrolled::Already);
        }
        insert(&mut self.enrolled, &cgroup_id, &pod, maps::ENROLLED).map(|()| Enrolled::New)
    }

    /// Whether `cgroup_id` is in the enrollment map.
    pub fn is_enrolled(&self, cgroup_id: u64) -> bool {
        self.enrolled.get(&cgroup_id, 0).is_ok()
    }

    /// Makes `DP_SERVICES` hold exactly `desired`.
    pub fn sync_services(
        &mut self,
        desired: &StdHashMap<ServiceKey, ServiceValue>,
        mode: SyncMode,
    ) -> SyncReport {
        sync_map(&mut self.services, &mut None, desired, maps::SERVICES, mode)
    }

    /// Writes `upserts` to `DP_SERVICES` and removes `removals`, nothing
    /// else: the changes of one pass. Returns the keys whose write failed
    /// with the report.
    pub fn write_services(
        &mut self,
        upserts: &[(ServiceKey, ServiceValue)],
        removals: &[ServiceKey],
    ) -> (SyncReport, Vec<ServiceKey>) {
        write(&mut self.services, removals, upserts, maps::SERVICES)
    }

    /// The next sync of the export map reads it back.
    pub fn forget_written(&mut self) {
        self.exports_written = None;
    }

    /// Makes `DP_EXPORTS` hold exactly `desired`.
    pub fn sync_exports(
        &mut self,
        desired: &StdHashMap<ExportKey, u8>,
        mode: SyncMode,
    ) -> SyncReport {
        sync_map(
            &mut self.exports,
            &mut self.exports_written,
            desired,
            maps::EXPORTS,
            mode,
        )
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
            proxy_down_refused: total(stats::PROXY_DOWN_REFUSED),
            proxy_down_direct: total(stats::PROXY_DOWN_DIRECT),
            fast_direct: total(stats::FAST_DIRECT),
            fast_tcp: total(stats::FAST_TCP),
            fast_spliced: total(stats::FAST_SPLICED),
            fast_bulk: total(stats::FAST_BULK),
            fast_full: total(stats::FAST_FULL),
            tenant_denied: total(stats::TENANT_DENIED),
        }
    }
}

/// What turns a map's `current` content into `desired`: keys to remove,
/// entries to write. Linear in the size of both (hash lookups), so that a
/// node with thousands of pods or services is synced in one pass.
#[derive(Debug, Default, PartialEq)]
pub struct Diff<K, V> {
    pub remove: Vec<K>,
    pub upsert: Vec<(K, V)>,
}

impl<K, V> Diff<K, V>
where
    K: Eq + Hash + Copy,
    V: PartialEq + Copy,
{
    pub fn between(current: &StdHashMap<K, V>, desired: &StdHashMap<K, V>) -> Self {
        let remove = current
            .keys()
            .filter(|key| !desired.contains_key(key))
            .copied()
            .collect();
        let upsert = desired
            .iter()
            .filter(|(key, value)| current.get(key) != Some(value))
            .map(|(key, value)| (*key, *value))
            .collect();
        Self { remove, upsert }
    }
}

/// Whether a sync may remove entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The table becomes exactly what is desired.
    Exact,
    /// Only writes: while a discovery source has not listed yet, what the
    /// agent knows is partial, and removing what it does not know would
    /// take pods and services a running agent (or the one before this)
    /// put there out of the mesh.
    AddOnly,
}

/// Removes what is not desired (unless `mode` says add only), then writes
/// what is missing or different. The map's content is read back unless
/// `written` holds what the last sync left there; it holds this one's
/// after it, when every write succeeded.
/// Keeps going after a failed write so that one full map does not hide the
/// rest of the changes; every failure is reported.
fn sync_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    written: &mut Option<StdHashMap<K, V>>,
    desired: &StdHashMap<K, V>,
    name: &str,
    mode: SyncMode,
) -> SyncReport
where
    K: Pod + Eq + Hash + std::fmt::Debug,
    V: Pod + PartialEq,
{
    let mut current: StdHashMap<K, V> = match written.take() {
        Some(written) => written,
        None => map.iter().filter_map(Result::ok).collect(),
    };
    let mut diff = Diff::between(&current, desired);
    if mode == SyncMode::AddOnly {
        diff.remove.clear();
    }
    let (report, _) = write(map, &diff.remove, &diff.upsert, name);
    if report.failed.is_empty() {
        for key in &diff.remove {
            current.remove(key);
        }
        current.extend(diff.upsert);
        *written = Some(current);
    }
    report
}

/// Removes `removals` (one already gone counts as removed) and writes
/// `upserts`, going on after a failure so that one full map does not hide
/// the rest; returns the report and the keys that failed.
fn write<K, V>(
    map: &mut HashMap<MapData, K, V>,
    removals: &[K],
    upserts: &[(K, V)],
    name: &str,
) -> (SyncReport, Vec<K>)
where
    K: Pod + Eq + std::fmt::Debug,
    V: Pod,
{
    let mut report = SyncReport::default();
    let mut failed = Vec::new();
    for key in removals {
        match map.remove(key) {
            Ok(()) => report.removed += 1,
            Err(MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                report.removed += 1;
            }
            Err(err) => {
                report.failed.push(format!("{name}: remove {key:?}: {err}"));
                failed.push(*key);
            }
        }
    }
    for (key, value) in upserts {
        match insert(map, key, value, name) {
            Ok(()) => report.added += 1,
            Err(failure) => {
                report.failed.push(failure);
                failed.push(*key);
            }
        }
    }
    (report, failed)
}

/// Writes one entry; the error says why, naming a full map as such.
fn insert<K, V>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    value: &V,
    name: &str,
) -> Result<(), String>
where
    K: Pod + std::fmt::Debug,
    V: Pod,
{
    match map.insert(key, value, 0) {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(E2BIG) => {
            Err(format!("{name}: map full, {key:?} not added"))
        }
        Err(err) => Err(format!("{name}: insert {key:?}: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn diff_removes_the_unwanted_and_writes_the_missing_or_changed() {
        let current = StdHashMap::from([(1u64, 10u32), (2, 20), (3, 30)]);
        let desired = StdHashMap::from([(2u64, 20u32), (3, 31), (4, 40)]);
        let mut diff = Diff::between(&current, &desired);
        diff.upsert.sort_unstable();
        assert_eq!(
            diff,
            Diff {
                remove: vec![1],
                upsert: vec![(3, 31), (4, 40)],
            }
        );
        assert_eq!(Diff::between(&desired, &desired), Diff::default());
    }

    /// 200,000 entries on each side with nothing in common (the worst case
    /// for a scan per entry: 4e10 comparisons) take milliseconds when the
    /// diff is linear; the bound is generous for slow debug builds.
    #[test]
    fn diff_is_linear_in_the_table_sizes() {
        const N: u64 = 200_000;
        let current: StdHashMap<u64, u64> = (0..N).map(|k| (k, k)).collect();
        let desired: StdHashMap<u64, u64> = (N..2 * N).map(|k| (k, k)).collect();
        let started = Instant::now();
        let diff = Diff::between(&current, &desired);
        let took = started.elapsed();
        assert_eq!(
            (diff.remove.len(), diff.upsert.len()),
            (N as usize, N as usize)
        );
        assert!(took < Duration::from_secs(5), "diff took {took:?}");
    }
}
