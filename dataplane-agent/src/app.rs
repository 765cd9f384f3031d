//! Wiring of the running agent. Node mode ([`run`]), in start-up order:
//! config, listeners, capture programs loaded, their tables filled from
//! the config (the reconciler), programs attached, metrics, admin, proxy,
//! then the reconcile loop. Sidecar mode is in [`sidecar`]; what both
//! share in [`runtime`]; the `status` command in [`status`]; the async
//! runtime's threads in [`threads`].

pub mod runtime;
pub mod sidecar;
pub mod status;
pub mod threads;

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::capture::reconcile::Reconciler;
use crate::capture::{self, Capture, CaptureConfig};
use crate::metrics::CaptureCollector;
use crate::state::NodeContext;
use runtime::{Runtime, raise_fd_limit};

/// Node-level settings, from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: PathBuf,
    pub proxy_addr: SocketAddrV4,
    pub admin_addr: SocketAddr,
    pub pods_cgroup: PathBuf,
    pub proxy_cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub mark: u32,
    pub node: NodeContext,
    pub resync: Duration,
    /// How long a stopping agent waits for connections to finish.
    pub drain_timeout: Duration,
    /// Log every HTTP request.
    pub access_log: bool,
    /// What captured connects do while no proxy listens.
    pub fail_mode: capture::FailMode,
    /// The kernel fast path between pods and the proxy.
    pub fast_path: capture::fast::FastPath,
    /// The service registry, if one is used.
    pub registry: Option<crate::registry::source::RegistryConfig>,
    /// The Kubernetes API server, if it is read.
    pub kubernetes: Option<crate::kubernetes::KubernetesConfig>,
    /// Where the CNI plugin asks the agent to enroll new pods.
    pub cni_socket: PathBuf,
    /// Installs the CNI plugin on the node, if the agent does.
    pub cni_install: Option<crate::cni::install::Installer>,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let (config, watcher) = runtime::load_config(&settings.config)?;
    raise_fd_limit();
    enable_listener_handover();
    let listener = runtime::bind_proxy(settings.proxy_addr.into(), "--proxy-addr").await?;
    let admin_listener = runtime::bind(settings.admin_addr, "--admin-addr").await?;

    let pods_cgroup = capture::resolve_cgroup(&settings.pods_cgroup)?;
    let proxy_cgroup = match &settings.proxy_cgroup {
        Some(path) => capture::resolve_cgroup(path)?,
        None => capture::cgroup::own_cgroup()?,
    };
    capture::cgroup::check_member(&proxy_cgroup).context(
        "the proxy's cgroup does not hold this process (private cgroup namespace?); \
         pass --proxy-cgroup",
    )?;
    let fast_path = settings.fast_path == capture::fast::FastPath::On && fast_path_supported();
    let capture_cfg = CaptureConfig {
        pin_dir: settings.pin_dir.clone(),
        pods_cgroup: pods_cgroup.clone(),
        proxy_cgroup: proxy_cgroup.clone(),
        proxy_addr: settings.proxy_addr,
        proxy_mark: settings.mark,
        fail_mode: settings.fail_mode,
        fast_path,
    };
    let Capture {
        mut tables,
        mut programs,
        splicer,
    } = Capture::load(&capture_cfg).context("loading the capture programs")?;
    // From here on the connect hooks know a proxy listens (the kernel
    // forgets it the instant this listener closes).
    tables
        .register_listener(&listener)
        .context("registering the proxy's listener for the connect hooks")?;
    let stats = tables.stats();
    // The sources first (the registry's snapshot is read at once): the
    // services map the programs share with a running agent is then never
    // synced to the file's services alone, which would drop the registry's
    // VIPs from capture for a moment. The Kubernetes source has nothing
    // before its first listing: until then the tables are only added to.
    let registry_metrics = crate::registry::metrics::RegistryMetrics::default();
    let kubernetes_metrics = crate::kubernetes::metrics::KubernetesMetrics::default();
    let mut sources: Vec<Box<dyn crate::discovery::Source>> = Vec::new();
    let mut kubernetes_state = None;
    if let Some(cfg) = settings.registry.clone() {
        info!(endpoints = ?cfg.access.endpoints, prefix = %cfg.prefix, "reading the service registry");
        let rx = crate::registry::source::start(cfg, registry_metrics.clone());
        sources.push(Box::new(crate::registry::RegistryFeed(rx)));
    }
    if let Some(cfg) = &settings.kubernetes {
        // Checked here, so that a bad kubeconfig stops the agent with a
        // clear error; the source makes its own on its own thread.
        crate::kubernetes::client(cfg).await?;
        info!(node = %cfg.node, "reading the Kubernetes API server");
        let rx = crate::kubernetes::source::start(cfg, kubernetes_metrics.clone())
            .context("starting the Kubernetes source's thread")?;
        kubernetes_state = Some(rx.clone());
        sources.push(Box::new(crate::discovery::Feed::new("kubernetes", rx)));
    }
    let initial = {
        let current: Vec<_> = sources
            .iter_mut()
            .map(|s| (s.name(), s.current()))
            .collect();
        crate::discovery::merge(&config, &current)
    };
    // Until every source has listed, the tables are only added to: the
    // pinned tables a running agent (or the one before this) filled keep
    // what this agent does not know yet.
    let complete = sources.iter().all(|s| s.listed());
    // Tables first, links second: the programs capture from the instant
    // they are attached, even when their tables are new, empty maps (a new
    // maps directory, or a pinned map of another layout replaced); until
    // then a previous agent's programs keep capturing with their own.
    let node_seed = u32::from(*settings.proxy_addr.ip()) as usize;
    let mut reconciler = Reconciler::start(
        tables,
        pods_cgroup,
        proxy_cgroup,
        node_seed,
        &initial,
        complete,
    );
    programs
        .attach()
        .context("attaching the capture programs")?;
    if let Some(logger) = programs.take_logger() {
        tokio::spawn(pump_ebpf_logs(logger));
    }

    let cni_metrics = crate::cni::CniMetrics::default();
    let heap_metrics = crate::metrics::heap::HeapMetrics::default();
    let fast_path_active = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    fast_path_active.set(i64::from(fast_path));
    let mut rt = Runtime::start(
        (config, watcher),
        settings.node.clone(),
        admin_listener,
        |r| {
            r.register_collector(Box::new(CaptureCollector(stats)));
            r.register(
                "dataplane_fast_path_active",
                "1 when data between pods and the proxy on this node goes socket to socket (--fast-path on, supported by the kernel)",
                fast_path_active,
            );
            if settings.registry.is_some() {
                registry_metrics.register(r);
            }
            if settings.kubernetes.is_some() {
                kubernetes_metrics.register(r);
            }
            cni_metrics.register(r);
            heap_metrics.register(r);
        },
    );
    if !sources.is_empty() {
        for source in sources {
            rt.attach(source);
        }
        reconciler.services(&rt.config);
    }
    if let Some(cfg) = settings.registry.as_ref().filter(|c| c.publish) {
        crate::registry::publish::start(cfg.access.clone(), cfg.prefix.clone(), rt.watch_file());
    }
    // With the fast path on, opaque connections may be spliced past the
    // proxy, and a direction moves to splice(2) only once its sender is
    // on TCP (splice does not see the fast path's queue; see
    // `relay::forward`).
    if let Some(splicer) = splicer {
        let _ = rt.proxy.fast_splice.set(splicer);
    }
    if !capture_cfg.fast_path {
        info!("kernel fast path {}", capture::fast::describe(false));
    }
    tokio::spawn(Arc::clone(&rt.proxy).serve(listener));
    // New pods are enrolled by the CNI plugin from here on (the state it
    // decides by is in force).
    let cni_listening = match crate::cni::listen(&settings.cni_socket) {
        Ok(cni) => {
            info!(socket = %settings.cni_socket.display(), "CNI plugin socket ready");
            tokio::spawn(crate::cni::serve(
                cni,
                crate::cni::Context {
                    enroller: reconciler.enroller(),
                    admin: Arc::clone(&rt.admin),
                    kubernetes: kubernetes_state.clone(),
                    metrics: cni_metrics.clone(),
                },
            ));
            true
        }
        Err(err) => {
            warn!(
                socket = %settings.cni_socket.display(),
                %err,
                "cannot listen for the CNI plugin: new pods are enrolled by the cgroup watcher only"
            );
            false
        }
    };
    // Added to the node's network configuration only once the socket
    // answers, so that no pod waits on an agent not listening yet; never
    // without it (the plugin, failPolicy closed, would hold every new pod
    // of the node).
    if settings.cni_install.is_some() && !cni_listening {
        warn!("the CNI plugin is not installed: this agent cannot answer it");
    }
    let mut cni_install = settings
        .cni_install
        .clone()
        .filter(|_| cni_listening)
        .map(|installer| {
            crate::cni::install::Keeper::new(installer, cni_metrics.installed.clone())
        });
    if let Some(keeper) = &mut cni_install {
        runtime::off_worker(|| keeper.pass());
    }
    let mut fail_open_log = crate::cni::FailOpenLog::new(
        crate::cni::fail_open_log_path(&settings.cni_socket),
        cni_metrics,
    );
    rt.proxy
        .access_log
        .store(settings.access_log, std::sync::atomic::Ordering::Relaxed);
    rt.set_ready();
    info!(proxy = %settings.proxy_addr, admin = %settings.admin_addr, "agent ready");

    let sources_complete = Arc::clone(&rt.complete);
    let known_pods = Arc::clone(&rt.known_pods);
    let mut ticks: u32 = 0;
    let mut enrolled_for = None;
    rt.run_until_shutdown(settings.resync, |config, reloaded| {
        let complete = sources_complete.load(std::sync::atomic::Ordering::Acquire);
        reconciler.set_complete(complete);
        // Pods first: a namespace that just got a tenant has its pods'
        // tenant written before its services', so its own pods are never
        // refused by them meanwhile. `known` is of the same state as
        // `config`.
        let known = known_pods.lock().map(|k| k.clone()).unwrap_or_default();
        // Every periodic tick walks the cgroups; a change of services
        // alone (most of a large cluster's changes) does not.
        let pods = (config.pods.clone(), known, complete);
        if !reloaded || enrolled_for.as_ref() != Some(&pods) {
            reconciler.enrollment(config, &pods.1);
            enrolled_for = Some(pods);
        }
        if reloaded {
            reconciler.services(config);
        } else {
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(VERIFY_SERVICES_EVERY) {
                reconciler.verify_services(config);
            }
            if let Some(keeper) = &mut cni_install {
                keeper.pass();
            }
        }
        heap_metrics.refresh();
        reconciler.check_kernel_counters();
        fail_open_log.check();
    })
    .await;
    rt.drain(settings.drain_timeout).await;
    info!("stopping; pods stay captured (run `dataplane-agent cleanup` to uninstall)");
    // The getsockopt attachment (not pinned) lived as long as the programs.
    drop(programs);
    Ok(())
}

