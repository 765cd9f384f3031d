//! The node proxy: accepts captured connections, finds the service the
//! pod asked for, picks an endpoint and forwards bytes both ways.

mod detect;
pub mod drain;
pub mod http;
mod inbound;
mod orig_dst;
mod relay;
mod silent;
mod tcp;

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::config::Protocol;
use crate::metrics::{ProxyMetrics, RefuseReason};
use crate::state::{Service, SharedServices};
use detect::Detected;

pub use orig_dst::original_dst;

/// What every connection handler needs.
pub struct Proxy {
    pub services: SharedServices,
    pub metrics: ProxyMetrics,
    /// `SO_MARK` for upstream sockets, so capture never loops them back.
    pub mark: u32,
    /// Sidecar mode: the local application behind each inbound HTTP port,
    /// as a one-endpoint service (kept so its pool is reused).
    pub inbound: inbound::InboundApps,
    /// Set on shutdown: listeners stop, connections are told to go.
    pub drain: drain::Drain,
    /// Log every HTTP request (`--access-log`).
    pub access_log: std::sync::atomic::AtomicBool,
    /// With the kernel fast path on: opaque connections between pods on
    /// this node are spliced past the proxy (see `relay`).
    pub fast_splice: std::sync::OnceLock<Arc<crate::capture::fast::Splicer>>,
}

impl Proxy {
    pub fn new(services: SharedServices, metrics: ProxyMetrics, mark: u32) -> Self {
        Self {
            services,
            metrics,
            mark,
            inbound: Default::default(),
            drain: Default::default(),
            access_log: Default::default(),
            fast_splice: Default::default(),
        }
    }

    /// Drains (see [`drain`]): waits until no client connection is left or
    /// `deadline` passes; returns how many are left.
    pub async fn drain(&self, deadline: std::time::Duration) -> i64 {
        drain::drain(&self.drain, &self.metrics, deadline).await
    }

    /// Accepts until the task is dropped or the proxy drains; each
    /// connection is handled in its own task, so a failure there never
    /// affects the listener.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop(listener, |proxy, stream, peer| {
            proxy.handle(stream, peer, None)
        })
        .await;
    }

    /// Serves every connection of `listener` as a connection to the
    /// service at `vip`, without asking for the original destination: a
    /// listener dedicated to one service (a gateway port), and how the
    /// request path is tested in-process.
    pub async fn serve_service(self: Arc<Self>, listener: TcpListener, vip: SocketAddrV4) {
        self.accept_loop(listener, move |proxy, stream, peer| {
            proxy.handle(stream, peer, Some(vip))
        })
        .await;
    }

    /// The one accept loop of every listener: count, spawn `handle`; stop
    /// when the proxy drains. Accepted sockets come with Nagle off and
    /// keep-alive on, from the listener (`app::runtime::bind_proxy`).
    async fn accept_loop<F, Fut>(self: Arc<Self>, listener: TcpListener, handle: F)
    where
        F: Fn(Arc<Self>, TcpStream, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let drained = self.drain.signalled();
        tokio::pin!(drained);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut drained => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    self.metrics.accepted.inc();
                    tokio::spawn(handle(Arc::clone(&self), stream, peer));
                }
                Err(err) => {
                    warn!(%err, "accept failed");
                    // Out of descriptors or memory: back off instead of
                    // spinning. Errors about one connection (a client
                    // reset before accept) need no pause.
                    let exhausted = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM];
                    if err.raw_os_error().is_some_and(|e| exhausted.contains(&e)) {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        fixed: Option<SocketAddrV4>,
    ) {
        let _active = ActiveConnection::new(&self.metrics);
        let dst = match fixed.map_or_else(|| original_dst(&client), Ok) {
            Ok(dst) => dst,
            Err(err) => {
                debug!(%peer, %err, "no original destination");
                return self.refuse(client, RefuseReason::UnknownDestination);
            }
        };
        let table = self.services.load();
        let Some(service) = table.get(&dst).cloned() else {
            debug!(%peer, %dst, "destination is not a mesh service");
            return self.refuse(client, RefuseReason::NoService);
        };
        // Tenant isolation, again after the connect hooks: the caller is
        // known by its pod address. One the proxy cannot place yet (its
        // address not delivered: a pod just created) passed the connect
        // hook's check, which knew its tenant, to get an original
        // destination at all: it is admitted.
        let known = table.tenant_at(peer.ip());
        if let Some(tenant) = known
            && !service.config.admits(tenant)
        {
            debug!(%peer, %dst, tenant = tenant.unwrap_or_default(), "tenant may not call the service");
            let labels = crate::metrics::TenantLabels {
                tenant: tenant.unwrap_or_default().to_string(),
                service: service.id.clone(),
            };
            self.metrics.tenant_denied.get_or_create(&labels).inc();
            return self.refuse(client, RefuseReason::TenantDenied);
        }
        drop(table);
        let protocol = match service.config.protocol {
            Protocol::Tcp => Detected::Opaque,
            Protocol::Http => Detected::Http1,
            Protocol::Auto => {
                let wait = service.policy().timeouts.protocol_detection;
                detect::detect(&client, wait)
                    .await
                    .unwrap_or(Detected::Opaque)
            }
        };
        match protocol {
            Detected::Opaque => tcp::serve(&self, client, peer, &service).await,
            Detected::Silent => {
                if let silent::Silent::Http(client) =
                    silent::serve(&self, client, peer, &service).await
                {
                    http::serve(self, client, peer, service).await;
                }
            }
            Detected::Http1 | Detected::Http2 => http::serve(self, client, peer, service).await,
        }
    }

    /// Records how `endpoints[index]` did and reports the state change it
    /// causes (log, metric): the one way TCP and HTTP feed outlier
    /// detection, and where connect failures are counted.
    pub fn record_outcome(&self, service: &Service, index: usize, outcome: crate::health::Outcome) {
        use crate::health::{LocalFailure, Outcome};
        if let Outcome::LocalFailure(LocalFailure::ConnectRefused | LocalFailure::ConnectTimeout) =
            outcome
            && let Some(endpoint) = service.endpoints.get(index)
        {
            self.metrics
                .connect_errors
                .get_or_create(&endpoint.labels)
                .inc();
        }
        if let Some(event) = service.record_outcome(index, outcome) {
            self.report_outlier(service, &event);
        }
    }

    pub fn report_outlier(&self, service: &Service, event: &crate::health::Event) {
        let endpoint = service.endpoint_addr(event.idx());
        self.metrics.outlier_event(&service.id, endpoint, event);
    }

    /// Closes with a reset, so the client fails at once instead of waiting.
    pub fn refuse(&self, client: TcpStream, reason: RefuseReason) {
        self.metrics.refuse(reason);
        relay::reset(client);
    }
}

/// Counts a client connection in `dataplane_proxy_active_connections`
/// for as long as it is open, whatever its protocol.
struct ActiveConnection(prometheus_client::metrics::gauge::Gauge);

impl ActiveConnection {
    fn new(metrics: &ProxyMetrics) -> Self {
        metrics.active.inc();
        Self(metrics.active.clone())
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
