//! Upstream HTTP clients of one service: connection pools per endpoint,
//! HTTP/1.1 and HTTP/2, with the proxy's socket mark and the service's
//! connect timeout.

use std::future::Future;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::proxy::upstream;
use crate::resilience::{CircuitBreaker, Limit, Permit, Tripped};

/// Request and response bodies inside the proxy.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to one endpoint, within the service's `maxConnections`
/// circuit breaker. Bound to the endpoint rather than reading the URI, so
/// that the request URI can keep the client's authority (HTTP/2
/// `:authority`).
#[derive(Clone, Debug)]
pub struct Connector {
    pub endpoint: SocketAddrV4,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub breaker: Arc<CircuitBreaker>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (endpoint, mark, timeout) = (self.endpoint, self.mark, self.connect_timeout);
        let breaker = Arc::clone(&self.breaker);
        Box::pin(async move {
            let permit = breaker
                .try_acquire(Limit::Connections)
                .map_err(std::io::Error::other)?;
            let stream = upstream::connect(endpoint, mark, timeout).await?;
            Ok(Conn {
                io: TokioIo::new(stream),
                _permit: permit,
            })
        })
    }
}

/// Idle connections kept per endpoint and protocol; more are closed.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// An upstream connection; it holds its `maxConnections` slot until the
/// pool drops it.
pub struct Conn {
    io: TokioIo<TcpStream>,
    _permit: Permit,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The circuit-breaker limit behind a failed upstream request, if any.
pub fn tripped_limit(err: &(dyn std::error::Error + 'static)) -> Option<Limit> {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(tripped) = err.downcast_ref::<Tripped>() {
            return Some(tripped.limit);
        }
        // io::Error::source() skips the error it wraps: look inside.
        let wrapped = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Tripped>());
        if let Some(tripped) = wrapped {
            return Some(tripped.limit);
        }
        source = err.source();
    }
    None
}

/// The pools of one endpoint, one per protocol: requests go upstream in the
/// version they came in, so gRPC (HTTP/2 with trailers) stays HTTP/2 end
/// to end.
#[derive(Clone, Debug)]
pub struct Clients {
    pub http1: Client<Connector, Body>,
    pub http2: Client<Connector, Body>,
}

impl Clients {
    /// `idle`: how long an unused pooled connection is kept (zero: no
    /// limit), the service's idle timeout on the upstream side.
    pub fn new(connector: Connector, idle: Duration) -> Self {
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(hyper_util::rt::TokioTimer::new());
            b.pool_idle_timeout((!idle.is_zero()).then_some(idle));
            b.pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT);
            b
        };
        Self {
            http1: builder().build(connector.clone()),
            http2: builder().http2_only(true).build(connector),
        }
    }

    pub fn for_version(&self, version: http::Version) -> &Client<Connector, Body> {
        if version == http::Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        }
    }
}
