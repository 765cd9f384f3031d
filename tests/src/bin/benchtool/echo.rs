//! `echo-serve`: the TCP echo server `tcp-rr` and `bulk` talk to.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::opts::{Failure, Opts};

/// The server stops by itself after this (the harness kills it sooner),
/// so a forgotten one cannot run on.
const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(3600);
const MAX_MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Buffers start small, since a benchmark may hold thousands of
/// connections, and grow once a read fills one (bulk transfer).
const SMALL_BUFFER: usize = 4 * 1024;
const LARGE_BUFFER: usize = 256 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&["listen", "max-duration", "threads"])?;
    let listen: SocketAddr = opts.get("listen")?;
    let max_duration =
        opts.seconds_or("max-duration", Some(DEFAULT_MAX_DURATION), MAX_MAX_DURATION)?;
    let listener =
        crate::listen::bind(listen).map_err(|e| Failure::Run(format!("binding {listen}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure::Run(format!("local address: {e}")))?;
    announce(local)?;
    // The accept loop never ends by itself; the deadline ends it.
    let _ = tokio::time::timeout(max_duration, accept_loop(listener)).await;
    Ok(())
}

/// `listening <addr>`, flushed: the harness waits for it.
fn announce(local: SocketAddr) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening {local}")
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::Run(format!("writing to stdout: {e}")))
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo(stream));
            }
            Err(err) => {
                eprintln!("benchtool echo-serve: accept: {err}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Echoes until the peer closes or an error.
async fn echo(mut stream: TcpStream) {
    if stream.set_nodelay(true).is_err() {
        return;
    }
    let mut buf = vec![0u8; SMALL_BUFFER];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if n == buf.len() && buf.len() < LARGE_BUFFER {
            buf.resize(LARGE_BUFFER, 0);
        }
    }
}
