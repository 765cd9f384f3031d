//! `tcp-rr`: ping-pong over persistent TCP connections against
//! `echo-serve`: each request writes `size` bytes and waits for `size`
//! bytes back.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::driver::{Connector, Exchange, Failed};
use crate::opts::{Failure, Opts};
use crate::rr;

const DEFAULT_SIZE: usize = 100;
const MAX_SIZE: usize = 16 * 1024 * 1024;

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&[rr::OPTIONS, &["to", "size"]].concat())?;
    let to: SocketAddr = opts.get("to")?;
    let size = opts.bounded_or("size", DEFAULT_SIZE, 1..=MAX_SIZE)?;
    let plan = rr::plan(opts)?;
    rr::run("tcp-rr", &to.to_string(), TcpRr { to, size }, &plan).await
}

struct TcpRr {
    to: SocketAddr,
    size: usize,
}

impl Connector for TcpRr {
    type Conn = TcpConn;

    async fn connect(&self) -> io::Result<TcpConn> {
        let stream = TcpStream::connect(self.to).await?;
        stream.set_nodelay(true)?;
        Ok(TcpConn {
            stream,
            request: vec![b'x'; self.size],
            response: vec![0; self.size],
        })
    }
}

struct TcpConn {
    stream: TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl Exchange for TcpConn {
    /// Writes and reads concurrently: a request larger than the socket
    /// buffers would otherwise deadlock against the echo.
    async fn exchange(&mut self) -> Result<(), Failed> {
        let (mut rd, mut wr) = self.stream.split();
        let (written, read) = tokio::join!(
            wr.write_all(&self.request),
            rd.read_exact(&mut self.response)
        );
        let broken = |e: io::Error| Failed {
            kind: rr::io_kind(&e),
            broken: true,
        };
        written.map_err(broken)?;
        read.map_err(broken)?;
        Ok(())
    }
}
