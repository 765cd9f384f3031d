//! One try of a request against one endpoint, and who gets told how it
//! went.
//!
//! Only the endpoint's own behaviour counts against it: a status, a reset,
//! a connect failure, a timeout. A client that goes away, a client body
//! that turns out malformed, or a circuit breaker that refuses a
//! connection says nothing about the endpoint, and is never recorded (a
//! half-open endpoint just gets its probe slot back).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;

use super::grpc::{self, Verdict};
use crate::health::{LocalFailure, Outcome};
use crate::proxy::Proxy;
use crate::resilience::{Failure, Limit};
use crate::state::{Chosen, Service};
use crate::upstream::{Body, BoxError, SendError};

/// Why one attempt produced no usable response.
#[derive(Debug)]
pub struct AttemptError {
    pub failure: Failure,
    /// What outlier detection is told; `None` when the endpoint is not to
    /// blame.
    pub local: Option<LocalFailure>,
    /// A circuit breaker refused the connection.
    pub overflow: Option<Limit>,
}

impl AttemptError {
    pub fn local(failure: Failure, local: LocalFailure) -> Self {
        Self {
            failure,
            local: Some(local),
            overflow: None,
        }
    }

    /// The attempt ran out of time. `blame` says whether that says
    /// something about the endpoint: it does when the attempt had its
    /// per-try timeout or the whole request timeout, not when it was a
    /// retry cut short by what earlier attempts left of the deadline.
    pub fn timeout(blame: bool) -> Self {
        Self {
            failure: Failure::Timeout,
            local: blame.then_some(LocalFailure::Timeout),
            overflow: None,
        }
    }

    /// Classifies a failed send.
    pub fn from_send(err: &SendError) -> Self {
        match err {
            SendError::Overflow(limit) => Self {
                failure: Failure::ConnectFailure,
                local: None,
                overflow: Some(*limit),
            },
            // Queued behind another request's failed connect: retried
            // like it, but the endpoint failed once, and that one counts.
            SendError::Connect { shared: true, .. } => Self {
                failure: Failure::ConnectFailure,
                local: None,
                overflow: None,
            },
            SendError::Connect { timed_out, .. } => Self::local(
                Failure::ConnectFailure,
                if *timed_out {
                    LocalFailure::ConnectTimeout
                } else {
                    LocalFailure::ConnectRefused
                },
            ),
            SendError::Handshake(..) => {
                Self::local(Failure::ConnectFailure, LocalFailure::ConnectRefused)
            }
            // The server did not process the stream: safe to retry, and
            // not the endpoint's fault (it is shedding load or going away)
            // unless its GOAWAY carried an error code.
            err if err.refused_stream() => Self {
                failure: Failure::RefusedStream,
                local: err.endpoint_failing().then_some(LocalFailure::Reset),
                overflow: None,
            },
            SendError::Request(..) | SendError::Unsent(..) => {
                Self::local(Failure::Reset, LocalFailure::Reset)
            }
        }
    }
}

/// The bookkeeping of one attempt: the balancer's outstanding count and
/// latency, and the verdict for outlier detection. Dropped without a
/// verdict (the client went away), it records nothing and gives a
/// half-open endpoint's probe slot back.
pub struct AttemptGuard {
    proxy: Arc<Proxy>,
    service: Arc<Service>,
    chosen: Chosen,
    started: Instant,
    balancer_done: bool,
    verdict_given: bool,
}

impl AttemptGuard {
    pub fn start(proxy: &Arc<Proxy>, service: &Arc<Service>, chosen: Chosen) -> Self {
        service.balancer.on_start(chosen.index);
        Self {
            proxy: Arc::clone(proxy),
            service: Arc::clone(service),
            chosen,
            started: Instant::now(),
            balancer_done: false,
            verdict_given: false,
        }
    }

    /// The response head arrived (`answered`) or the attempt failed.
    pub fn end(&mut self, answered: bool) {
        if self.balancer_done {
            return;
        }
        self.balancer_done = true;
        let now = Instant::now();
        let rtt = answered.then(|| now.duration_since(self.started));
        self.service.balancer.on_end(self.chosen.index, rtt, now);
    }

    /// The attempt produced no response: told to outlier detection when
    /// the endpoint is to blame (which counts a connect error).
    pub fn failed(mut self, err: &AttemptError) {
        self.end(false);
        if let Some(local) = err.local {
            self.verdict(Outcome::LocalFailure(local));
        }
    }

    /// Tells outlier detection how the endpoint did.
    pub fn verdict(&mut self, outcome: Outcome) {
        if self.verdict_given {
            return;
        }
        self.verdict_given = true;
        self.proxy
            .record_outcome(&self.service, self.chosen.index, outcome);
    }

    fn grpc_status(&self, code: u32) {
        self.proxy.metrics.grpc_status(&self.service.id, code);
    }

    /// Judges a response: at once from its head, or (a gRPC call with its
    /// status in the trailers) when its body ends.
    pub fn judge(mut self, request_is_grpc: bool, response: Response<Body>) -> Response<Body> {
        self.end(true);
        match grpc::verdict(request_is_grpc, &response) {
            Verdict::Now { status, grpc } => {
                if let Some(code) = grpc {
                    self.grpc_status(code);
                }
                self.verdict(Outcome::Status(status));
                response
            }
            Verdict::AtTrailers => response.map(|inner| {
                VerdictBody {
                    inner,
                    guard: Some(self),
                }
                .boxed()
            }),
        }
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        self.end(false);
        if !self.verdict_given && self.chosen.probe {
            self.service.release_probe(self.chosen.index);
        }
    }
}

/// A gRPC response body that reads `grpc-status` from the trailers and
/// gives the attempt's verdict then.
struct VerdictBody {
    inner: Body,
    guard: Option<AttemptGuard>,
}

impl VerdictBody {
    fn conclude(&mut self, outcome: Option<Outcome>, grpc: Option<u32>) {
        if let Some(mut guard) = self.guard.take() {
            if let Some(code) = grpc {
                guard.grpc_status(code);
            }
            if let Some(outcome) = outcome {
                guard.verdict(outcome);
            }
        }
    }
}

impl HttpBody for VerdictBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc::status) {
                    let status = grpc::http_equivalent(code);
                    self.conclude(Some(Outcome::Status(status)), Some(code));
                } else if self.inner.is_end_stream() {
                    // hyper stops polling at the end of the stream: judge
                    // now a call that ended without a status.
                    self.conclude(Some(Outcome::Status(500)), Some(2));
                }
            }
            // The stream broke before its status: the endpoint's failure.
            Poll::Ready(Some(Err(_))) => {
                self.conclude(Some(Outcome::LocalFailure(LocalFailure::Reset)), None)
            }
            // Ended without a status: a broken gRPC server (gRPC reads
            // that as UNKNOWN).
            Poll::Ready(None) => self.conclude(Some(Outcome::Status(500)), Some(2)),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
