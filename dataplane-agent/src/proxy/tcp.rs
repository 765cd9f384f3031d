//! Opaque TCP services: pick an endpoint, connect (failing over to the
//! next endpoint), then forward bytes with splice(2).

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{Proxy, forward, upstream};
use crate::metrics::RefuseReason;
use crate::state::{Endpoint, Service};

pub async fn serve(proxy: &Proxy, client: TcpStream, peer: SocketAddr, service: &Service) {
    if service.endpoints.is_empty() {
        debug!(%peer, service = %service.id, "service has no endpoints");
        return proxy.refuse(client, RefuseReason::NoEndpoints);
    }
    let Some((upstream, endpoint)) = connect_any(proxy, service).await else {
        warn!(%peer, service = %service.id, "no endpoint could be reached");
        return proxy.refuse(client, RefuseReason::UpstreamUnavailable);
    };
    proxy
        .metrics
        .forwarded
        .get_or_create(&endpoint.labels)
        .inc();
    // Both sides, so that a vanished client is noticed too.
    let _ = upstream::set_keepalive(&socket2::SockRef::from(&client));
    debug!(%peer, service = %service.id, endpoint = %endpoint.addr, "forwarding");
    forward::forward(client, upstream, &proxy.metrics).await;
}

/// Tries the endpoints in the balancer's order, each at most once.
async fn connect_any<'s>(proxy: &Proxy, service: &'s Service) -> Option<(TcpStream, &'s Endpoint)> {
    let timeout = service.policy().timeouts.connect;
    for index in service.balancer.attempt_order(service.endpoints.len()) {
        let endpoint = &service.endpoints[index];
        match upstream::connect(endpoint.addr, proxy.mark, timeout).await {
            Ok(stream) => return Some((stream, endpoint)),
            Err(err) => {
                info!(service = %service.id, endpoint = %endpoint.addr, %err, "endpoint connect failed, trying the next");
                proxy
                    .metrics
                    .connect_errors
                    .get_or_create(&endpoint.labels)
                    .inc();
            }
        }
    }
    None
}
