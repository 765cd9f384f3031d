//! Sidecar mode's inbound side: connections redirected to the pod arrive
//! here and are handed to the application on loopback, at the port they
//! were meant for.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::{Proxy, forward, original_dst, upstream};
use crate::metrics::RefuseReason;

/// Connecting to the application in the same pod is local: a short bound.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Proxy {
    pub async fn serve_inbound(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.metrics.accepted.inc();
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(Arc::clone(&self).handle_inbound(stream, peer));
                }
                Err(err) => {
                    debug!(%err, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn handle_inbound(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let Ok(dst) = original_dst(&client) else {
            return self.refuse(client, RefuseReason::UnknownDestination);
        };
        let app = SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port());
        match upstream::connect(app, self.mark, LOCAL_CONNECT_TIMEOUT).await {
            Ok(upstream) => forward::forward(client, upstream, &self.metrics).await,
            Err(err) => {
                debug!(%peer, %app, %err, "application not reachable");
                self.refuse(client, RefuseReason::UpstreamUnavailable);
            }
        }
    }
}
