//! Connections to endpoints: TCP connects that carry the proxy's socket
//! mark (so capture never loops them back), and the HTTP connection pools
//! of each endpoint. Shared by the service state (which owns the pools, so
//! they survive reloads) and the proxy (which sends through them); it
//! depends on neither.

pub mod connect;
pub mod pool;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

pub use connect::{connect, set_keepalive};
pub use pool::{EndpointPool, PoolSettings, SendError, UpstreamProtocol};

/// Request and response bodies inside the proxy.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