/// Every this many periodic ticks, the kernel's service and export maps
/// are read back and repaired (between two, the agent diffs against what
/// it wrote).
const VERIFY_SERVICES_EVERY: u32 = 12;

/// The kernel setting that makes a restart or upgrade lose no connection:
/// when the old agent closes its listening socket, the connections queued
/// on it (handshake done, not yet accepted) move to the new agent's socket
/// in the same `SO_REUSEPORT` group instead of being reset. Per network
/// namespace, so the node's (the agent runs in it). Where `/proc/sys` is
/// read-only (a container), the node must set it; the agent says so.
fn enable_listener_handover() {
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    if std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(err) = std::fs::write(SYSCTL, "1") {
        warn!(
            %err,
            "cannot set net.ipv4.tcp_migrate_req=1: during a restart or upgrade, connections \
             queued at the old agent's listener may be reset; set it on the node"
        );
    }
}

/// Whether the kernel can run the fast path (`--fast-path on`): its
/// programs key sockets by network namespace cookie (in sock_ops and
/// sk_msg programs since Linux 5.15). If not, the agent runs without it
/// and says why.
fn fast_path_supported() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if !capture::fast::kernel_at_least(&release, (5, 15)) {
        warn!(kernel = %release.trim(), "kernel fast path needs Linux 5.15 or later: running without it");
        return false;
    }
    match capture::fast::own_netns_cookie() {
        Ok(_) => true,
        Err(err) => {
            warn!(%err, "kernel fast path unavailable on this kernel: running without it");
            false
        }
    }
}

/// Forwards the eBPF programs' log records whenever their ring buffer has
/// data.
async fn pump_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and keeps it open for as
    // long as the AsyncFd (which owns the logger) exists.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(err) => return warn!(%err, "cannot poll the eBPF log buffer"),
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(err) => return warn!(%err, "eBPF log buffer failed"),
        }
    }
}
