//! `bulk`: throughput of one connection to `echo-serve`, sending and
//! reading the echo at the same time, with large buffers and no checks on
//! the content (meshtool's transfer hashes; this one measures).
//!
//! `--verify`: a position-dependent byte pattern instead, every echoed
//! byte checked against it, and a half-close after the last byte whose
//! end-of-stream must come back after the whole echo: a non-blocking
//! (epoll) peer for end-to-end checks of the data path.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::opts::{Failure, Opts};
use crate::rr;
use crate::stats::cpu_seconds;

const CHUNK: usize = 1024 * 1024;
const MAX_BYTES: u64 = 1 << 40;
const DEFAULT_CAP: Duration = Duration::from_secs(60);
const MAX_CAP: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The JSON line of `bulk`.
#[derive(Serialize)]
struct BulkReport {
    mode: &'static str,
    /// Bytes that made the round trip (echo received).
    bytes: u64,
    /// The `--bytes` asked for; equal to `bytes` unless `error`.
    requested: u64,
    elapsed_s: f64,
    /// Bytes each way per second: `bytes / elapsed_s`.
    throughput_bps: f64,
    errors: u64,
    /// Why the transfer stopped short (`timeout`, `eof`, `reset`,
    /// `mismatch`, `no-eof`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    /// `--verify`: every byte matched, then end-of-stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    verified: Option<bool>,
    cpu_s: f64,
}

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&["to", "bytes", "duration", "threads", "verify"])?;
    let verify = opts.flag("verify");
    let to: SocketAddr = opts.get("to")?;
    let bytes = opts.bounded("bytes", 1..=MAX_BYTES)?;
    let cap = opts.seconds_or("duration", Some(DEFAULT_CAP), MAX_CAP)?;
    let mut stream = connect(to).await?;
    let start = Instant::now();
    let mut received = 0;
    let result = {
        let (rd, wr) = stream.split();
        let both = async {
            tokio::try_join!(
                send(wr, bytes, verify),
                receive(rd, bytes, &mut received, verify)
            )
        };
        tokio::time::timeout(cap, both).await
    };
    let elapsed_s = start.elapsed().as_secs_f64();
    let error = match result {
        Err(_) => Some("timeout"),
        Ok(Err(err)) => Some(match err.to_string().as_str() {
            "mismatch" => "mismatch",
            "no-eof" => "no-eof",
            _ => rr::io_kind(&err),
        }),
        Ok(Ok(_)) => None,
    };
    rr::print_line(&BulkReport {
        mode: "bulk",
        bytes: received,
        requested: bytes,
        elapsed_s,
        throughput_bps: (received as f64 / elapsed_s.max(f64::MIN_POSITIVE)).round(),
        errors: u64::from(error.is_some()),
        error,
        verified: verify.then_some(error.is_none()),
        cpu_s: cpu_seconds(),
    })
}

async fn connect(to: SocketAddr) -> Result<TcpStream, Failure> {
    let failed = |why: String| Failure::Run(format!("connecting to {to}: {why}"));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| failed(e.to_string()))?;
    Ok(stream)
}

/// The `--verify` byte at `offset`: changes with every byte and every
/// 64 KiB, so a lost, repeated or moved block shows.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 16).wrapping_mul(0x9d)) as u8
}

async fn send(mut wr: WriteHalf<'_>, bytes: u64, verify: bool) -> std::io::Result<()> {
    let mut chunk = vec![b'x'; CHUNK];
    let mut sent = 0;
    while sent < bytes {
        let n = usize::try_from(bytes - sent).map_or(CHUNK, |l| l.min(CHUNK));
        if verify {
            for (i, byte) in chunk[..n].iter_mut().enumerate() {
                *byte = pattern(sent + i as u64);
            }
        }
        wr.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    if verify {
        wr.shutdown().await?;
    }
    Ok(())
}

/// Reads until `bytes` came back; counts into `received` so that a
/// timeout still reports how far it got.
async fn receive(
    mut rd: ReadHalf<'_>,
    bytes: u64,
    received: &mut u64,
    verify: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    while *received < bytes {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if verify && let Some(bad) = (0..n).find(|&i| buf[i] != pattern(*received + i as u64)) {
            *received += bad as u64;
            return Err(std::io::Error::other("mismatch"));
        }
        *received += n as u64;
    }
    if verify && rd.read(&mut buf).await? != 0 {
        return Err(std::io::Error::other("no-eof"));
    }
    Ok(())
}
