//! `httptool serve`: accepts HTTP/1.1 and HTTP/2 prior-knowledge (h2c) on
//! one port, because the proxy may speak either to a backend and the tests
//! should not need two backends to cover both.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

use crate::opts::{Failure, Opts};
use crate::respond::{self, Action, Backend, Body};

/// Most connections served at once; further ones are closed at once.
const MAX_CONNECTIONS: usize = 512;
/// A client that opens a connection and sends no complete request head
/// within this is dropped, so vanished clients cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Returned to hyper when a request must get no response at all; hyper
/// then drops the HTTP/1 connection or resets the HTTP/2 stream.
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset requested by mode")
    }
}

impl std::error::Error for Reset {}

pub async fn run(opts: &Opts) -> Result<(), Failure> {
    opts.only(&["listen", "name"])?;
    let listen: SocketAddr = opts.get("listen")?;
    let name: String = opts.get("name")?;
    let backend = Arc::new(Backend::new(&name).map_err(Failure::Usage)?);
    let listener = crate::listen::bind(listen)
        .map_err(|err| Failure::Run(format!("binding {listen}: {err}")))?;
    let local = listener.local_addr().unwrap_or(listen);
    println!("listening {local}");
    let _ = io::stdout().flush();
    accept_loop(listener, backend).await;
    Ok(())
}

/// Runs until the process is killed (the harness owns its lifetime).
async fn accept_loop(listener: TcpListener, backend: Arc<Backend>) {
    let builder = Arc::new(builder());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("httptool serve: accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (builder, backend) = (builder.clone(), backend.clone());
        tokio::spawn(async move {
            serve_connection(stream, &builder, backend).await;
            drop(slot);
        });
    }
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// What the request handlers may do to their connection.
struct ConnControl {
    /// A duplicate of the socket, to set SO_LINGER on it (socket options
    /// belong to the socket, not to the descriptor).
    socket: Option<OwnedFd>,
    close: Notify,
}

impl ConnControl {
    /// Makes the final close send RST instead of FIN, so an HTTP/1 client
    /// sees a reset rather than a clean end of stream.
    fn reset_on_close(&self) {
        let Some(fd) = &self.socket else { return };
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `fd` is an open socket we own; the option value is a
        // correctly sized `linger`.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    builder: &auto::Builder<TokioExecutor>,
    backend: Arc<Backend>,
) {
    let _ = stream.set_nodelay(true);
    let control = Arc::new(ConnControl {
        socket: stream.as_fd().try_clone_to_owned().ok(),
        close: Notify::new(),
    });
    let service = {
        let control = control.clone();
        service_fn(move |req| call(req, backend.clone(), control.clone()))
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = control.close.notified() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The hyper service: maps the handler's [`Action`] onto the connection.
async fn call(
    req: Request<Incoming>,
    backend: Arc<Backend>,
    control: Arc<ConnControl>,
) -> Result<hyper::Response<Body>, Reset> {
    let http1 = req.version() < hyper::Version::HTTP_2;
    match respond::handle(req, &backend).await {
        Action::Respond(resp) => Ok(resp),
        Action::RespondAndClose(resp) => {
            control.close.notify_one();
            Ok(resp)
        }
        Action::Reset => {
            // HTTP/2 resets only the stream; the connection stays usable.
            if http1 {
                control.reset_on_close();
            }
            Err(Reset)
        }
    }
}
