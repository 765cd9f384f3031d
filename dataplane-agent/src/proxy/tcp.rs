//! Opaque TCP services: connection-level policy (rate limit on new
//! connections, `maxConnections`, balancing over healthy endpoints with
//! failover on connect errors, local-origin outlier detection), then bytes
//! forwarded both ways (`relay`).

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{Proxy, relay};
use crate::health::{LocalFailure, Outcome};
use crate::metrics::RefuseReason;
use crate::ratelimit::{Decision, Request};
use crate::resilience::Limit;
use crate::state::{Chosen, Picker, Service};
use crate::upstream;

pub async fn serve(proxy: &Proxy, client: TcpStream, peer: SocketAddr, service: &Service) {
    if service.endpoints.is_empty() {
        debug!(%peer, service = %service.id, "service has no endpoints");
        return proxy.refuse(client, RefuseReason::NoEndpoints);
    }
    if !admit_rate(proxy, service, peer).await {
        return proxy.refuse(client, RefuseReason::RateLimited);
    }
    connect_and_forward(proxy, client, peer, service).await;
}

/// The part of `serve` after the rate limit: `maxConnections`, a
/// connected endpoint, then bytes both ways.
pub async fn connect_and_forward(
    proxy: &Proxy,
    client: TcpStream,
    peer: SocketAddr,
    service: &Service,
) {
    let Ok(_connection_slot) = service.breaker.try_acquire(Limit::Connections) else {
        debug!(%peer, service = %service.id, "maxConnections reached");
        return proxy.refuse(client, RefuseReason::Overflow);
    };
    let Some((upstream, chosen)) = connect_any(proxy, service).await else {
        warn!(%peer, service = %service.id, "no endpoint could be reached");
        return proxy.refuse(client, RefuseReason::UpstreamUnavailable);
    };
    proxy.record_outcome(service, chosen.index, Outcome::Success);
    forward(proxy, client, peer, service, upstream, chosen.index).await;
}

/// Splices `client` and the connection to `endpoints[index]` until both
/// are done or idle.
pub async fn forward(
    proxy: &Proxy,
    client: TcpStream,
    peer: SocketAddr,
    service: &Service,
    upstream: TcpStream,
    index: usize,
) {
    let endpoint = &service.endpoints[index];
    proxy
        .metrics
        .forwarded
        .get_or_create(&endpoint.labels)
        .inc();
    debug!(%peer, service = %service.id, endpoint = %endpoint.addr, "forwarding");
    // Active connections are the load that least-request balancing sees.
    service.balancer.on_start(index);
    let idle = service.policy().timeouts.idle;
    relay::forward(
        client,
        upstream,
        &proxy.metrics,
        idle,
        proxy.fast_splice.get(),
    )
    .await;
    service.balancer.on_end(index, None, Instant::now());
}

/// The service's rate limit, counted in new connections per second.
pub async fn admit_rate(proxy: &Proxy, service: &Service, peer: SocketAddr) -> bool {
    let Some(limiter) = &service.limiter else {
        return true;
    };
    // Decided before any await: the lookups borrow non-Send state.
    let (decision, pod) = {
        let services = proxy.services.load();
        let pod = services.pod_at(peer.ip());
        let decision = limiter.check(&Request::tcp(pod), Instant::now());
        (decision, pod.map(str::to_string))
    };
    let pod = pod.as_deref();
    match decision {
        Decision::Allow => true,
        Decision::Delay { wait, slot } => {
            proxy.metrics.rate_limited(&service.id, pod, "delayed");
            tokio::time::sleep(wait).await;
            drop(slot);
            true
        }
        Decision::Reject { .. } => {
            proxy.metrics.rate_limited(&service.id, pod, "rejected");
            false
        }
    }
}

/// Tries endpoints the balancer picks (a different one each time, among
/// those outlier detection lets through) until one connects, at most once
/// per endpoint. Failures are recorded; a success is left to the caller,
/// which knows whether the connection is used (a probe slot of a
/// half-open endpoint stays taken until then).
pub async fn connect_any(proxy: &Proxy, service: &Service) -> Option<(TcpStream, Chosen)> {
    let timeout = service.policy().timeouts.connect;
    let mut picker = Picker::new(service, None);
    while let Some(chosen) = picker.next(false) {
        let endpoint = &service.endpoints[chosen.index];
        let err = match upstream::connect(endpoint.addr, proxy.mark, timeout).await {
            Ok(stream) => return Some((stream, chosen)),
            Err(err) => err,
        };
        let failure = match err.kind() {
            std::io::ErrorKind::TimedOut => LocalFailure::ConnectTimeout,
            _ => LocalFailure::ConnectRefused,
        };
        proxy.record_outcome(service, chosen.index, Outcome::LocalFailure(failure));
        info!(service = %service.id, endpoint = %endpoint.addr, %err, "endpoint connect failed, trying the next");
    }
    None
}
