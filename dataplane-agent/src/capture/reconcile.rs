//! Keeps the kernel tables equal to the mesh state, and reports what
//! cannot be applied (maps full, enrolled pods missing) once per change
//! rather than on every pass.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use dataplane_common::{ServiceKey, ServiceValue};
use tracing::{info, warn};

use super::enroll::{self, Enrollment};
use super::tables::{CaptureStats, SyncReport, Tables};
use crate::config::MeshConfig;

pub struct Reconciler {
    tables: Tables,
    pods_root: PathBuf,
    proxy_cgroup: PathBuf,
    last_absent: BTreeSet<String>,
    last_enrolled: usize,
    last_stats: CaptureStats,
}

impl Reconciler {
    pub fn new(tables: Tables, pods_root: PathBuf, proxy_cgroup: PathBuf) -> Self {
        Self {
            tables,
            pods_root,
            proxy_cgroup,
            last_absent: BTreeSet::new(),
            last_enrolled: usize::MAX,
            last_stats: CaptureStats::default(),
        }
    }

    /// Writes the services of `cfg` to `DP_SERVICES`.
    pub fn services(&mut self, cfg: &MeshConfig) {
        let desired: HashMap<ServiceKey, ServiceValue> = cfg
            .services
            .iter()
            .map(|svc| {
                let key = ServiceKey {
                    ip4: u32::from_ne_bytes(svc.vip.ip().octets()),
                    port: svc.vip.port(),
                    _pad: 0,
                };
                (key, ServiceValue::default())
            })
            .collect();
        let report = self.tables.sync_services(&desired);
        log_report("services", &report);
    }

    /// Enrolls the pods of `cfg` that have a cgroup on this node now; pods
    /// that appear later are picked up by the next pass.
    pub fn enrollment(&mut self, cfg: &MeshConfig) {
        let Enrollment { cgroups, absent } =
            enroll::resolve(&cfg.pods, &self.pods_root, &self.proxy_cgroup);
        let report = self.tables.sync_enrolled(&cgroups);
        log_report("enrollment", &report);
        if absent != self.last_absent && !absent.is_empty() {
            warn!(pods = ?absent, "enrolled pods have no cgroup on this node (yet)");
        }
        if cgroups.len() != self.last_enrolled {
            info!(enrolled = cgroups.len(), "enrolled pods");
        }
        self.last_absent = absent;
        self.last_enrolled = cgroups.len();
    }

    /// Warns when the programs report full maps since the last check.
    pub fn check_kernel_counters(&mut self) {
        let stats = self.tables.stats().read();
        if stats.orig_dst_full > self.last_stats.orig_dst_full {
            warn!(
                refused = stats.orig_dst_full - self.last_stats.orig_dst_full,
                "eBPF map DP_ORIG_DST is full: captured connects were refused"
            );
        }
        if stats.conns_full > self.last_stats.conns_full {
            warn!(
                lost = stats.conns_full - self.last_stats.conns_full,
                "eBPF map DP_CONNS rejected entries: proxied connections lost their destination"
            );
        }
        self.last_stats = stats;
    }
}

fn log_report(table: &str, report: &SyncReport) {
    if report.added + report.removed > 0 {
        info!(
            table,
            added = report.added,
            removed = report.removed,
            "kernel table updated"
        );
    }
    for failure in &report.failed {
        warn!(table, %failure, "kernel table update failed");
    }
}
