//! A response body that holds something until the response has been
//! streamed to the end or dropped: the request's `maxRequests` slot (as
//! Envoy counts active streams, so long gRPC streams and downloads stay
//! counted), or the connection's in-flight mark for its idle timers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::upstream::{Body, BoxError};

pub struct GuardedBody<G> {
    inner: Body,
    _guard: G,
}

impl<G: Send + Sync + Unpin + 'static> GuardedBody<G> {
    pub fn wrap(inner: Body, guard: G) -> Body {
        Self {
            inner,
            _guard: guard,
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
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
