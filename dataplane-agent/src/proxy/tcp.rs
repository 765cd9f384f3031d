//! Opaque TCP services: connection-level policy (rate limit on new
//! connections, `maxConnections`, balancing over healthy endpoints with
//! failover on connect errors, local-origin outlier detection), then bytes
//! forwarded with splice(2).

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::detect::{self, Detected};
use super::{Proxy, splice};
use crate::health::{LocalFailure, Outcome};
use crate::metrics::RefuseReason;
use crate::ratelimit::{Decision, Request};
use crate::resilience::Limit;
use crate::state::{Picker, Service};
use crate::upstream;

pub async fn serve(proxy: &Proxy, client: TcpStream, peer: SocketAddr, service: &Service) {
    if service.endpoints.is_empty() {
        debug!(%peer, service = %service.id, "service has no endpoints");
        return proxy.refuse(client, RefuseReason::NoEndpoints);
    }
    if !admit_rate(proxy, service, peer).await {
        return proxy.refuse(client, RefuseReason::RateLimited);
    }
    let Ok(_connection_slot) = service.breaker.try_acquire(Limit::Connections) else {
        debug!(%peer, service = %service.id, "maxConnections reached");
        return proxy.refuse(client, RefuseReason::Overflow);
    };
    let Some((upstream, index)) = connect_any(proxy, service).await else {
        warn!(%peer, service = %service.id, "no endpoint could be reached");
        return proxy.refuse(client, RefuseReason::UpstreamUnavailable);
    };
    forward(proxy, client, peer, service, upstream, index).await;
}

/// What a client that stayed silent through protocol detection became.
pub enum Silent {
    /// Served as opaque TCP, or closed.
    Done,
    /// It spoke HTTP: serve it with the full HTTP policy.
    Http(TcpStream),
}

/// `protocol: auto` and the client has sent nothing within the detection
/// timeout. It may be waiting for a server-first protocol's greeting
/// (MySQL, SMTP), or it may be an HTTP client's pooled connection opened
/// ahead of use. Pinning it as opaque would take retries, per-request
/// balancing and status-based ejection from that HTTP client for the
/// connection's whole life, so neither is assumed: an endpoint is
/// connected at once (so a greeting can reach the client) while the
/// client is still watched, and whichever side speaks first decides.
/// The server first: opaque, through that connection. The client first:
/// its bytes are detected as usual; HTTP gets the HTTP path and the unused
/// endpoint connection is closed, anything else is forwarded through it.
///
/// The price: a silent HTTP connection costs an endpoint connection that
/// carries nothing and is closed once the client speaks.
pub async fn serve_silent(
    proxy: &Proxy,
    client: TcpStream,
    peer: SocketAddr,
    service: &Service,
) -> Silent {
    let timeouts = &service.policy().timeouts;
    // Counted against maxConnections only while it may become opaque; a
    // full pool just means no early connection (an HTTP client loses
    // nothing, an opaque one is refused below as usual).
    let slot = service.breaker.try_acquire(Limit::Connections).ok();
    let mut upstream = match slot {
        Some(_) if !service.endpoints.is_empty() => connect_any(proxy, service).await,
        _ => None,
    };
    let idle = (!timeouts.idle.is_zero()).then(|| tokio::time::Instant::now() + timeouts.idle);
    let server_first = loop {
        let mut byte = [0u8; 1];
        let mut upstream_byte = [0u8; 1];
        tokio::select! {
            read = client.peek(&mut byte) => match read {
                Ok(n) if n > 0 => break false,
                // Closed or failed without a byte: nothing to serve.
                _ => return Silent::Done,
            },
            read = peek_upstream(upstream.as_ref(), &mut upstream_byte) => match read {
                Ok(n) if n > 0 => break true,
                _ => {
                    // The endpoint closed a connection nobody used (a
                    // server's own idle limit): not a greeting, so keep
                    // waiting for the client, without an endpoint.
                    debug!(%peer, service = %service.id, "endpoint closed the early connection");
                    upstream = None;
                }
            },
            () = sleep_until(idle) => {
                debug!(%peer, service = %service.id, "silent connection idle: closing");
                return Silent::Done;
            }
        }
    };
    if !server_first {
        let detected = detect::detect(&client, timeouts.protocol_detection)
            .await
            .unwrap_or(Detected::Opaque);
        if matches!(detected, Detected::Http1 | Detected::Http2) {
            return Silent::Http(client);
        }
    }
    if !admit_rate(proxy, service, peer).await {
        proxy.refuse(client, RefuseReason::RateLimited);
        return Silent::Done;
    }
    let Some(_connection_slot) = slot else {
        debug!(%peer, service = %service.id, "maxConnections reached");
        proxy.refuse(client, RefuseReason::Overflow);
        return Silent::Done;
    };
    let connected = match upstream {
        Some(connected) => Some(connected),
        None if service.endpoints.is_empty() => {
            proxy.refuse(client, RefuseReason::NoEndpoints);
            return Silent::Done;
        }
        None => connect_any(proxy, service).await,
    };
    match connected {
        Some((upstream, index)) => forward(proxy, client, peer, service, upstream, index).await,
        None => {
            warn!(%peer, service = %service.id, "no endpoint could be reached");
            proxy.refuse(client, RefuseReason::UpstreamUnavailable);
        }
    }
    Silent::Done
}

async fn peek_upstream(
    upstream: Option<&(TcpStream, usize)>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match upstream {
        Some((stream, _)) => stream.peek(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Splices `client` and the connection to `endpoints[index]` until both
/// are done or idle.
async fn forward(
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
    // Both sides, so that a vanished client is noticed too.
    let _ = upstream::set_keepalive(&socket2::SockRef::from(&client));
    debug!(%peer, service = %service.id, endpoint = %endpoint.addr, "forwarding");
    // Active connections are the load that least-request balancing sees.
    service.balancer.on_start(index);
    let idle = service.policy().timeouts.idle;
    splice::forward(client, upstream, &proxy.metrics, idle).await;
    service.balancer.on_end(index, None, Instant::now());
}

/// The service's rate limit, counted in new connections per second.
async fn admit_rate(proxy: &Proxy, service: &Service, peer: SocketAddr) -> bool {
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
/// per endpoint.
async fn connect_any(proxy: &Proxy, service: &Service) -> Option<(TcpStream, usize)> {
    let timeout = service.policy().timeouts.connect;
    let mut picker = Picker::new(service, None);
    while let Some(chosen) = picker.next(false) {
        let index = chosen.index;
        let endpoint = &service.endpoints[index];
        let result = upstream::connect(endpoint.addr, proxy.mark, timeout).await;
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                Outcome::LocalFailure(LocalFailure::ConnectTimeout)
            }
            Err(_) => Outcome::LocalFailure(LocalFailure::ConnectRefused),
        };
        proxy.record_outcome(service, index, outcome);
        match result {
            Ok(stream) => return Some((stream, index)),
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
