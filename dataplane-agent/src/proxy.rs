//! The node proxy: accepts captured connections, finds the service the
//! pod asked for, picks an endpoint and forwards bytes both ways.

mod forward;
mod orig_dst;
mod upstream;

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::metrics::{EndpointLabels, ProxyMetrics, RefuseReason};
use crate::state::{Service, SharedServices};

pub use orig_dst::original_dst;

/// What every connection handler needs.
pub struct Proxy {
    pub services: SharedServices,
    pub metrics: ProxyMetrics,
    /// `SO_MARK` for upstream sockets, so capture never loops them back.
    pub mark: u32,
}

impl Proxy {
    /// Accepts until the task is dropped. Each connection runs in its own
    /// task; a failure there never affects the listener.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.metrics.accepted.inc();
                    let proxy = Arc::clone(&self);
                    tokio::spawn(async move { proxy.handle(stream, peer).await });
                }
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let dst = match original_dst(&client) {
            Ok(dst) => dst,
            Err(err) => {
                debug!(%peer, %err, "no original destination");
                return self.refuse(client, RefuseReason::UnknownDestination);
            }
        };
        let Some(service) = self.services.load().get(&dst).cloned() else {
            debug!(%peer, %dst, "destination is not a mesh service");
            return self.refuse(client, RefuseReason::NoService);
        };
        if service.endpoints.is_empty() {
            debug!(%peer, service = %service.id, "service has no endpoints");
            return self.refuse(client, RefuseReason::NoEndpoints);
        }
        let Some((upstream, endpoint)) = self.connect_any(&service).await else {
            warn!(%peer, service = %service.id, "no endpoint could be reached");
            return self.refuse(client, RefuseReason::UpstreamUnavailable);
        };
        let labels = EndpointLabels {
            service: service.id.clone(),
            endpoint: endpoint.to_string(),
        };
        self.metrics.forwarded.get_or_create(&labels).inc();
        debug!(%peer, service = %service.id, %endpoint, "forwarding");
        forward::forward(client, upstream, &self.metrics).await;
    }

    /// Tries the endpoints in the balancer's order, each at most once.
    async fn connect_any(&self, service: &Service) -> Option<(TcpStream, SocketAddrV4)> {
        for index in service.balancer.attempt_order(service.endpoints.len()) {
            let endpoint = service.endpoints[index];
            match upstream::connect(endpoint, self.mark, service.connect_timeout).await {
                Ok(stream) => return Some((stream, endpoint)),
                Err(err) => {
                    info!(service = %service.id, %endpoint, %err, "endpoint connect failed, trying the next");
                    let labels = EndpointLabels {
                        service: service.id.clone(),
                        endpoint: endpoint.to_string(),
                    };
                    self.metrics.connect_errors.get_or_create(&labels).inc();
                }
            }
        }
        None
    }

    /// Closes with a reset, so the client fails at once instead of waiting.
    fn refuse(&self, client: TcpStream, reason: RefuseReason) {
        self.metrics.refuse(reason);
        forward::reset(client);
    }
}
