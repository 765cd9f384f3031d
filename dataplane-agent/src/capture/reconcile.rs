//! Keeps the kernel tables equal to the mesh state, and reports what
//! cannot be applied (maps full, enrolled pods missing) once per change
//! rather than on every pass.
//!
//! Two writers share the tables: the periodic pass (a full walk of the
//! pods' cgroups and a diff of each table) and the cgroup watcher, which
//! enrolls a pod the moment its cgroup appears. A pass holds the lock from
//! its walk to the end of its sync, so a pod enrolled by the watcher is
//! either seen by the walk or written after the sync: never removed again
//! by a pass that walked before it existed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dataplane_common::{Endpoint, EnrolledPod, ServiceKey, ServiceValue};
use tracing::{debug, info, warn};

use super::enroll::{self, Enrollment};
use super::tables::{CaptureStats, Enrolled, StatsReader, SyncReport, Tables};
use super::watch::{OnPod, PodCgroupWatcher};
use crate::config::MeshConfig;

pub struct Reconciler {
    shared: Arc<Mutex<Shared>>,
    stats: Arc<StatsReader>,
    pods_root: PathBuf,
    proxy_cgroup: PathBuf,
    last_absent: BTreeSet<String>,
    last_enrolled: usize,
    last_stats: CaptureStats,
    /// Which of a service's endpoints this node keeps for fail-open (a
    /// different slice on each node, so that an outage of every agent
    /// does not send the whole mesh to a service's first eight).
    node_seed: usize,
    /// None when inotify is unavailable: then only the periodic pass
    /// enrolls new pods.
    _watcher: Option<PodCgroupWatcher>,
}

/// What the periodic pass and the cgroup watcher share.
struct Shared {
    tables: Tables,
    /// UIDs of the pods the config enrolls.
    wanted: HashSet<String>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // The tables stay usable after a panic elsewhere: every pass rewrites
    // them from scratch.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Reconciler {
    /// Takes over the tables, starts watching `pods_root` for new pods and
    /// fills the tables from `cfg` (services, then the enrolled pods found
    /// now). Once this returns, programs reading the tables capture what
    /// `cfg` says: attach them only then.
    /// `node_seed`: anything that differs between nodes (the node's
    /// address).
    pub fn start(
        tables: Tables,
        pods_root: PathBuf,
        proxy_cgroup: PathBuf,
        node_seed: usize,
        cfg: &MeshConfig,
    ) -> Self {
        let mut reconciler = Self::new(tables, pods_root, proxy_cgroup);
        reconciler.node_seed = node_seed;
        reconciler.services(cfg);
        reconciler.enrollment(cfg);
        reconciler
    }

