//! The HTTP connections of one endpoint: a pool of idle HTTP/1.1
//! connections and one shared, multiplexed HTTP/2 connection.
//!
//! Pools are per endpoint and protocol, never per `Host` or `:authority`:
//! a client that varies its Host header must not open a pool per value
//! (each holding `maxConnections` slots), and every HTTP/2 request to an
//! endpoint shares one connection. Requests keep the client's authority
//! (HTTP/1 `Host`, HTTP/2 `:authority`) whatever the pool.
//!
//! A pooled HTTP/1.1 connection the server closed while idle gives its
//! request back unsent (hyper's `try_send_request`), and the request goes
//! on another connection: a keep-alive race is never a failed request.

use std::future::Future;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use super::{Body, BoxError, connect};
use crate::resilience::{CircuitBreaker, Limit, Permit};

/// The HTTP version a request is sent upstream in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// What a pool needs to open connections; a pool is reused across config
/// versions only while these are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub endpoint: SocketAddrV4,
    /// `SO_MARK` of upstream sockets.
    pub mark: u32,
    pub connect_timeout: Duration,
    /// How long an unused connection is kept; zero: no limit.
    pub idle_timeout: Duration,
}

/// Why a request got no response from the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A circuit breaker refused a new connection: not the endpoint's fault.
    #[error("circuit breaker open: {} reached", .0.as_str())]
    Overflow(Limit),
    /// No connection could be made (refused, unreachable, timed out): the
    /// request was never sent.
    #[error("connect to {endpoint} failed: {message}")]
    Connect {
        endpoint: SocketAddrV4,
        timed_out: bool,
        message: String,
        /// Another request's connect failed, and this one, queued behind
        /// it, shares the failure: the endpoint failed once, not twice.
        shared: bool,
    },
    /// The connection was made but the HTTP handshake failed.
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddrV4, #[source] hyper::Error),
    /// The request was (maybe partly) sent and failed: reset, closed, or
    /// refused by HTTP/2 `REFUSED_STREAM`.
    #[error("request to {0} failed: {1}")]
    Request(SocketAddrV4, #[source] hyper::Error),
    /// The connection closed before the request was written (after a
    /// GOAWAY, or a server's own idle close), on a fresh connection too:
    /// nothing was sent.
    #[error("connection to {0} closed before the request was sent: {1}")]
    Unsent(SocketAddrV4, #[source] hyper::Error),
}

impl SendError {
    /// Whether the endpoint surely did not process the request: HTTP/2
    /// `REFUSED_STREAM`, or a stream the endpoint's own GOAWAY left
    /// unprocessed (h2 fails with the GOAWAY only the streams above its
    /// last processed id, and the ones opened after it; streams cut later
    /// by the connection closing fail with an I/O error instead). A
    /// server shutting down gracefully is not failing: such a request is
    /// retried elsewhere, even a POST, and not held against the endpoint.
    pub fn refused_stream(&self) -> bool {
        match self {
            Self::Unsent(..) => true,
            Self::Request(_, err) => h2_error(err).is_some_and(|h2| {
                h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (h2.is_go_away() && h2.is_remote())
            }),
            _ => false,
        }
    }

    /// A refused request (safe to retry) whose refusal still says the
    /// endpoint is failing: a GOAWAY carrying an error code
    /// (`INTERNAL_ERROR`, `ENHANCE_YOUR_CALM`...) rather than `NO_ERROR`.
    pub fn endpoint_failing(&self) -> bool {
        let Self::Request(_, err) = self else {
            return false;
        };
        h2_error(err).is_some_and(|h2| {
            h2.is_go_away() && h2.is_remote() && h2.reason() != Some(h2::Reason::NO_ERROR)
        })
    }
}

/// The HTTP/2 error behind a hyper error, if any.
fn h2_error(err: &hyper::Error) -> Option<&h2::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = err.source();
    }
    None
}

/// Idle HTTP/1.1 connections kept per endpoint; more are closed.
const MAX_IDLE_HTTP1: usize = 64;

