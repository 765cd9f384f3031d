//! HTTP services: the client connection is served by hyper (HTTP/1.1 with
//! keep-alive, or HTTP/2 with prior knowledge), and every request goes
//! through the service's policies on its own (see `request`).

mod attempt;
pub mod grpc;
mod guard;
pub mod headers;
mod replay;
mod reply;
mod request;
mod timers;
mod translate;
mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::debug;

use super::Proxy;
use crate::metrics::IdleKind;
use crate::state::Service;
use guard::GuardedBody;
use timers::{Activity, WatchedIo};

/// How long a draining proxy keeps an idle HTTP/1.1 keep-alive connection
/// open. Closing it at once races a client sending its next request on it
/// that instant (the request fails with the connection closed, and a
/// client that does not retry on a reused connection reports it); kept
/// open, the next request is answered with `Connection: close`, and the
/// client reconnects (to the next agent, in an upgrade). A client that
/// sends nothing for this long is closed then, with a far smaller chance of
/// that race. Two seconds covers clients sending at least every 2 s and
/// adds at most that to a drain.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);

/// Largest request head accepted; larger ones get 431 (Envoy's default
/// limit is 60 KiB).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves one client connection until it closes. Malformed requests are
/// answered by hyper (400, or 431 for oversize heads) and only affect this
/// connection; they never reach an endpoint or its health.
///
/// Each request uses the service's current version: a config change applies
/// to the next request on a keep-alive connection, not only to new
/// connections. If the service was removed, the connection's version
/// finishes the job.
pub async fn serve(proxy: Arc<Proxy>, client: TcpStream, peer: SocketAddr, service: Arc<Service>) {
    let timeouts = service.policy().timeouts.clone();
    let vip = service.config.vip;
    // Only a weak reference: an open connection must not keep an old
    // version (and its pools) alive after a reload.
    let version = Arc::downgrade(&service);
    drop(service);
    let activity = Activity::new();
    let requests = Arc::clone(&activity);
    let stalls = proxy.metrics.idle_timeouts(IdleKind::HttpStream);
    let draining = Arc::clone(&proxy);
    let drain = &draining.drain;
    let handler = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let current = proxy.services.load().get(&vip).cloned();
        let service = current.or_else(|| version.upgrade());
        let in_flight = requests.request_started();
        let stalls = stalls.clone();
        // Draining (see `DRAIN_IDLE_GRACE`): hyper closes the connection
        // after a response that says so. Decided here: the handler runs in
        // the connection's task, so a drain that starts later finds this
        // request in flight and shuts the connection down gracefully.
        let close = req.version() < http::Version::HTTP_2 && requests.closing();
        async move {
            // The current version's: a reload of `idle` applies to the
            // next request of an open connection too.
            let stall_limit = service
                .as_ref()
                .map_or(Duration::ZERO, |s| s.policy().timeouts.idle);
            let (mut response, slot) = match service {
                Some(service) => request::handle(&proxy, &service, req, peer).await,
                None => (
                    reply::error(http::StatusCode::SERVICE_UNAVAILABLE, "no_service"),
                    None,
                ),
            };
            if close {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            // One wrapper holds both until the body is done: the request's
            // maxRequests slot and the connection's in-flight mark.
            let held = (in_flight, slot);
            Ok::<_, Infallible>(
                response.map(|body| GuardedBody::wrap(body, held, stall_limit, &stalls)),
            )
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        // Our own timers tell a slow header from an idle keep-alive
        // connection (hyper's one timer covers both).
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let io = TokioIo::new(WatchedIo::new(client, Arc::clone(&activity)));
    let connection = builder.serve_connection_with_upgrades(io, handler);
    tokio::pin!(connection);
    let mut told_to_go = false;
    // Armed when the drain finds an idle HTTP/1 connection.
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    let mut grace_armed = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    debug!(%peer, %err, "HTTP connection ended with an error");
                }
                return;
            }
            why = activity.expired(timeouts.header_read, timeouts.idle) => {
                debug!(%peer, why, "closing HTTP connection");
                return;
            }
            // Draining: HTTP/2 sends GOAWAY and HTTP/1.1 closes after the
            // response in flight (`Connection: close`), so the connection
            // ends once what is in flight is answered. An idle HTTP/1.1
            // connection stays open for its next request (answered with
            // `Connection: close`) until `DRAIN_IDLE_GRACE` passes.
            () = drain.signalled(), if !told_to_go => {
                told_to_go = true;
                activity.close_after_responses();
                if activity.is_http2() || activity.busy() {
                    connection.as_mut().graceful_shutdown();
                } else {
                    grace.as_mut().reset(tokio::time::Instant::now() + DRAIN_IDLE_GRACE);
                    grace_armed = true;
                }
            }
            () = grace.as_mut(), if grace_armed => {
                grace_armed = false;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
