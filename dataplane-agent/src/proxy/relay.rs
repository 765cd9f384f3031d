//! Moving bytes between the client and the endpoint ([`copy`], bulk
//! through pipes whose size [`pipe`] keeps within the node's limits), and
//! closing the pair when neither side has sent anything for the idle
//! timeout.

pub mod copy;
mod pipe;

use std::os::fd::AsRawFd as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::capture::fast::{Spliced, Splicer};
use crate::metrics::{Direction, DirectionLabels, IdleKind, ProxyMetrics};

/// Copies both ways (see [`copy`]) until both directions are done. When
/// one side finishes sending, its write half-close is passed on
/// (shutdown(SHUT_WR)) and the other direction keeps going, so
/// request/response protocols that half-close work.
///
/// With a non-zero `idle`, the pair is closed (FIN both ways) once no byte
/// has moved either way for that long. The copy publishes what it moved
/// (two relaxed stores per wake-up) and a watchdog looks a few times per
/// period. Not the kernel's `TCP_INFO`: bytes on the kernel fast path never
/// pass TCP's receive path, so a busy connection there would look idle.
///
/// With `kernel` (the fast path on) and both ends pods on this node, the
/// kernel may take each direction past the proxy once the proxy has
/// caught up with it (see `capture::fast::Splicer`); the copy then sees
/// only the ends of the streams, and the bytes the kernel moved count as
/// moved (for the idle timeout and the byte counters). A bulk direction
/// moves to splice(2) without it, and with it once its sender sends
/// through TCP (splice does not see the fast path's queue).
pub async fn forward(
    mut client: TcpStream,
    mut upstream: TcpStream,
    metrics: &ProxyMetrics,
    idle: Duration,
    kernel: Option<&std::sync::Arc<Splicer>>,
) {
    // SAFETY: both streams outlive `spliced` (dropped before they are) and
    // the copy that uses its reporters and splice gates.
    let spliced = kernel.map(|k| unsafe { k.prepare(client.as_raw_fd(), upstream.as_raw_fd()) });
    let progress = copy::Progress::default();
    let copy = copy::bidirectional(&mut client, &mut upstream, &progress, spliced.as_ref());
    let finished = tokio::select! {
        result = copy => Some(result),
        () = idle_expired(&progress, idle, spliced.as_ref()) => None,
    };
    // What the kernel moved past the proxy counts as forwarded.
    let (up, down) = spliced.as_ref().map_or((0, 0), Spliced::bytes);
    drop(spliced);
    let count = |a_to_b: u64, b_to_a: u64| {
        count_bytes(metrics, Direction::Upstream, up + a_to_b);
        count_bytes(metrics, Direction::Downstream, down + b_to_a);
    };
    let Some((result, stats)) = finished else {
        debug!(idle = ?idle, "opaque connection idle: closing both sides");
        metrics.idle_timeout(IdleKind::Tcp);
        count(
            progress.a_to_b.load(Ordering::Relaxed),
            progress.b_to_a.load(Ordering::Relaxed),
        );
        return;
    };
    if stats.splice_switches > 0 {
        metrics
            .splice_switches
            .inc_by(u64::from(stats.splice_switches));
    }
    match result {
        Ok(totals) => count(totals.a_to_b, totals.b_to_a),
        Err(err) => {
            // One side reset or failed: reset the other so it learns at once.
            debug!(%err, "forwarding ended with an error");
            reset(client);
            reset(upstream);
        }
    }
}

/// Resolves once no byte has moved for `idle`; never when `idle` is zero
/// (disabled). Checked four times per period: the close comes at most a
/// quarter period late, and a long-lived connection costs one timer per
/// quarter period.
async fn idle_expired(progress: &copy::Progress, idle: Duration, spliced: Option<&Spliced>) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    let total = || {
        let (up, down) = spliced.map_or((0, 0), Spliced::bytes);
        progress.total() + up + down
    };
    let check = (idle / 4).max(Duration::from_millis(1));
    let mut seen = total();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(check).await;
        let now = total();
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() >= idle {
            return;
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
