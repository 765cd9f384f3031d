//! Connecting to an endpoint over TCP.

use std::net::SocketAddrV4;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Connects with a deadline. The socket carries the proxy's mark so that
/// the capture programs never redirect the proxy's own connections.
pub async fn connect(
    endpoint: SocketAddrV4,
    mark: u32,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    socket.set_tcp_nodelay(true)?;
    set_keepalive(&socket)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(endpoint.into())).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// Probes an idle connection so that a peer that vanished without a reset
/// (its node or pod network gone) is noticed in about a minute and a half,
/// instead of holding the connection, its pipes and descriptors forever.
pub fn set_keepalive(socket: &socket2::Socket) -> std::io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)
}
