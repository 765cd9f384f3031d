//! Connecting to an endpoint.

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
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(endpoint.into())).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}
