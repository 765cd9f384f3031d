//! `tcp-rr`: ping-pong over persistent TCP connections against
//! `echo-serve`: each request writes `size` bytes and waits for `size`
//! bytes back. `--wait poll` makes the client wait for the answer in
//! `poll(2)` with a timeout, as curl and many runtimes do, instead of in
//! tokio's epoll: the two wake up through different kernel paths.
//!
//! `tcp-crr`: a new connection per request (connect, one ping-pong,
//! close), the cost of short-lived connections.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::driver::{Connector, Exchange, Failed};
use crate::opts::{Failure, Opts};
use crate::rr;

const DEFAULT_SIZE: usize = 100;
const MAX_SIZE: usize = 16 * 1024 * 1024;
/// `--wait poll`: each poll(2) waits at most this long (curl's own
/// ceiling), and a request gives up after `POLL_GIVE_UP`.
const POLL_TIMEOUT_MS: i32 = 1000;
const POLL_GIVE_UP: Duration = Duration::from_secs(5);

/// How a `tcp-rr` client waits for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Epoll,
    Poll,
}

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&[rr::OPTIONS, &["to", "size", "wait"]].concat())?;
    let to: SocketAddr = opts.get("to")?;
    let size = opts.bounded_or("size", DEFAULT_SIZE, 1..=MAX_SIZE)?;
    let wait = match opts.get_or("wait", "epoll".to_string())?.as_str() {
        "epoll" => Wait::Epoll,
        "poll" => Wait::Poll,
        other => {
            return Err(Failure::Usage(format!(
                "--wait: epoll or poll, got {other:?}"
            )));
        }
    };
    let plan = rr::plan(opts)?;
    let mode = match wait {
        Wait::Epoll => "tcp-rr",
        Wait::Poll => "tcp-rr-poll",
    };
    rr::run(mode, &to.to_string(), TcpRr { to, size, wait }, &plan).await
}

pub async fn run_crr(opts: &Opts) -> Result<(), Failure> {
    opts.only(&[rr::OPTIONS, &["to", "size"]].concat())?;
    let to: SocketAddr = opts.get("to")?;
    let size = opts.bounded_or("size", DEFAULT_SIZE, 1..=MAX_SIZE)?;
    let plan = rr::plan(opts)?;
    rr::run("tcp-crr", &to.to_string(), TcpCrr { to, size }, &plan).await
}

struct TcpRr {
    to: SocketAddr,
    size: usize,
    wait: Wait,
}

impl Connector for TcpRr {
    type Conn = TcpConn;

    async fn connect(&self) -> io::Result<TcpConn> {
        let stream = TcpStream::connect(self.to).await?;
        stream.set_nodelay(true)?;
        let stream = match self.wait {
            Wait::Epoll => Stream::Tokio(stream),
            // Out of tokio's epoll: this socket is waited for with poll(2)
            // only (it stays non-blocking).
            Wait::Poll => Stream::Poll(stream.into_std()?),
        };
        Ok(TcpConn {
            stream,
            request: vec![0; self.size],
            response: vec![0; self.size],
            exchanges: 0,
        })
    }
}

enum Stream {
    Tokio(TcpStream),
    Poll(std::net::TcpStream),
}

struct TcpConn {
    stream: Stream,
    request: Vec<u8>,
    response: Vec<u8>,
    /// Exchanges so far: each request differs from the one before, and
    /// its echo must match it byte for byte (`mismatch` otherwise), so a
    /// path that loses, repeats or reorders bytes is caught.
    exchanges: u64,
}

fn broken(e: io::Error) -> Failed {
    Failed {
        kind: rr::io_kind(&e),
        broken: true,
    }
}

impl Exchange for TcpConn {
    async fn exchange(&mut self) -> Result<(), Failed> {
        self.exchanges += 1;
        let seed = self.exchanges;
        for (i, byte) in self.request.iter_mut().enumerate() {
            *byte = (seed.wrapping_add(i as u64) % 251) as u8;
        }
        match &mut self.stream {
            Stream::Tokio(stream) => ping_pong(stream, &self.request, &mut self.response).await?,
            Stream::Poll(stream) => {
                poll_ping_pong(stream, &self.request, &mut self.response).map_err(broken)?;
            }
        }
        if self.response != self.request {
            return Err(Failed {
                kind: "mismatch",
                broken: true,
            });
        }
        Ok(())
    }
}

/// Writes and reads concurrently: a request larger than the socket
/// buffers would otherwise deadlock against the echo.
async fn ping_pong(
    stream: &mut TcpStream,
    request: &[u8],
    response: &mut [u8],
) -> Result<(), Failed> {
    let (mut rd, mut wr) = stream.split();
    let (written, read) = tokio::join!(wr.write_all(request), rd.read_exact(response));
    written.map_err(broken)?;
    read.map_err(broken)?;
    Ok(())
}

/// The ping-pong of a client that blocks in poll(2): it holds the
/// runtime's thread while it waits, as such a client holds its own.
/// Writing and reading alternate within one loop, so large requests do
/// not deadlock against the echo either.
fn poll_ping_pong(
    stream: &mut std::net::TcpStream,
    request: &[u8],
    response: &mut [u8],
) -> io::Result<()> {
    let give_up = Instant::now() + POLL_GIVE_UP;
    let (mut sent, mut got) = (0, 0);
    while got < response.len() {
        if sent < request.len() {
            match stream.write(&request[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        match stream.read(&mut response[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                got += n;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= give_up {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let events = if sent < request.len() {
            libc::POLLIN | libc::POLLOUT
        } else {
            libc::POLLIN
        };
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd for a socket this function borrows.
        if unsafe { libc::poll(&raw mut pfd, 1, POLL_TIMEOUT_MS) } < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
    Ok(())
}

struct TcpCrr {
    to: SocketAddr,
    size: usize,
}

impl Connector for TcpCrr {
    type Conn = CrrConn;

    /// Nothing is opened here: every exchange opens its own connection.
    async fn connect(&self) -> io::Result<CrrConn> {
        Ok(CrrConn {
            to: self.to,
            request: vec![b'x'; self.size],
            response: vec![0; self.size],
        })
    }
}

struct CrrConn {
    to: SocketAddr,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl Exchange for CrrConn {
    async fn exchange(&mut self) -> Result<(), Failed> {
        let mut stream = TcpStream::connect(self.to).await.map_err(|e| Failed {
            kind: rr::io_kind(&e),
            broken: false,
        })?;
        stream.set_nodelay(true).map_err(broken)?;
        ping_pong(&mut stream, &self.request, &mut self.response).await?;
        // The client closes first, as HTTP/1.0-style clients do.
        drop(stream);
        Ok(())
    }
}
