//! Keeps the kernel tables equal to the mesh state, and reports what
//! cannot be applied (maps full, enrolled pods missing) once per change
//! rather than on every pass.
//!
//! Three writers share the tables: the periodic pass (a full walk of the
//! pods' cgroups and a diff of each table), the cgroup watcher, which
//! enrolls a pod the moment its cgroup appears, and the [`Enroller`] the
//! CNI plugin asks while the pod's sandbox is being created. A pass holds the lock from
//! its walk to the end of its sync, so a pod enrolled by the watcher is
//! either seen by the walk or written after the sync: never removed again
//! by a pass that walked before it existed.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dataplane_common::{Endpoint, EnrolledPod, ExportKey, ServiceKey, ServiceValue};
use tracing::{debug, info, warn};

use super::enroll::{self, Enrollment};
pub use super::tables::Enrolled;
use super::tables::{CaptureStats, StatsReader, SyncMode, SyncReport, Tables};
use super::watch::{OnPod, PodCgroupWatcher};
use crate::config::MeshConfig;

pub struct Reconciler {
    shared: Arc<Mutex<Shared>>,
    /// Add only while a discovery source has not listed yet.
    mode: SyncMode,
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
    /// Each service's kernel value as last written, with the config it was
    /// made of: an unchanged (same shared) config is not made again.
    values: HashMap<ServiceKey, Written>,
    /// Counts [`Reconciler::services`] passes.
    pass: u64,
    /// The next pass reads the kernel's maps back (see `services`).
    verify_next: bool,
    /// None when inotify is unavailable: then only the periodic pass
    /// enrolls new pods.
    _watcher: Option<PodCgroupWatcher>,
}

/// A service's entry in `DP_SERVICES` as the agent wrote it.
struct Written {
    config: Arc<crate::config::Service>,
    value: ServiceValue,
    /// The last [`Reconciler::services`] pass that found it in the config.
    seen: u64,
    /// Its last write failed (map full): written again at the next pass.
    failed: bool,
}

fn service_key(svc: &crate::config::Service) -> ServiceKey {
    ServiceKey {
        ip4: u32::from_ne_bytes(svc.vip.ip().octets()),
        port: svc.vip.port(),
        _pad: 0,
    }
}

/// What the periodic pass, the cgroup watcher and the CNI enroller share.
struct Shared {
    tables: Tables,
    /// UIDs of the pods the config enrolls, with their tenant ids.
    wanted: HashMap<String, u32>,
    /// Pods enrolled at their creation by the CNI plugin that the config
    /// does not list yet (the API server's word on them has not arrived);
    /// see [`Pending`] for how long they stay.
    pending: HashMap<String, Pending>,
}

/// A pod enrolled by the CNI plugin ahead of the config. It stays
/// enrolled until the config lists it (it governs from then on), the
/// Kubernetes source knows it without listing it (its annotation opts it
/// out), its cgroup is gone, or the runtime deletes its sandbox: never by
/// a timer, so an API server outage does not take it out of the mesh.
struct Pending {
    tenant: Option<String>,
    /// The sandbox the plugin enrolled it for: a late DEL of an earlier
    /// sandbox of the same pod leaves it alone.
    container: String,
}

/// Enrolls one pod now, for the CNI plugin: from any thread, without
/// waiting for the periodic pass.
#[derive(Clone)]
pub struct Enroller {
    shared: Arc<Mutex<Shared>>,
    pods_root: PathBuf,
    proxy_cgroup: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no cgroup of pod {uid} below {pods_root}: does --pods-cgroup match the kubelet's?")]
    NoCgroup { uid: String, pods_root: PathBuf },
    #[error("pod {0} holds the proxy: it is never enrolled")]
    ProxyPod(String),
    #[error("kernel table update failed: {0}")]
    Table(String),
}

