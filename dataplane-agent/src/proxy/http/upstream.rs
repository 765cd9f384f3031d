//! Upstream HTTP clients of one service: connection pools per endpoint,
//! HTTP/1.1 and HTTP/2, with the proxy's socket mark and the service's
//! connect timeout.

use std::future::Future;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::proxy::upstream;

/// Request and response bodies inside the proxy.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Connects to the endpoint named by the URI's authority.
#[derive(Clone, Debug)]
pub struct Connector {
    pub mark: u32,
    pub connect_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mark, timeout) = (self.mark, self.connect_timeout);
        Box::pin(async move {
            let endpoint: SocketAddrV4 = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("not an endpoint address: {uri}")))?;
            let stream = upstream::connect(endpoint, mark, timeout).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// One pool per protocol: requests go upstream in the version they came in,
/// so gRPC (HTTP/2 with trailers) stays HTTP/2 end to end.
#[derive(Clone, Debug)]
pub struct Clients {
    pub http1: Client<Connector, Body>,
    pub http2: Client<Connector, Body>,
}

impl Clients {
    pub fn new(connector: Connector) -> Self {
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(POOL_IDLE_TIMEOUT);
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
