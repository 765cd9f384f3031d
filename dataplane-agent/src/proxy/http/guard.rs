//! Guards that keep per-attempt and per-request bookkeeping right when a
//! future is dropped half-way (request timeout, client gone, stream reset).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::upstream::{Body, BoxError};
use crate::health::{LocalFailure, Outcome};
use crate::proxy::Proxy;
use crate::resilience::Permit;
use crate::state::Service;

/// Ends one attempt for the balancer (outstanding requests, latency) and,
/// if the attempt is abandoned before an outcome, tells outlier detection
/// it failed (as Envoy counts a timeout against the host), which also
/// frees a half-open endpoint's probe slot.
pub struct AttemptGuard<'a> {
    proxy: &'a Proxy,
    service: &'a Service,
    index: usize,
    started: Instant,
    done: bool,
}

impl<'a> AttemptGuard<'a> {
    pub fn start(proxy: &'a Proxy, service: &'a Service, index: usize) -> Self {
        service.balancer.on_start(index);
        Self {
            proxy,
            service,
            index,
            started: Instant::now(),
            done: false,
        }
    }

    /// The attempt ended with `outcome` (`None`: nothing to tell outlier
    /// detection, e.g. a circuit breaker refused the connection).
    pub fn finish(mut self, outcome: Option<Outcome>, answered: bool) {
        self.done = true;
        let now = Instant::now();
        let rtt = answered.then(|| now.duration_since(self.started));
        self.service.balancer.on_end(self.index, rtt, now);
        if let Some(outcome) = outcome {
            self.service.record_outcome(self.proxy, self.index, outcome);
        }
    }
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.service
                .balancer
                .on_end(self.index, None, Instant::now());
            let abandoned = Outcome::LocalFailure(LocalFailure::Other);
            self.service
                .record_outcome(self.proxy, self.index, abandoned);
        }
    }
}

/// A response body that holds the request's `maxRequests` slot until the
/// response has been streamed (or dropped), as Envoy counts active streams,
/// so long gRPC streams and downloads stay counted.
pub struct GuardedBody {
    inner: Body,
    _slot: Option<Permit>,
}

impl GuardedBody {
    pub fn wrap(inner: Body, slot: Option<Permit>) -> Body {
        use http_body_util::BodyExt as _;
        Self { inner, _slot: slot }.boxed()
    }
}

impl HttpBody for GuardedBody {
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
