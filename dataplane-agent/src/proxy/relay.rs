//! Moving bytes between the client and the endpoint ([`copy`]), and
//! closing the pair when neither side has sent anything for the idle
//! timeout.

pub mod copy;

use std::os::fd::{AsRawFd as _, RawFd};
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::debug;

use crate::metrics::{Direction, DirectionLabels, IdleKind, ProxyMetrics};

/// Copies both ways (see [`copy`]) until both directions are done. When
/// one side finishes sending, its write half-close is passed on
/// (shutdown(SHUT_WR)) and the other direction keeps going, so
/// request/response protocols that half-close work.
///
/// With a non-zero `idle`, the pair is closed (FIN both ways) once no data
/// has arrived from either side for that long. The kernel keeps the time
/// of the last data received on each socket (`TCP_INFO`), so nothing is
/// counted per read: a watchdog looks at both sockets a few times per
/// period.
pub async fn forward(
    mut client: TcpStream,
    mut upstream: TcpStream,
    metrics: &ProxyMetrics,
    idle: Duration,
    splice: bool,
) {
    let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
    let copy = copy::bidirectional(&mut client, &mut upstream, splice);
    let (result, stats) = tokio::select! {
        result = copy => result,
        () = idle_expired(fds, idle) => {
            debug!(idle = ?idle, "opaque connection idle: closing both sides");
            metrics.idle_timeout(IdleKind::Tcp);
            // The copy's own totals are lost with it; what each socket
            // received is what went the other way.
            let [from_client, from_upstream] = fds.map(|fd| tcp_info(fd).map_or(0, |i| i.tcpi_bytes_received));
            count_bytes(metrics, Direction::Upstream, from_client);
            count_bytes(metrics, Direction::Downstream, from_upstream);
            return;
        }
    };
    if stats.splice_switches > 0 {
        metrics
            .splice_switches
            .inc_by(u64::from(stats.splice_switches));
    }
    match result {
        Ok(totals) => {
            count_bytes(metrics, Direction::Upstream, totals.a_to_b);
            count_bytes(metrics, Direction::Downstream, totals.b_to_a);
        }
        Err(err) => {
            // One side reset or failed: reset the other so it learns at once.
            debug!(%err, "forwarding ended with an error");
            reset(client);
            reset(upstream);
        }
    }
}

/// Resolves once neither socket has received data for `idle`; never when
/// `idle` is zero (disabled).
async fn idle_expired(fds: [RawFd; 2], idle: Duration) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    let idle_ms = u32::try_from(idle.as_millis()).unwrap_or(u32::MAX);
    // Checked four times per period: the close comes at most a quarter
    // period late, and a long-lived connection costs one getsockopt pair
    // per quarter period.
    let mut wait = idle / 4;
    loop {
        tokio::time::sleep(wait).await;
        // A socket whose TCP_INFO cannot be read (it is closing) counts as
        // active: the copy ends on its own.
        let quiet_ms = fds
            .iter()
            .map(|&fd| last_data_received_ms(fd).unwrap_or(0))
            .min()
            .unwrap_or(0);
        if quiet_ms >= idle_ms {
            return;
        }
        // Sleep until the quieter side would reach the limit, but look
        // again at least every quarter period.
        let left = Duration::from_millis(u64::from(idle_ms - quiet_ms));
        wait = left.min(idle / 4).max(Duration::from_millis(1));
    }
}

/// Milliseconds since `fd` last received data (not bare ACKs or keep-alive
/// probes).
fn last_data_received_ms(fd: RawFd) -> Option<u32> {
    tcp_info(fd).map(|info| info.tcpi_last_data_recv)
}

/// The kernel's `TCP_INFO` of socket `fd`.
fn tcp_info(fd: RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; the kernel writes at most `len`
    // bytes into it, and `fd` is a socket owned by a live TcpStream.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
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
