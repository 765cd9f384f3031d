//! Graceful drain on shutdown (SIGTERM, as Kubernetes sends before it
//! kills a pod): the listeners stop accepting; every HTTP connection is
//! told to go (HTTP/1.1: the response in flight carries `Connection:
//! close` and the connection closes after it; an idle one answers its next
//! request that way, or closes after a grace of 2 s without one; HTTP/2:
//! GOAWAY, streams in flight finish); opaque TCP connections run
//! on until they end or the deadline passes, when the process exits and
//! closes what is left. Callers that reconnect reach the next proxy (in
//! node mode, after a restart or an upgrade) instead of losing a request
//! mid-flight.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::ProxyMetrics;

/// Whether the proxy is draining; shared by every listener and connection.
#[derive(Debug)]
pub struct Drain(watch::Sender<bool>);

impl Default for Drain {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Drain {
    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once draining has started.
    pub async fn signalled(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as the proxy: an error only means the
        // proxy is going away, which is a drain too.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

/// How often the drain looks at the connections left.
const POLL: Duration = Duration::from_millis(50);

/// Starts draining and waits until no client connection is left or
/// `deadline` passes; returns how many are left.
pub async fn drain(drain: &Drain, metrics: &ProxyMetrics, deadline: Duration) -> i64 {
    drain.start();
    let until = Instant::now() + deadline;
    loop {
        let left = metrics.active.get();
        if left <= 0 || Instant::now() >= until {
            return left.max(0);
        }
        tokio::time::sleep(POLL.min(until.saturating_duration_since(Instant::now()))).await;
    }
}
