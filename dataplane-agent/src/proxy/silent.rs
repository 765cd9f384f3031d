//! `protocol: auto` connections whose client sent nothing within
//! `protocolDetection`: not decided yet.
//!
//! Such a client may be waiting for a server-first protocol's greeting
//! (MySQL, SMTP, SSH), or it may be an HTTP client's pooled connection
//! opened ahead of use. Pinning it as opaque would take retries,
//! per-request balancing and status-based ejection from that HTTP client
//! for the connection's whole life, so neither is assumed:
//!
//! 1. The connection-level policy runs as for any opaque connection (rate
//!    limit, `maxConnections`, no endpoint or none reachable: refused at
//!    once), since a silent client is exactly what a server-first
//!    protocol's client looks like and those limits protect its servers.
//!    An HTTP client's spare connection therefore spends one
//!    connection-rate token.
//! 2. An endpoint is connected at once, so that a greeting can reach the
//!    client, and both sides are watched for [`GREETING_WINDOW`]. The
//!    endpoint speaking first makes the connection opaque, through that
//!    connection. An HTTP/2 server's SETTINGS frame, sent before it reads
//!    anything, is no greeting; neither is an endpoint closing the early
//!    connection.
//! 3. The client speaking first has its bytes detected: HTTP gets the HTTP
//!    path (the early connection is closed without counting for or against
//!    the endpoint), anything else is forwarded through the early
//!    connection.
//! 4. Past the window the early connection and its `maxConnections` slot
//!    are given back, and the client is waited for (up to `idle`); what it
//!    then sends is detected, and opaque bytes get a new endpoint
//!    connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::detect::{self, Detected};
use super::{Proxy, tcp};
use crate::health::Outcome;
use crate::metrics::{IdleKind, RefuseReason};
use crate::resilience::Limit;
use crate::state::{Chosen, Service};

/// How long after the early connect an endpoint must speak to be taken for
/// a server-first protocol. Such servers greet as soon as they accept; one
/// that waits longer is not recognised (declare its service `protocol:
/// tcp`). Also how long a silent HTTP client holds an endpoint connection
/// and a `maxConnections` slot it may never use.
pub const GREETING_WINDOW: Duration = Duration::from_secs(1);

/// What a silent client became.
pub enum Silent {
    /// Served as opaque TCP, refused, or closed.
    Done,
    /// It spoke HTTP: serve it with the full HTTP policy.
    Http(TcpStream),
}

/// Who spoke first on an undecided connection.
enum First {
    Client,
    /// The endpoint sent a greeting.
    Server,
    /// Nothing that decides: the window passed, or the endpoint sent
    /// something that is no greeting, or closed the early connection.
    Nobody,
    /// The client closed or failed without a byte.
    ClientGone,
}

pub async fn serve(
    proxy: &Proxy,
    client: TcpStream,
    peer: SocketAddr,
    service: &Service,
) -> Silent {
    if service.endpoints.is_empty() {
        debug!(%peer, service = %service.id, "service has no endpoints");
        proxy.refuse(client, RefuseReason::NoEndpoints);
        return Silent::Done;
    }
    if !tcp::admit_rate(proxy, service, peer).await {
        proxy.refuse(client, RefuseReason::RateLimited);
        return Silent::Done;
    }
    let Ok(slot) = service.breaker.try_acquire(Limit::Connections) else {
        debug!(%peer, service = %service.id, "maxConnections reached");
        proxy.refuse(client, RefuseReason::Overflow);
        return Silent::Done;
    };
    let Some((early, chosen)) = tcp::connect_any(proxy, service).await else {
        debug!(%peer, service = %service.id, "no endpoint could be reached");
        proxy.refuse(client, RefuseReason::UpstreamUnavailable);
        return Silent::Done;
    };
    let window = Instant::now() + GREETING_WINDOW;
    match first_to_speak(&client, &early, window).await {
        First::ClientGone => {
            give_back(service, chosen);
            Silent::Done
        }
        First::Server => {
            proxy.record_outcome(service, chosen.index, Outcome::Success);
            tcp::forward(proxy, client, peer, service, early, chosen.index).await;
            drop(slot);
            Silent::Done
        }
        First::Client => match detect_client(&client, service).await {
            Detected::Http1 | Detected::Http2 => {
                give_back(service, chosen);
                Silent::Http(client)
            }
            _ => {
                proxy.record_outcome(service, chosen.index, Outcome::Success);
                tcp::forward(proxy, client, peer, service, early, chosen.index).await;
                drop(slot);
                Silent::Done
            }
        },
        First::Nobody => {
            debug!(%peer, service = %service.id, "no greeting: waiting for the client alone");
            give_back(service, chosen);
            drop((early, slot));
            wait_for_client(proxy, client, peer, service).await
        }
    }
}