impl Enroller {
    /// Puts the pod's cgroup in the enrollment map, as a pod of `tenant`,
    /// for the sandbox `container`; once this returns Ok, every connect
    /// from the pod is captured.
    pub fn enroll(
        &self,
        uid: &str,
        tenant: Option<&str>,
        container: &str,
    ) -> Result<Enrolled, EnrollError> {
        let id = self.cgroup_of(uid)?;
        let mut shared = lock(&self.shared);
        let pod = EnrolledPod {
            tenant: enroll::tenant_id(tenant),
        };
        let enrolled = shared
            .tables
            .enroll(id, pod)
            .map_err(|failure| EnrollError::Table(failure.to_string()))?;
        if !shared.wanted.contains_key(uid) {
            shared.pending.insert(
                uid.to_string(),
                Pending {
                    tenant: tenant.map(str::to_string),
                    container: container.to_string(),
                },
            );
        }
        Ok(enrolled)
    }

    /// The pod's sandbox `container` is deleted (CNI DEL): no need to
    /// keep the pod pending for it.
    pub fn forget(&self, uid: &str, container: &str) {
        let mut shared = lock(&self.shared);
        if shared
            .pending
            .get(uid)
            .is_some_and(|p| p.container == container)
        {
            shared.pending.remove(uid);
        }
    }

    /// Whether the pod's cgroup is in the enrollment map now.
    pub fn is_enrolled(&self, uid: &str) -> bool {
        self.cgroup_of(uid)
            .is_ok_and(|id| lock(&self.shared).tables.is_enrolled(id))
    }

