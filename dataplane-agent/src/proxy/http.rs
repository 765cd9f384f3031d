//! HTTP services: the client connection is served by hyper (HTTP/1.1 with
//! keep-alive, or HTTP/2 with prior knowledge), and every request goes
//! through the service's policies on its own (see `forward`).

mod body;
mod forward;
mod guard;
pub mod headers;
mod reply;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::debug;

use super::Proxy;
use crate::state::Service;

/// Largest request head accepted; larger ones get 431 (Envoy's default
/// limit is 60 KiB).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves one client connection until it closes. Malformed requests are
/// answered by hyper (400, or 431 for oversize heads) and only affect this
/// connection.
///
/// Each request uses the service's current version: a config change applies
/// to the next request on a keep-alive connection, not only to new
/// connections. If the service was removed, the connection's version
/// finishes the job.
pub async fn serve(proxy: Arc<Proxy>, client: TcpStream, peer: SocketAddr, service: Arc<Service>) {
    let idle = service.policy().timeouts.idle;
    let vip = service.config.vip;
    // Only a weak reference: an open connection must not keep an old
    // version (and its pools) alive after a reload.
    let version = Arc::downgrade(&service);
    drop(service);
    let handler = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let current = proxy.services.load().get(&vip).cloned();
        let service = current.or_else(|| version.upgrade());
        async move {
            Ok::<_, Infallible>(match service {
                Some(service) => forward::handle(&proxy, &service, req, peer).await,
                None => reply::error(http::StatusCode::SERVICE_UNAVAILABLE, "no_service"),
            })
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    if !idle.is_zero() {
        // Closes keep-alive connections that send no new request in time.
        builder.http1().header_read_timeout(idle);
    }
    builder.http2().timer(TokioTimer::new());
    if let Err(err) = builder
        .serve_connection(TokioIo::new(client), handler)
        .await
    {
        debug!(%peer, %err, "HTTP connection ended with an error");
    }
}
