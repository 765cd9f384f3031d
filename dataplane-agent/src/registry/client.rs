//! One way to connect to etcd for the watcher, the publisher and
//! `register`, with timeouts on everything that talks to a member.

use std::time::Duration;

use std::path::PathBuf;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// Bound on one request (a listing, a put, a lease call) to a member.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach and log in to the registry.
#[derive(Debug, Clone)]
pub struct Access {
    /// Member client URLs (`http://` or, with `tls`, `https://`).
    pub endpoints: Vec<String>,
    /// User and password, when etcd authentication is on.
    pub user: Option<(String, String)>,
    pub tls: Option<TlsFiles>,
}

/// PEM files for TLS to the members.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the members' certificates.
    pub ca: PathBuf,
    /// A client certificate and key, when the members require one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    fn options(&self) -> Result<TlsOptions, String> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
        };
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read(&self.ca, "--etcd-ca")?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(
                read(cert, "--etcd-cert")?,
                read(key, "--etcd-key")?,
            ));
        }
        Ok(tls)
    }
}

/// Connects to the cluster (the client balances over every member).
///
/// HTTP/2 keep-alive pings every 10 s, with 5 s to answer: etcd (like
/// every grpc-go server) closes a connection whose client pings more often
/// than its `--grpc-keepalive-min-time` (5 s by default) with
/// `too_many_pings`, and grpc-go's own clients never ping more than every
/// 10 s. Watches require a leader: a member cut off from the others ends
/// them (instead of leaving them silent), so they move to another member.
pub async fn connect(access: &Access) -> Result<Client, String> {
    let endpoints = &access.endpoints;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some((name, password)) = &access.user {
        options = options.with_user(name, password);
    }
    if let Some(tls) = &access.tls {
        options = options.with_tls(tls.options()?);
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