    /// The cgroup id to enroll for pod `uid`, by the rule the periodic
    /// pass and the watcher use.
    fn cgroup_of(&self, uid: &str) -> Result<u64, EnrollError> {
        let no_cgroup = || EnrollError::NoCgroup {
            uid: uid.to_string(),
            pods_root: self.pods_root.clone(),
        };
        let found = super::cgroup::find_pods(&self.pods_root);
        let dir = found.get(uid).ok_or_else(no_cgroup)?;
        enroll::cgroup_to_enroll(uid, dir, &self.proxy_cgroup).map_err(|why| match why {
            enroll::NotEnrolled::ProxyPod => EnrollError::ProxyPod(uid.into()),
            enroll::NotEnrolled::Gone => no_cgroup(),
        })
    }
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
        complete: bool,
    ) -> Self {
        let mut reconciler = Self::new(tables, pods_root, proxy_cgroup);
        reconciler.node_seed = node_seed;
        reconciler.set_complete(complete);
        reconciler.services(cfg);
        reconciler.enrollment(cfg, &BTreeSet::new());
        reconciler
    }

    fn new(tables: Tables, pods_root: PathBuf, proxy_cgroup: PathBuf) -> Self {
        let stats = tables.stats();
        let shared = Arc::new(Mutex::new(Shared {
            tables,
            wanted: HashMap::new(),
            pending: HashMap::new(),
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
            mode: SyncMode::Exact,
            stats,
            pods_root,
            proxy_cgroup,
            last_absent: BTreeSet::new(),
            last_enrolled: usize::MAX,
            last_stats: CaptureStats::default(),
            node_seed: 0,
            values: HashMap::new(),
            pass: 0,
            verify_next: true,
            _watcher: watcher,
        }
    }

    /// A handle that enrolls single pods at once (the CNI plugin's).
    pub fn enroller(&self) -> Enroller {
        Enroller {
            shared: Arc::clone(&self.shared),
            pods_root: self.pods_root.clone(),
            proxy_cgroup: self.proxy_cgroup.clone(),
        }
    }

    /// Writes the services of `cfg` to `DP_SERVICES`: what changed since
    /// the last pass, found by the shared configs (an unchanged service is
    /// the same `Arc`), without reading the map back.
    pub fn services(&mut self, cfg: &MeshConfig) {
        self.pass = self.pass.wrapping_add(1);
        let pass = self.pass;
        let mut upserts = Vec::new();
        for svc in &cfg.services {
            let key = service_key(svc);
            match self.values.entry(key) {
                Entry::Occupied(mut entry) => {
                    let written = entry.get_mut();
                    written.seen = pass;
                    if written.failed || !Arc::ptr_eq(&written.config, svc) {
                        written.config = Arc::clone(svc);
                        let value = service_value(svc, self.node_seed);
                        if written.failed || value != written.value {
                            written.value = value;
                            written.failed = false;
                            upserts.push((key, value));
                        }
                    }
                }
                Entry::Vacant(entry) => {
                    let value = service_value(svc, self.node_seed);
                    entry.insert(Written {
                        config: Arc::clone(svc),
                        value,
                        seen: pass,
                        failed: false,
                    });
                    upserts.push((key, value));
                }
            }
        }
        // Until every source has listed, nothing is removed (and what is
        // not seen stays known, to be removed by the first whole pass).
        let removals: Vec<ServiceKey> = match self.mode {
            SyncMode::AddOnly => Vec::new(),
            SyncMode::Exact => self
                .values
                .iter()
                .filter(|(_, w)| w.seen != pass)
                .map(|(key, _)| *key)
                .collect(),
        };
        for key in &removals {
            self.values.remove(key);
        }
        let exports = exports(cfg);
        let mut shared = lock(&self.shared);
        // New exports before the services, stale ones after: a service is
        // never, for a moment, closed to a tenant it is exported to.
        let mode = self.mode;
        log_report(
            "exports",
            &shared.tables.sync_exports(&exports, SyncMode::AddOnly),
        );
        let (report, failed) = shared.tables.write_services(&upserts, &removals);
        // Tried again at the next pass (a failed removal at the next
        // verification, which reads the map back). A failed write stays
        // known, so that a verification does not remove what the map
        // holds for that VIP meanwhile.
        for key in failed {
            if let Some(written) = self.values.get_mut(&key) {
                written.failed = true;
            }
        }
        log_report("services", &report);
        log_report("exports", &shared.tables.sync_exports(&exports, mode));
        drop(shared);
        // The first pass, and the first after every source has listed,
        // also removes what this agent never wrote (a previous agent's
        // services no source lists any more).
        if mode == SyncMode::Exact && std::mem::take(&mut self.verify_next) {
            self.verify(cfg);
        }
    }

    /// Reads the kernel's service and export maps back and makes them
    /// what this agent last wrote, which repairs any change made behind
    /// its back (an older agent still running during an upgrade, a hand
    /// edit).
    pub fn verify_services(&mut self, cfg: &MeshConfig) {
        let verifies = self.mode == SyncMode::Exact && self.verify_next;
        self.services(cfg);
        if !verifies {
            self.verify(cfg);
        }
    }

    fn verify(&mut self, cfg: &MeshConfig) {
        let desired: HashMap<ServiceKey, ServiceValue> =
            self.values.iter().map(|(k, w)| (*k, w.value)).collect();
        let mut shared = lock(&self.shared);
        shared.tables.forget_written();
        log_report(
            "services",
            &shared.tables.sync_services(&desired, self.mode),
        );
        log_report(
            "exports",
            &shared.tables.sync_exports(&exports(cfg), self.mode),
        );
    }

    /// Whether every discovery source has listed: until then, syncs only
    /// add (see [`SyncMode::AddOnly`]).
    pub fn set_complete(&mut self, complete: bool) {
        if complete && self.mode == SyncMode::AddOnly {
            self.verify_next = true;
        }
        self.mode = if complete {
            SyncMode::Exact
        } else {
            SyncMode::AddOnly
        };
    }

    /// Enrolls the pods of `cfg` that have a cgroup on this node now, and
    /// tells the watcher which pods to enroll when their cgroup appears.
    /// `known`: every pod of this node the Kubernetes source knows,
    /// enrolled or not (a pending pod it knows and `cfg` does not list has
    /// opted out).
    pub fn enrollment(&mut self, cfg: &MeshConfig, known: &BTreeSet<String>) {
        let (Enrollment { cgroups, absent }, report) = {
            let mut shared = lock(&self.shared);
            let wanted: HashMap<String, u32> = cfg
                .pods
                .iter()
                .map(|pod| (pod.uid.clone(), enroll::tenant_id(pod.tenant.as_deref())))
                .collect();
            shared
                .pending
                .retain(|uid, _| !wanted.contains_key(uid) && !known.contains(uid));
            shared.wanted = wanted;
            let pods: Vec<crate::config::Pod> = cfg
                .pods
                .iter()
                .cloned()
                .chain(
                    shared
                        .pending
                        .iter()
                        .map(|(uid, pending)| crate::config::Pod {
                            uid: uid.clone(),
                            name: None,
                            ip: None,
                            tenant: pending.tenant.clone(),
                        }),
                )
                .collect();
            let enrollment = enroll::resolve(&pods, &self.pods_root, &self.proxy_cgroup);
            // A pending pod whose cgroup is gone is gone.
            shared
                .pending
                .retain(|uid, _| !enrollment.absent.contains(uid));
            let report = shared.tables.sync_enrolled(&enrollment.cgroups, self.mode);
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
        let Some(&tenant) = shared.wanted.get(uid) else {
            return;
        };
        let Ok(id) = enroll::cgroup_to_enroll(uid, dir, &proxy_cgroup) else {
            return;
        };
        match shared.tables.enroll(id, EnrolledPod { tenant }) {
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

/// `DP_EXPORTS`: for each service with a tenant, the other tenants it is
/// exported to (one exported to every tenant has no tenant in the kernel,
/// see [`service_value`]).
fn exports(cfg: &MeshConfig) -> HashMap<ExportKey, u8> {
    let mut out = HashMap::new();
    for svc in &cfg.services {
        if svc.tenant.is_empty() || svc.export_to.iter().any(|t| t == "*") {
            continue;
        }
        for tenant in &svc.export_to {
            let key = ExportKey {
                ip4: u32::from_ne_bytes(svc.vip.ip().octets()),
                port: svc.vip.port(),
                _pad: 0,
                tenant: enroll::tenant_id(Some(tenant)),
            };
            out.insert(key, 1);
        }
    }
    out
}

/// What the connect hooks know of a service: up to eight of its endpoints,
/// from the `seed`-th on (wrapping), where a connect goes when no proxy
/// listens and the agent fails open.
fn service_value(svc: &crate::config::Service, seed: usize) -> ServiceValue {
    let mut value = ServiceValue::default();
    if !svc.export_to.iter().any(|t| t == "*") {
        value.tenant = enroll::tenant_id(Some(&svc.tenant));
    }
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
    fn tenants_reach_the_kernel_as_stable_ids_with_their_exports() {
        assert_eq!(enroll::tenant_id(None), 0);
        assert_eq!(enroll::tenant_id(Some("")), 0);
        // FNV-1a: the same id in every agent, across restarts and upgrades.
        assert_eq!(enroll::tenant_id(Some("a")), 0xe40c_292c);
        let cfg = MeshConfig::parse(
            "services:\n\
             - {name: b, vip: 198.19.0.1:80, tenant: b, exportTo: [a, c]}\n\
             - {name: open, vip: 198.19.0.2:80, tenant: b, exportTo: ['*']}\n\
             - {name: shared, vip: 198.19.0.3:80}\n",
            std::path::Path::new("t.yaml"),
        )
        .expect("valid");
        let tenants: Vec<u32> = cfg
            .services
            .iter()
            .map(|s| service_value(s, 0).tenant)
            .collect();
        assert_eq!(tenants, [enroll::tenant_id(Some("b")), 0, 0]);
        let mut exported: Vec<(u16, u32)> =
            exports(&cfg).keys().map(|k| (k.port, k.tenant)).collect();
        exported.sort_unstable();
        let mut expected = vec![
            (80, enroll::tenant_id(Some("a"))),
            (80, enroll::tenant_id(Some("c"))),
        ];
        expected.sort_unstable();
        assert_eq!(
            exported, expected,
            "only the first service has export entries"
        );
        assert!(
            exports(&cfg)
                .keys()
                .all(|k| k.ip4 == u32::from_ne_bytes([198, 19, 0, 1]))
        );
    }

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
