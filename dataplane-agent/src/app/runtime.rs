//! What node mode and sidecar mode share: the config and its watcher,
//! metrics and the admin endpoint, the proxy and its service table, the
//! outlier-detection ticker, and process-level set-up.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::Admin;
use crate::config::MeshConfig;
use crate::discovery::Source;
use crate::metrics::ProxyMetrics;
use crate::proxy::Proxy;
use crate::reload::{Change, ConfigWatcher, Rejected};
use crate::state::{NodeContext, ServiceTable};

/// The running proxy with its config, admin endpoint and watcher.
pub struct Runtime {
    /// The config in force: the file's, plus what the other discovery
    /// sources add.
    pub config: MeshConfig,
    /// The last good config file, and its watchers (the registry
    /// publisher).
    file: MeshConfig,
    file_watch: tokio::sync::watch::Sender<MeshConfig>,
    /// The discovery sources beside the file (registry, Kubernetes), in
    /// the order they win VIP conflicts.
    sources: Vec<Box<dyn Source>>,
    /// Whether every source has a whole state (the kernel tables are only
    /// added to until then).
    pub complete: Arc<std::sync::atomic::AtomicBool>,
    /// Every pod of this node the sources know, enrolled or not, as of the
    /// config in force (see `capture::reconcile::Reconciler::enrollment`).
    pub known_pods: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// Shared with the blocking thread that reads the file.
    watcher: Arc<Mutex<ConfigWatcher>>,
    pub proxy: Arc<Proxy>,
    pub admin: Arc<Admin>,
    node: NodeContext,
}

/// Reads and validates the config file (errors name field and line).
pub fn load_config(path: &Path) -> anyhow::Result<(MeshConfig, ConfigWatcher)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --config {}", path.display()))?;
    let config = MeshConfig::parse(&text, path)?;
    Ok((config, ConfigWatcher::new(path.to_path_buf(), text)))
}

/// Connections the kernel queues per listener until the proxy accepts
/// them. A node proxy takes every pod's new connections, and a burst (a
/// deployment's pods starting at once) must not have its SYNs dropped, as
/// with the usual 128. The kernel caps it at `net.core.somaxconn` (4096 on
/// current kernels).
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener for the admin endpoint.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    listen(addr, flag, false)
}

/// A listener for proxied connections. Its accepted sockets inherit the
/// options set here (the kernel clones them from the listener), so each
/// connection costs no setsockopt of its own: Nagle off (small exchanges
/// must not wait for it in the response direction) and keep-alive probes
/// (a pod that vanished without a reset is noticed).
pub async fn bind_proxy(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    listen(addr, flag, true)
}

fn listen(addr: SocketAddr, flag: &str, proxied: bool) -> anyhow::Result<TcpListener> {
    let context = || format!("cannot listen on {flag} {addr}");
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .with_context(context)?;
    // A restarted agent must not wait for the old sockets' TIME_WAIT.
    socket.set_reuseaddr(true).with_context(context)?;
    // A new agent (a restart or an upgrade) listens beside the old one
    // while the old one drains: new connections are shared between both
    // until the old one closes its listener, when the kernel hands what it
    // had queued to the new one (with `net.ipv4.tcp_migrate_req`, which
    // node mode turns on). Both must set it, as the same user.
    socket.set_reuseport(true).with_context(context)?;
    if proxied {
        socket.set_nodelay(true).with_context(context)?;
        crate::upstream::set_keepalive(&socket2::SockRef::from(&socket)).with_context(context)?;
    }
    socket.bind(addr).with_context(context)?;
    socket.listen(LISTEN_BACKLOG).with_context(context)
}

impl Runtime {
    /// Builds the service table and starts the admin endpoint and the
    /// outlier-detection ticker. `register` adds mode-specific metrics.
    pub fn start(
        (config, watcher): (MeshConfig, ConfigWatcher),
        node: NodeContext,
        admin_listener: TcpListener,
        register: impl FnOnce(&mut Registry),
    ) -> Self {
        let metrics = ProxyMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        register(&mut registry);
        let services = Arc::new(ArcSwap::from_pointee(ServiceTable::build(
            &config, None, &node,
        )));
        let admin = Arc::new(Admin {
            registry,
            ready: false.into(),
            config: ArcSwap::from_pointee(config.clone()),
            services: Arc::clone(&services),
        });
        tokio::spawn(Arc::clone(&admin).serve(admin_listener));
        let proxy = Arc::new(Proxy {
            services,
            metrics,
            mark: node.mark,
            inbound: Default::default(),
            drain: Default::default(),
            access_log: Default::default(),
            fast_splice: Default::default(),
        });
        tokio::spawn(tick_outlier_detection(Arc::clone(&proxy)));
        Self {
            file: config.clone(),
            file_watch: tokio::sync::watch::Sender::new(config.clone()),
            sources: Vec::new(),
            complete: Arc::new(true.into()),
            known_pods: Arc::default(),
            config,
            watcher: Arc::new(Mutex::new(watcher)),
            proxy,
            admin,
            node,
        }
    }