struct IdleHttp1 {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// The shared HTTP/2 connection, and the last connect failure so that
/// requests that queued behind a failing connect fail with it at once
/// instead of each waiting for its own connect timeout.
#[derive(Default)]
struct Http2Slot {
    sender: Option<http2::SendRequest<Body>>,
    failure: Option<(u64, SendErrorCopy)>,
}

#[derive(Clone)]
struct SendErrorCopy {
    timed_out: bool,
    message: String,
}

/// The connections of one endpoint.
pub struct EndpointPool {
    settings: PoolSettings,
    breaker: Arc<CircuitBreaker>,
    idle_http1: Mutex<Vec<IdleHttp1>>,
    http2: tokio::sync::Mutex<Http2Slot>,
    /// Completed HTTP/2 connect attempts (for the failure fan-out).
    http2_attempts: AtomicU64,
    /// HTTP/2 requests whose response is still streaming.
    http2_active: Arc<AtomicUsize>,
    /// When the pool was made: the epoch of `http2_last_used`.
    created: Instant,
    /// Milliseconds after `created` of the last HTTP/2 request (lock-free:
    /// written on every request).
    http2_last_used: AtomicU64,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl EndpointPool {
    /// A pool whose new connections count against `breaker`'s
    /// `maxConnections`. Inside a tokio runtime, a reaper closes
    /// connections idle for longer than the idle timeout.
    pub fn new(settings: PoolSettings, breaker: Arc<CircuitBreaker>) -> Arc<Self> {
        let pool = Arc::new(Self {
            settings,
            breaker,
            idle_http1: Mutex::new(Vec::new()),
            http2: tokio::sync::Mutex::new(Http2Slot::default()),
            http2_attempts: AtomicU64::new(0),
            http2_active: Arc::default(),
            created: Instant::now(),
            http2_last_used: AtomicU64::new(0),
        });
        let idle = pool.settings.idle_timeout;
        if !idle.is_zero()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(reap(Arc::downgrade(&pool), idle));
        }
        pool
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Sends `req` to the endpoint in `protocol`. The request must already
    /// be in that protocol's form (see `proxy::http::translate`).
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
        protocol: UpstreamProtocol,
    ) -> Result<Response<Body>, SendError> {
        match protocol {
            UpstreamProtocol::Http1 => self.send_http1(req).await,
            UpstreamProtocol::Http2 => self.send_http2(req).await,
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, SendError> {
        let endpoint = self.settings.endpoint;
        while let Some(mut sender) = self.checkout_http1() {
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.return_when_done(response, sender)),
                Err(mut err) => match err.take_message() {
                    // Closed by the server before our request was written:
                    // nothing was sent, try the next connection.
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Request(endpoint, err.into_error())),
                },
            }
        }
        let (mut sender, conn) = self.handshake_http1(false).await?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%endpoint, %err, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        sender
            .ready()
            .await
            .map_err(|e| SendError::Request(endpoint, e))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Request(endpoint, e))?;
        Ok(self.return_when_done(response, sender))
    }

    /// Sends a protocol upgrade (WebSocket) on a connection of its own,
    /// which the upgraded stream then owns; never pooled.
    pub async fn send_upgrade(&self, req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let endpoint = self.settings.endpoint;
        let (mut sender, conn) = self.handshake_http1(true).await?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%endpoint, %err, "upstream upgraded connection ended with an error");
            }
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Request(endpoint, e))
    }

    async fn handshake_http1(
        &self,
        upgrades: bool,
    ) -> Result<
        (
            http1::SendRequest<Body>,
            Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>,
        ),
        SendError,
    > {
        let io = self.connect().await?;
        let endpoint = self.settings.endpoint;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Handshake(endpoint, e))?;
        let conn: Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>> = if upgrades {
            Box::pin(conn.with_upgrades())
        } else {
            Box::pin(conn)
        };
        Ok((sender, conn))
    }

    async fn send_http2(&self, mut req: Request<Body>) -> Result<Response<Body>, SendError> {
        let endpoint = self.settings.endpoint;
        // The shared connection may have closed since it was last used
        // (GOAWAY, idle close), even between `ready` and the write: a
        // request it gives back unsent goes on one new connection, then
        // fails as unsent (safe to retry elsewhere).
        let mut fresh = false;
        let (response, active) = loop {
            let mut sender = self.http2_sender().await?;
            let closed = match sender.ready().await {
                Ok(()) => {
                    let active = ActiveGuard::new(&self.http2_active);
                    match sender.try_send_request(req).await {
                        Ok(response) => break (response, active),
                        Err(mut err) => match err.take_message() {
                            Some(unsent) => {
                                req = unsent;
                                err.into_error()
                            }
                            None => return Err(SendError::Request(endpoint, err.into_error())),
                        },
                    }
                }
                Err(err) => err,
            };
            self.forget_http2().await;
            if fresh {
                return Err(SendError::Unsent(endpoint, closed));
            }
            fresh = true;
        };
        self.http2_last_used
            .store(self.millis_since_created(), Ordering::Relaxed);
        Ok(response.map(|body| {
            OnDone {
                inner: body,
                done: Some(move || drop(active)),
            }
            .boxed()
        }))
    }

    /// The shared HTTP/2 connection, connecting if there is none.
    async fn http2_sender(&self) -> Result<http2::SendRequest<Body>, SendError> {
        let arrived_after = self.http2_attempts.load(Ordering::Acquire);
        let mut slot = self.http2.lock().await;
        if let Some(sender) = &slot.sender
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        if let Some((attempt, failure)) = &slot.failure
            && *attempt > arrived_after
        {
            // A connect that started while this request waited just failed.
            return Err(SendError::Connect {
                endpoint: self.settings.endpoint,
                timed_out: failure.timed_out,
                message: failure.message.clone(),
                shared: true,
            });
        }
        let result = self.handshake_http2().await;
        let attempt = self.http2_attempts.fetch_add(1, Ordering::AcqRel) + 1;
        match result {
            Ok(sender) => {
                slot.sender = Some(sender.clone());
                slot.failure = None;
                Ok(sender)
            }
            Err(err) => {
                if let SendError::Connect {
                    timed_out, message, ..
                } = &err
                {
                    let copy = SendErrorCopy {
                        timed_out: *timed_out,
                        message: message.clone(),
                    };
                    slot.failure = Some((attempt, copy));
                }
                Err(err)
            }
        }
    }

    async fn forget_http2(&self) {
        self.http2.lock().await.sender = None;
    }

    async fn handshake_http2(&self) -> Result<http2::SendRequest<Body>, SendError> {
        let io = self.connect().await?;
        let endpoint = self.settings.endpoint;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| SendError::Handshake(endpoint, e))?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!(%endpoint, %err, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// A TCP connection within `maxConnections`; it holds its slot until
    /// it closes.
    async fn connect(&self) -> Result<Conn, SendError> {
        let s = &self.settings;
        let permit = self
            .breaker
            .try_acquire(Limit::Connections)
            .map_err(|tripped| SendError::Overflow(tripped.limit))?;
        let stream = connect(s.endpoint, s.mark, s.connect_timeout)
            .await
            .map_err(|err| SendError::Connect {
                endpoint: s.endpoint,
                timed_out: err.kind() == std::io::ErrorKind::TimedOut,
                message: err.to_string(),
                shared: false,
            })?;
        Ok(Conn {
            io: TokioIo::new(stream),
            _permit: permit,
        })
    }

    /// The most recently used idle connection that is still open and
    /// young enough (LIFO keeps few connections warm).
    fn checkout_http1(&self) -> Option<http1::SendRequest<Body>> {
        let idle = self.settings.idle_timeout;
        let mut pool = lock(&self.idle_http1);
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(entry) = pool.pop() {
            let expired = !idle.is_zero() && entry.since.elapsed() >= idle;
            if expired || entry.sender.is_closed() {
                continue;
            }
            // Still writing the previous request's body (its response came
            // first): never make another request wait for that upload.
            if !entry.sender.is_ready() {
                busy.push(entry);
                continue;
            }
            found = Some(entry.sender);
            break;
        }
        pool.extend(busy.into_iter().rev());
        found
    }

    /// The response, whose body gives the connection back to the pool
    /// once read to the end (a connection whose response was abandoned
    /// half-way is closed, as it cannot carry another request).
    fn return_when_done(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: http1::SendRequest<Body>,
    ) -> Response<Body> {
        let pool = Arc::downgrade(self);
        let mut sender = Some(sender);
        response.map(|body| {
            OnDone {
                inner: body,
                done: Some(move || {
                    if let (Some(pool), Some(sender)) = (pool.upgrade(), sender.take()) {
                        pool.checkin_http1(sender);
                    }
                }),
            }
            .boxed()
        })
    }

    fn checkin_http1(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut pool = lock(&self.idle_http1);
        if pool.len() < MAX_IDLE_HTTP1 {
            pool.push(IdleHttp1 {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn millis_since_created(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Closes connections idle for longer than the idle timeout.
    fn reap_idle(&self) {
        let idle = self.settings.idle_timeout;
        lock(&self.idle_http1).retain(|e| e.since.elapsed() < idle && !e.sender.is_closed());
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let last = self.http2_last_used.load(Ordering::Relaxed);
        let quiet = self.millis_since_created().saturating_sub(last) >= idle_ms;
        if quiet
            && self.http2_active.load(Ordering::Relaxed) == 0
            && let Ok(mut slot) = self.http2.try_lock()
        {
            slot.sender = None;
        }
    }
}

async fn reap(pool: Weak<EndpointPool>, idle: Duration) {
    let period = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.reap_idle();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts an HTTP/2 request as active until its response is done, so
/// the reaper never closes a connection with streams in flight.
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that runs `done` once, when it has been read to the
/// end or dropped.
struct OnDone<F: FnOnce()> {
    inner: Incoming,
    done: Option<F>,
}

impl<F: FnOnce() + Unpin> HttpBody for OnDone<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            _ => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce()> OnDone<F> {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done();
        }
    }
}

impl<F: FnOnce()> Drop for OnDone<F> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// An upstream connection; it holds its `maxConnections` slot until it
/// closes.
struct Conn {
    io: TokioIo<TcpStream>,
    _permit: Permit,
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
