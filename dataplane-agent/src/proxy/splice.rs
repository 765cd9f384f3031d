//! Moving bytes between the client and the endpoint.

use tokio::net::TcpStream;
use tracing::debug;

use crate::metrics::{Direction, DirectionLabels, ProxyMetrics};

/// Copies both ways with splice(2) (the bytes never enter user space) until
/// both directions are done. When one side finishes sending, its write
/// half-close is passed on (shutdown(SHUT_WR)) and the other direction keeps
/// going, so request/response protocols that half-close work.
pub async fn forward(mut client: TcpStream, mut upstream: TcpStream, metrics: &ProxyMetrics) {
    match tokio_splice::zero_copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            count_bytes(metrics, Direction::Upstream, up);
            count_bytes(metrics, Direction::Downstream, down);
        }
        Err(err) => {
            // One side reset or failed: reset the other so it learns at once.
            debug!(%err, "forwarding ended with an error");
            reset(client);
            reset(upstream);
        }
    }
}

fn count_bytes(metrics: &ProxyMetrics, direction: Direction, bytes: u64) {
    metrics
        .bytes
        .get_or_create(&DirectionLabels { direction })
        .inc_by(bytes);
}

/// Drops the connection with an RST instead of a FIN.
pub fn reset(stream: TcpStream) {
    let socket = socket2::SockRef::from(&stream);
    // Best effort: if linger cannot be set, a FIN still closes it.
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