    /// Adds a discovery source's services and pods (from now on, and each
    /// time they change) to the config file's.
    pub fn attach(&mut self, source: Box<dyn Source>) {
        let why = format!("{} attached", source.name());
        self.sources.push(source);
        self.apply_merged(&why);
    }

    /// The last good config file, now and after each change.
    pub fn watch_file(&self) -> tokio::sync::watch::Receiver<MeshConfig> {
        self.file_watch.subscribe()
    }

    /// The file's config plus the sources' current state, applied.
    fn apply_merged(&mut self, why: &str) {
        let current: Vec<_> = self
            .sources
            .iter_mut()
            .map(|s| (s.name(), s.current()))
            .collect();
        let merged = crate::discovery::merge(&self.file, &current);
        let listed = self.sources.iter().all(|s| s.listed());
        self.complete.store(listed, Ordering::Release);
        let known = current
            .iter()
            .flat_map(|(_, d)| d.known_pods.iter().cloned())
            .collect();
        *self
            .known_pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = known;
        self.apply(merged, why);
    }

    /// Puts `config` in force: the proxy's service table (state carried
    /// over), the admin view, metrics of what left.
    fn apply(&mut self, config: MeshConfig, why: &str) {
        let previous = self.proxy.services.load();
        let table = ServiceTable::build(&config, Some(&previous), &self.node);
        forget_departed(&self.proxy.metrics, &self.config, &config);
        self.proxy.services.store(Arc::new(table));
        self.admin.config.store(Arc::new(config.clone()));
        info!(
            services = config.services.len(),
            pods = config.pods.len(),
            "{why}"
        );
        self.config = config;
    }

    pub fn set_ready(&self) {
        self.admin.ready.store(true, Ordering::Release);
    }

    /// Graceful drain before exit: not ready any more, listeners closed,
    /// HTTP clients told to go; waits up to `deadline` for the client
    /// connections to end (what is left is closed when the process exits).
    pub async fn drain(&self, deadline: Duration) {
        self.admin.ready.store(false, Ordering::Release);
        let open = self.proxy.metrics.active.get();
        info!(
            open,
            ?deadline,
            "draining: no new connections; HTTP clients told to go"
        );
        let left = self.proxy.drain(deadline).await;
        if left > 0 {
            warn!(left, "drain deadline passed: closing the connections left");
        } else {
            info!("drained: no connection left");
        }
    }

    /// Until SIGTERM or Ctrl-C: every `resync`, re-reads the config file,
    /// then calls `on_tick` with the config in force and whether it just
    /// changed. `on_tick` may block (cgroup walks, eBPF map updates,
    /// nftables). Both modes await this loop in the future they give to
    /// `block_on`, on the main thread: no worker of the runtime, and no
    /// other task runs there, so blocking holds up only this loop (its next
    /// tick, the shutdown signal), never the proxy. [`off_worker`] keeps it
    /// so if the loop is ever awaited in a spawned task, on a worker.
    pub async fn run_until_shutdown(
        &mut self,
        resync: Duration,
        mut on_tick: impl FnMut(&MeshConfig, bool),
    ) {
        let mut ticker = tokio::time::interval(resync);
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            let source_changed = async {
                if self.sources.is_empty() {
                    return std::future::pending().await;
                }
                let changes = self.sources.iter_mut().map(|s| s.changed());
                let ((), index, _) = futures_util::future::select_all(changes).await;
                index
            };
            tokio::select! {
                _ = ticker.tick() => {
                    let reloaded = self.reload().await;
                    let config = &self.config;
                    off_worker(|| on_tick(config, reloaded));
                }
                index = source_changed => {
                    let why = format!("{} changed", self.sources[index].name());
                    self.apply_merged(&why);
                    let config = &self.config;
                    off_worker(|| on_tick(config, true));
                }
                _ = &mut shutdown => break,
            }
        }
    }

    /// Applies a changed config file, or reports why it was rejected (the
    /// last good config stays in force). True when a new config applied.
    /// The file is read on a blocking thread: a settling read sleeps.
    pub async fn reload(&mut self) -> bool {
        let watcher = Arc::clone(&self.watcher);
        let polled = tokio::task::spawn_blocking(move || {
            watcher
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .poll()
        })
        .await;
        let change = match polled {
            Ok(change) => change,
            Err(err) => {
                warn!(%err, "reading the config file failed; keeping the last good config");
                return false;
            }
        };
        match change {
            Change::Unchanged => false,
            Change::Invalid(err) => {
                self.reject(&err);
                false
            }
            Change::Valid(config) => {
                self.file = *config;
                self.file_watch.send_replace(self.file.clone());
                self.apply_merged("config reloaded");
                self.proxy.metrics.reload(true);
                true
            }
        }
    }

    /// Logs why a change was not applied. A file still being written is
    /// retried at the next poll and not counted as a failed reload.
    fn reject(&self, err: &Rejected) {
        warn!(error = %err, "config change rejected; keeping the last good config");
        if !err.is_transient() {
            self.proxy.metrics.reload(false);
        }
    }
}