/// The early connection is not used: it counts neither for nor against
/// the endpoint, and a half-open endpoint's probe slot is freed.
fn give_back(service: &Service, chosen: Chosen) {
    if chosen.probe {
        service.release_probe(chosen.index);
    }
}

async fn first_to_speak(client: &TcpStream, early: &TcpStream, window: Instant) -> First {
    let mut client_byte = [0u8; 1];
    // A frame header: enough to tell an HTTP/2 server's SETTINGS.
    let mut greeting = [0u8; 9];
    tokio::select! {
        read = client.peek(&mut client_byte) => match read {
            Ok(n) if n > 0 => First::Client,
            _ => First::ClientGone,
        },
        read = early.peek(&mut greeting) => match read {
            Ok(n) if n > 0 && !is_http2_settings(&greeting[..n]) => First::Server,
            // Closed, failed, or an HTTP/2 server's preface.
            _ => First::Nobody,
        },
        () = tokio::time::sleep_until(window) => First::Nobody,
    }
}

/// Whether `bytes`, the first an endpoint sent, are an HTTP/2 SETTINGS
/// frame header on stream 0: what every HTTP/2 server sends before reading
/// anything. (Greetings of server-first protocols differ in the type
/// byte: MySQL has its sequence number 0 there, text protocols a
/// printable character.)
fn is_http2_settings(bytes: &[u8]) -> bool {
    const SETTINGS: u8 = 0x4;
    const ACK: u8 = 0x1;
    let [l0, l1, l2, kind, flags, s0, s1, s2, s3, ..] = *bytes else {
        return false;
    };
    let length = u32::from_be_bytes([0, l0, l1, l2]);
    kind == SETTINGS
        && flags & !ACK == 0
        && [s0, s1, s2, s3] == [0; 4]
        && length.is_multiple_of(6)
        && length <= 16_384
}

async fn detect_client(client: &TcpStream, service: &Service) -> Detected {
    detect::detect(client, service.policy().timeouts.protocol_detection)
        .await
        .unwrap_or(Detected::Opaque)
}

/// Step 4: no endpoint connection; the client decides when it speaks.
async fn wait_for_client(
    proxy: &Proxy,
    client: TcpStream,
    peer: SocketAddr,
    service: &Service,
) -> Silent {
    let idle = service.policy().timeouts.idle;
    let mut byte = [0u8; 1];
    let spoke = async { matches!(client.peek(&mut byte).await, Ok(n) if n > 0) };
    let spoke = if idle.is_zero() {
        spoke.await
    } else {
        match tokio::time::timeout(idle, spoke).await {
            Ok(spoke) => spoke,
            Err(_) => {
                debug!(%peer, service = %service.id, "silent connection idle: closing");
                proxy.metrics.idle_timeout(IdleKind::Silent);
                return Silent::Done;
            }
        }
    };
    if !spoke {
        return Silent::Done;
    }
    match detect_client(&client, service).await {
        Detected::Http1 | Detected::Http2 => Silent::Http(client),
        // The rate limit counted this connection already.
        _ => {
            tcp::connect_and_forward(proxy, client, peer, service).await;
            Silent::Done
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http2_servers_settings_frame_is_no_greeting() {
        // Empty SETTINGS, and one with two settings (12 bytes).
        assert!(is_http2_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        assert!(is_http2_settings(&[0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 3]));
        // MySQL's handshake: 3-byte length, sequence 0, protocol 10.
        assert!(!is_http2_settings(&[
            0x4a, 0, 0, 0, 0x0a, b'8', b'.', b'0', b'.'
        ]));
        assert!(!is_http2_settings(b"220 smtp.example ESMTP"));
        assert!(!is_http2_settings(b"SSH-2.0-OpenSSH_9.6"));
        // SETTINGS on a stream, or an odd length: not a preface.
        assert!(!is_http2_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 1]));
        assert!(!is_http2_settings(&[0, 0, 5, 4, 0, 0, 0, 0, 0]));
        assert!(!is_http2_settings(&[0, 0, 0, 4]), "too short to tell");
    }
}
