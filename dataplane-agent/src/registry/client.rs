//! One way to connect to etcd for the watcher, the publisher and
//! `register`, with timeouts on everything that talks to a member.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// Bound on one request (a listing, a put, a lease call) to a member.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to the cluster (the client balances over every member).
///
/// HTTP/2 keep-alive pings every 10 s, with 5 s to answer: etcd (like
/// every grpc-go server) closes a connection whose client pings more often
/// than its `--grpc-keepalive-min-time` (5 s by default) with
/// `too_many_pings`, and grpc-go's own clients never ping more than every
/// 10 s. Watches require a leader: a member cut off from the others ends
/// them (instead of leaving them silent), so they move to another member.
pub async fn connect(
    endpoints: &[String],
    user: &Option<(String, String)>,
) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some((name, password)) = user {
        options = options.with_user(name, password);
    }
    tokio::time::timeout(CALL_TIMEOUT, Client::connect(endpoints, Some(options)))
        .await
        .map_err(|_| {
            format!("connecting: no member of {endpoints:?} answered within {CALL_TIMEOUT:?}")
        })?
        .map_err(|e| format!("connecting to {endpoints:?}: {e}"))
}

/// `call` with [`CALL_TIMEOUT`]; the error names `what`.
pub async fn timed<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| format!("{what}: no answer within {CALL_TIMEOUT:?}"))?
        .map_err(|e| format!("{what}: {e}"))
}