/// Runs blocking work called from async code so that it holds up no other
/// task. Called in a task on a worker of the multi-threaded runtime, it
/// first has tokio hand that worker's other tasks to another thread
/// (`block_in_place`). Called on the thread running `block_on` (where the
/// agent's run loop is), which runs no other task, it simply runs; so it
/// does on a current-thread runtime (some tests), where it does hold up
/// that runtime's other tasks. `spawn_blocking` is used where the work can
/// be moved to a thread; this is for work that borrows its caller's state.
pub fn off_worker<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Drops the metric series of services, endpoints and pods that `new`
/// no longer has, so churn does not grow memory without bound.
fn forget_departed(metrics: &ProxyMetrics, old: &MeshConfig, new: &MeshConfig) {
    use std::collections::{HashMap, HashSet};
    let id = |s: &crate::config::Service| format!("{}/{}", s.namespace, s.name);
    // Linear in the number of services, and in the endpoints of those
    // that changed only: a discovered state of thousands of services
    // changes a few at a time, and the rest are the same shared configs
    // (recognised by address, without hashing their names).
    let ptrs = |config: &MeshConfig| -> HashSet<*const crate::config::Service> {
        config.services.iter().map(Arc::as_ptr).collect()
    };
    let (old_ptrs, new_ptrs) = (ptrs(old), ptrs(new));
    // A changed service's new version is one of the new configs.
    let fresh: HashMap<(&str, &str), &Arc<crate::config::Service>> = new
        .services
        .iter()
        .filter(|s| !old_ptrs.contains(&Arc::as_ptr(s)))
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect();
    let old_pods = || old.pods.iter().map(|p| p.uid.as_str());
    for service in &old.services {
        if new_ptrs.contains(&Arc::as_ptr(service)) {
            continue;
        }
        let now = fresh.get(&(service.namespace.as_str(), service.name.as_str()));
        let service_id = id(service);
        let Some(now) = now else {
            // The same name may stay at another VIP (the file's and a
            // source's): its series are its too.
            let stays = new
                .services
                .iter()
                .any(|s| s.namespace == service.namespace && s.name == service.name);
            if !stays {
                metrics.forget_service(&service_id, old_pods());
            }
            for ep in &service.endpoints {
                metrics.forget_endpoint(&service_id, ep.address);
            }
            continue;
        };
        let endpoints: HashSet<_> = now.endpoints.iter().map(|e| e.address).collect();
        for ep in &service.endpoints {
            if !endpoints.contains(&ep.address) {
                metrics.forget_endpoint(&service_id, ep.address);
            }
        }
    }
    let new_pods: HashSet<&str> = new.pods.iter().map(|p| p.uid.as_str()).collect();
    let mut ids: Option<Vec<String>> = None;
    for pod in &old.pods {
        if !new_pods.contains(pod.uid.as_str()) {
            let ids = ids.get_or_insert_with(|| old.services.iter().map(|s| id(s)).collect());
            metrics.forget_pod(&pod.uid, ids.iter().map(String::as_str));
        }
    }
}

/// How often outlier detection ends ejections and runs its interval
/// checks; each service's own `interval` decides when those are due.
const OUTLIER_TICK: Duration = Duration::from_millis(100);

async fn tick_outlier_detection(proxy: Arc<Proxy>) {
    let mut ticker = tokio::time::interval(OUTLIER_TICK);
    loop {
        ticker.tick().await;
        let now = std::time::Instant::now();
        for service in proxy.services.load().services() {
            for event in &service.tick_outlier(now) {
                proxy.report_outlier(service, event);
            }
        }
    }
}

/// Each proxied TCP connection holds six descriptors (two sockets, two
/// pipes); the usual soft limit of 1024 would cap the proxy at ~170.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                warn!("cannot raise the open file limit");
            }
        }
    }
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(err) => {
            warn!(%err, "cannot watch SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests;
