//! Sidecar mode's inbound side: connections redirected to the pod arrive
//! here and are handed to the application on loopback, at the port they
//! were meant for. As in Istio's sidecar, a port that serves an HTTP
//! service (the original destination is one of its endpoints) goes through
//! the HTTP path, so a request is parsed by both proxies it crosses; other
//! ports are relayed as bytes.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::DEFAULT_IDLE;

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::detect::Detected;
use super::{Proxy, original_dst, relay};
use crate::config::{self, Protocol};
use crate::metrics::RefuseReason;
use crate::state::{NodeContext, Service};
use crate::upstream;

/// The application on loopback, with the service's timeouts and no
/// retries (retrying is the caller's side's job).
fn local_app(service: &Service, dst: SocketAddrV4, mark: u32) -> Service {
    let mut cfg = config::Service::clone(&service.config);
    cfg.name = format!("inbound-{}", dst.port());
    // Not the service's VIP: the HTTP path looks services up by VIP per
    // request, and inbound requests must stay with the local application.
    cfg.vip = dst;
    cfg.protocol = Protocol::Http;
    cfg.endpoints = vec![config::Endpoint {
        address: SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()),
        weight: 1,
        region: String::new(),
        zone: String::new(),
    }];
    cfg.traffic_policy.retries.attempts = 0;
    cfg.traffic_policy.outlier_detection = None;
    cfg.traffic_policy.rate_limit = None;
    cfg.traffic_policy.fallback = None;
    let node = NodeContext {
        mark,
        locality: Default::default(),
    };
    Service::new(&std::sync::Arc::new(cfg), &node, None)
}

/// Connecting to the application in the same pod is local: a short bound.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Local applications by the address they are reached at.
#[derive(Debug, Default)]
pub struct InboundApps(Mutex<HashMap<SocketAddrV4, Arc<Service>>>);

impl Proxy {
    /// The local application behind `dst` as a one-endpoint HTTP service,
    /// if `dst` is an endpoint of an HTTP service (or of an `auto` one and
    /// the client speaks HTTP).
    fn inbound_http_app(&self, dst: SocketAddrV4) -> Option<(Arc<Service>, Protocol)> {
        let service = {
            let table = self.services.load();
            let config = table
                .configs()
                .find(|s| s.endpoints.iter().any(|ep| ep.address == dst))?;
            table.get(&config.vip).cloned()
        }?;
        let protocol = service.config.protocol;
        if protocol == Protocol::Tcp {
            return None;
        }
        let mut apps = self.inbound.0.lock().unwrap_or_else(|p| p.into_inner());
        let app = apps
            .entry(dst)
            .or_insert_with(|| Arc::new(local_app(&service, dst, self.mark)));
        Some((Arc::clone(app), protocol))
    }

    pub async fn serve_inbound(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop(listener, |proxy, stream, peer| {
            proxy.handle_inbound(stream, peer)
        })
        .await;
    }

    async fn handle_inbound(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let _active = super::ActiveConnection::new(&self.metrics);
        let Ok(dst) = original_dst(&client) else {
            return self.refuse(client, RefuseReason::UnknownDestination);
        };
        if let Some((app, protocol)) = self.inbound_http_app(dst) {
            let wait = app.policy().timeouts.protocol_detection;
            let http = protocol == Protocol::Http
                || super::detect::detect(&client, wait)
                    .await
                    .is_ok_and(|d| matches!(d, Detected::Http1 | Detected::Http2));
            if http {
                return super::http::serve(Arc::clone(&self), client, peer, app).await;
            }
        }
        let app = SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port());
        match upstream::connect(app, self.mark, LOCAL_CONNECT_TIMEOUT).await {
            // The default idle timeout: a caller's own proxy applies its
            // service's (the same by default), and a caller from outside
            // the mesh must not hold the connection forever either.
            Ok(upstream) => {
                relay::forward(client, upstream, &self.metrics, DEFAULT_IDLE, None).await
            }
            Err(err) => {
                debug!(%peer, %app, %err, "application not reachable");
                self.refuse(client, RefuseReason::UpstreamUnavailable);
            }
        }
    }
}
