//! The two client-side timers of an HTTP connection, which hyper's single
//! header-read timer cannot tell apart:
//!
//! - **header read** (`timeouts.headerRead`): from the first byte of a
//!   request to the end of its headers. A slowloris client, which sends its
//!   headers a byte at a time to hold the connection, is closed when it
//!   runs out; an idle keep-alive connection is not (Envoy's
//!   `request_headers_timeout` starts at the first byte too).
//! - **idle** (`timeouts.idle`): no request in flight and no new one
//!   started. Zero disables it, for HTTP/1 and HTTP/2 alike.
//!
//! HTTP/2 connections have no header timer here: frames arrive between
//! requests (PING, SETTINGS, WINDOW_UPDATE) and hyper bounds stream heads.
//!
//! Requests never wake the watchdog: it checks back at most every
//! `min(headerRead, idle)`, so a connection costs one timer wake-up per
//! period, whatever its request rate, and a slow head is cut between
//! `headerRead` and twice that after its first byte.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What the connection is doing, shared by its I/O, its requests and its
/// watchdog.
pub struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `base` at which the connection last went idle.
    idle_since: AtomicU64,
    /// Milliseconds since `base`, plus one, of the first byte of a request
    /// whose head is not complete yet; 0: none.
    head_started: AtomicU64,
    http2: AtomicBool,
    /// The proxy drains: HTTP/1 responses carry `Connection: close`.
    closing: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        })
    }

    /// Whether the client spoke HTTP/2 (its preface).
    pub fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Acquire)
    }

    /// Whether a request is being served.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// From now on, HTTP/1 responses close the connection after them.
    pub fn close_after_responses(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Whether responses must close the connection (the proxy drains).
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request head arrived; the connection is busy until the returned
    /// mark (held by the response body) is dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        InFlight(Arc::clone(self))
    }

    /// Bytes arrived from the client.
    fn bytes_read(&self, first: Option<&[u8]>) {
        if let Some(first) = first
            && first.starts_with(b"PRI ")
        {
            self.http2.store(true, Ordering::Release);
        }
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == 0
            && !self.http2.load(Ordering::Acquire)
        {
            self.head_started
                .store(self.now_ms() + 1, Ordering::Release);
        }
    }

    /// Resolves when a timer runs out, naming it; zero durations disable.
    pub async fn expired(&self, header_read: Duration, idle: Duration) -> &'static str {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let Some(period) = [header_read, idle]
            .into_iter()
            .filter(|d| !d.is_zero())
            .min()
        else {
            return std::future::pending().await;
        };
        loop {
            let deadline = self.deadline(ms(header_read), ms(idle));
            let now = self.now_ms();
            if let Some((at, why)) = deadline
                && now >= at
            {
                return why;
            }
            let check_back = now.saturating_add(ms(period));
            let wake = deadline.map_or(check_back, |(at, _)| at.min(check_back));
            tokio::time::sleep_until(self.base + Duration::from_millis(wake)).await;
        }
    }

    /// The next timer due, in milliseconds since `base` (zero: disabled).
    fn deadline(&self, header_read: u64, idle: u64) -> Option<(u64, &'static str)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.head_started.load(Ordering::Acquire) {
            0 if idle > 0 => Some((
                self.idle_since.load(Ordering::Acquire).saturating_add(idle),
                "idle_timeout",
            )),
            0 => None,
            started if header_read > 0 => Some((
                (started - 1).saturating_add(header_read),
                "header_read_timeout",
            )),
            _ => None,
        }
    }
}

/// Marks one request in flight until dropped.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity
                .idle_since
                .store(activity.now_ms(), Ordering::Release);
        }
    }
}

/// The client socket, reporting reads to the connection's [`Activity`].
pub struct WatchedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    first_read: bool,
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            first_read: true,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if polled.is_ready() && buf.filled().len() > before {
            let first = std::mem::take(&mut self.first_read);
            let bytes = &buf.filled()[before..];
            self.activity.bytes_read(first.then_some(bytes));
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_idle_not_header_read() {
        let a = Activity::new();
        let start = Instant::now();
        let why = a
            .expired(Duration::from_secs(10), Duration::from_secs(300))
            .await;
        assert_eq!(why, "idle_timeout");
        assert!(start.elapsed() >= Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_must_finish_within_header_read() {
        let a = Activity::new();
        tokio::time::advance(Duration::from_secs(100)).await;
        a.bytes_read(Some(b"GET / HT"));
        let start = Instant::now();
        let why = a
            .expired(Duration::from_secs(10), Duration::from_secs(300))
            .await;
        assert_eq!(why, "header_read_timeout");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(10) && waited < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_idle_disables_it_and_requests_in_flight_never_expire() {
        let a = Activity::new();
        let in_flight = a.request_started();
        let never = tokio::time::timeout(
            Duration::from_secs(3600),
            a.expired(Duration::from_secs(10), Duration::from_secs(1)),
        );
        assert!(never.await.is_err(), "busy connections never expire");
        drop(in_flight);
        let idle_off = tokio::time::timeout(
            Duration::from_secs(3600),
            a.expired(Duration::from_secs(10), Duration::ZERO),
        );
        assert!(idle_off.await.is_err(), "idle: 0 disables the idle timer");
    }

    #[tokio::test(start_paused = true)]
    async fn http2_connections_have_no_header_timer() {
        let a = Activity::new();
        a.bytes_read(Some(b"PRI * HTTP/2.0\r\n"));
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            a.expired(Duration::from_secs(10), Duration::ZERO),
        );
        assert!(r.await.is_err());
    }
}