    fn new(tables: Tables, pods_root: PathBuf, proxy_cgroup: PathBuf) -> Self {
        let stats = tables.stats();
        let shared = Arc::new(Mutex::new(Shared {
            tables,
            wanted: HashSet::new(),
        }));
        let on_pod = enroll_on_sight(Arc::clone(&shared), proxy_cgroup.clone());
        let watcher = match PodCgroupWatcher::start(pods_root.clone(), on_pod) {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                warn!(
                    pods_cgroup = %pods_root.display(),
                    %err,
                    "cannot watch the pods' cgroups (inotify limits?): new pods are enrolled \
                     at the next --resync only"
                );
                None
            }
        };
        Self {
            shared,
            stats,
            pods_root,
            proxy_cgroup,
            last_absent: BTreeSet::new(),
            last_enrolled: usize::MAX,
            last_stats: CaptureStats::default(),
            node_seed: 0,
            _watcher: watcher,
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
                (key, service_value(svc, self.node_seed))
            })
            .collect();
        let report = lock(&self.shared).tables.sync_services(&desired);
        log_report("services", &report);
    }

    /// Enrolls the pods of `cfg` that have a cgroup on this node now, and
    /// tells the watcher which pods to enroll when their cgroup appears.
    pub fn enrollment(&mut self, cfg: &MeshConfig) {
        let (Enrollment { cgroups, absent }, report) = {
            let mut shared = lock(&self.shared);
            shared.wanted = cfg.pods.iter().map(|pod| pod.uid.clone()).collect();
            let enrollment = enroll::resolve(&cfg.pods, &self.pods_root, &self.proxy_cgroup);
            let report = shared.tables.sync_enrolled(&enrollment.cgroups);
            (enrollment, report)
        };
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
        let stats = self.stats.read();
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

/// The watcher's action for a pod directory: enroll it now if the config
/// wants it (the same rule as the periodic pass). The watcher may report a
/// pod more than once (a directory seen both by its event and by a scan,
/// every pod again after an event overflow): only a pod that was not
/// enrolled yet is written and logged.
fn enroll_on_sight(shared: Arc<Mutex<Shared>>, proxy_cgroup: PathBuf) -> OnPod {
    Box::new(move |uid, dir| {
        let mut shared = lock(&shared);
        if !shared.wanted.contains(uid) {
            return;
        }
        let Ok(id) = enroll::cgroup_to_enroll(uid, dir, &proxy_cgroup) else {
            return;
        };
        match shared.tables.enroll(id, EnrolledPod::default()) {
            Ok(Enrolled::New) => info!(%uid, cgroup = %dir.display(), "enrolled a new pod cgroup"),
            Ok(Enrolled::Already) => {
                debug!(%uid, cgroup = %dir.display(), "pod cgroup seen again, already enrolled");
            }
            Err(failure) => warn!(table = "enrollment", %failure, "kernel table update failed"),
        }
    })
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

/// What the connect hooks know of a service: up to eight of its endpoints,
/// from the `seed`-th on (wrapping), where a connect goes when no proxy
/// listens and the agent fails open.
fn service_value(svc: &crate::config::Service, seed: usize) -> ServiceValue {
    let mut value = ServiceValue::default();
    let n = svc.endpoints.len();
    let rotated = svc.endpoints.iter().cycle().skip(seed % n.max(1)).take(n);
    for (slot, ep) in value.endpoints.iter_mut().zip(rotated) {
        *slot = Endpoint {
            ip4: u32::from_ne_bytes(ep.address.ip().octets()),
            port: ep.address.port(),
            _pad: 0,
        };
        value.count += 1;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_value_holds_the_first_endpoints_for_fail_open() {
        let endpoints: String = (1..=10)
            .map(|i| format!("{{address: 10.0.0.{i}:80{i:02}}}, "))
            .collect();
        let yaml = format!(
            "services:\n  - name: s\n    vip: 198.19.0.1:80\n    endpoints: [{endpoints}]\n"
        );
        let cfg = MeshConfig::parse(&yaml, std::path::Path::new("t.yaml")).expect("valid");
        let value = service_value(&cfg.services[0], 0);
        assert_eq!(
            value.count as usize,
            dataplane_common::capacity::FALLBACK_ENDPOINTS
        );
        assert_eq!(
            value.endpoints[0],
            Endpoint {
                ip4: u32::from_ne_bytes([10, 0, 0, 1]),
                port: 8001,
                _pad: 0
            }
        );
        assert_eq!(value.endpoints[7].port, 8008);
        let none = MeshConfig::parse(
            "services:\n  - name: s\n    vip: 198.19.0.1:80\n",
            std::path::Path::new("t.yaml"),
        )
        .expect("valid");
        assert_eq!(service_value(&none.services[0], 3).count, 0);
        // Another node keeps another slice, wrapping round.
        let value = service_value(&cfg.services[0], 5);
        let ports: Vec<u16> = value.endpoints.iter().map(|e| e.port).collect();
        assert_eq!(ports, [8006, 8007, 8008, 8009, 8010, 8001, 8002, 8003]);
    }
}
