//! A listening socket for the test servers, with the backlog a real
//! server sets. `TcpListener::bind` uses std's 128: a burst of a thousand
//! connects overflows it whenever the server is slow to accept (a loaded
//! CI machine), the kernel drops the SYNs beyond it, and a caller whose
//! connect timeout is the 1 s of SYN retransmission fails. Included by each
//! tool with `#[path]`.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Accept queue length asked for (the kernel caps it at `somaxconn`,
/// 4096 by default).
const BACKLOG: u32 = 4096;

/// Binds `addr` (address reuse on, as `TcpListener::bind` does) and
/// listens with [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
