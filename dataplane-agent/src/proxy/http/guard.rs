//! The response body as the client receives it: it holds something until
//! the response has been streamed to the end or dropped (the request's
//! `maxRequests` slot, as Envoy counts active streams, so long gRPC
//! streams and downloads stay counted; the connection's in-flight mark for
//! its idle timers), and it ends a response whose endpoint stopped sending
//! in the middle.
//!
//! The stall limit is the service's `idle` timeout (Envoy's stream idle
//! timeout): the connection's own idle timer never runs while a request is
//! in flight, so without this a backend that sends headers and then hangs
//! would hold the caller forever.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

use crate::upstream::{Body, BoxError};

pub struct GuardedBody<G> {
    inner: Body,
    _guard: G,
    stall: Option<Stall>,
}

/// How long the proxy may wait on the endpoint for the next frame, and
/// the timer checking it. The wait starts when the body is polled and the
/// endpoint has nothing: a client too slow to take the frames (hyper does
/// not poll then) is not the endpoint stalling. The timer is created on
/// the first wait and re-armed only when it fires.
struct Stall {
    limit: Duration,
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    counter: Counter,
}

/// The error a stalled body ends with: hyper resets the HTTP/2 stream or
/// closes the HTTP/1 connection, so the client sees a truncated response
/// instead of waiting forever.
#[derive(Debug, thiserror::Error)]
#[error("the endpoint sent nothing for {0:?} in the middle of the response")]
pub struct StalledBody(Duration);

impl<G: Send + Sync + Unpin + 'static> GuardedBody<G> {
    /// `stall_limit` of zero: no limit.
    pub fn wrap(inner: Body, guard: G, stall_limit: Duration, counter: &Counter) -> Body {
        let stall = (!stall_limit.is_zero() && !inner.is_end_stream()).then(|| Stall {
            limit: stall_limit,
            waiting_since: None,
            timer: None,
            counter: counter.clone(),
        });
        Self {
            inner,
            _guard: guard,
            stall,
        }
        .boxed()
    }
}

impl<G: Unpin> HttpBody for GuardedBody<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(stall) = &mut this.stall else {
            return polled;
        };
        if polled.is_ready() {
            stall.waiting_since = None;
            return polled;
        }
        let due = *stall.waiting_since.get_or_insert_with(Instant::now) + stall.limit;
        let timer = stall
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        stall.counter.inc();
        let limit = stall.limit;
        this.stall = None;
        Poll::Ready(Some(Err(Box::new(StalledBody(limit)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
