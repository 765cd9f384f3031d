//! Wiring of the running agent, in start-up order: config, listeners,
//! capture, metrics, admin, proxy, then the reconcile loop.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::Admin;
use crate::capture::reconcile::Reconciler;
use crate::capture::{self, Capture, CaptureConfig};
use crate::config::MeshConfig;
use crate::metrics::{CaptureCollector, ProxyMetrics};
use crate::proxy::Proxy;
use crate::reload::{Change, ConfigWatcher};
use crate::state::{NodeContext, ServiceTable};

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
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&settings.config)
        .with_context(|| format!("cannot read --config {}", settings.config.display()))?;
    let mut config = MeshConfig::parse(&text, &settings.config)?;
    let mut watcher = ConfigWatcher::new(settings.config.clone(), text);
    raise_fd_limit();
    let listener = TcpListener::bind(settings.proxy_addr)
        .await
        .with_context(|| format!("cannot listen on --proxy-addr {}", settings.proxy_addr))?;
    let admin_listener = TcpListener::bind(settings.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", settings.admin_addr))?;

    let pods_cgroup = capture::resolve_cgroup(&settings.pods_cgroup)?;
    let proxy_cgroup = match &settings.proxy_cgroup {
        Some(path) => capture::resolve_cgroup(path)?,
        None => capture::cgroup::own_cgroup()?,
    };
    capture::cgroup::check_member(&proxy_cgroup).context(
        "the proxy's cgroup does not hold this process (private cgroup namespace?); \
         pass --proxy-cgroup",
    )?;
    let mut capture = Capture::install(&CaptureConfig {
        pin_dir: settings.pin_dir.clone(),
        pods_cgroup: pods_cgroup.clone(),
        proxy_cgroup: proxy_cgroup.clone(),
        proxy_addr: settings.proxy_addr,
        proxy_mark: settings.mark,
    })
    .context("installing the capture programs")?;
    if let Some(logger) = capture.take_logger() {
        tokio::spawn(pump_ebpf_logs(logger));
    }

    let metrics = ProxyMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(CaptureCollector(capture.tables.stats())));
    let admin = Arc::new(Admin {
        registry,
        ready: false.into(),
        config: ArcSwap::from_pointee(config.clone()),
    });
    tokio::spawn(Arc::clone(&admin).serve(admin_listener));

    let proxy = Arc::new(Proxy {
        services: Arc::new(ArcSwap::from_pointee(ServiceTable::build(
            &config,
            None,
            &settings.node,
        ))),
        metrics,
        mark: settings.mark,
    });
    tokio::spawn(Arc::clone(&proxy).serve(listener));
    tokio::spawn(tick_outlier_detection(Arc::clone(&proxy)));

    let mut reconciler = Reconciler::new(capture.tables, pods_cgroup, proxy_cgroup);
    reconciler.services(&config);
    reconciler.enrollment(&config);
    admin.ready.store(true, Ordering::Release);
    info!(proxy = %settings.proxy_addr, admin = %settings.admin_addr, "agent ready");

    let mut resync = tokio::time::interval(settings.resync);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = resync.tick() => {
                if let Some(new) = reload(&mut watcher, &proxy, &admin, &settings.node) {
                    config = new;
                    reconciler.services(&config);
                }
                reconciler.enrollment(&config);
                reconciler.check_kernel_counters();
            }
            _ = &mut shutdown => break,
        }
    }
    info!("stopping; pods stay captured (run `dataplane-agent cleanup` to uninstall)");
    Ok(())
}

/// Applies a changed config file, or reports why it was rejected (the
/// last good config stays in force).
fn reload(
    watcher: &mut ConfigWatcher,
    proxy: &Proxy,
    admin: &Admin,
    node: &NodeContext,
) -> Option<MeshConfig> {
    match watcher.poll() {
        Change::Unchanged => None,
        Change::Invalid(err) => {
            warn!(error = %err, "config change rejected; keeping the last good config");
            proxy.metrics.reload(false);
            None
        }
        Change::Valid(config) => {
            let table = ServiceTable::build(&config, Some(&proxy.services.load()), node);
            proxy.services.store(Arc::new(table));
            admin.config.store(Arc::new((*config).clone()));
            proxy.metrics.reload(true);
            info!(
                services = config.services.len(),
                pods = config.pods.len(),
                "config reloaded"
            );
            Some(*config)
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
            let events = match service.outlier() {
                Some(mut outlier) => outlier.tick(now),
                None => continue,
            };
            for event in &events {
                proxy.metrics.outlier_event(service, event);
            }
        }
    }
}

/// Each proxied TCP connection holds six descriptors (two sockets, two
/// pipes); the usual soft limit of 1024 would cap the proxy at ~170.
fn raise_fd_limit() {
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

async fn shutdown_signal() {
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
