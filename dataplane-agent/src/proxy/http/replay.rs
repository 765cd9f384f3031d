//! Request bodies that can be sent again on a retry.
//!
//! The first attempt streams the client's body as it arrives (nothing
//! waits for it to finish, so streaming and gRPC requests flow at once)
//! while a copy of up to [`MAX_REPLAY_BYTES`] is kept. A retry replays the
//! copy and then continues with what the client has not sent yet. A body
//! larger than that cannot be replayed, and such a request is not retried
//! (Envoy does the same with its per-request buffer limit).
//!
//! An abandoned attempt (per-try timeout) may still be read by its old
//! connection while a retry reads the same recording. Every chunk has a
//! fixed position, so an attempt never skips one, and only the newest
//! attempt reads the client (its body has a single waker); an older one
//! that catches up fails rather than send a body with a hole in it. Once
//! the recording overflows, no new attempt can start.
//!
//! With no retry possible (`attempts: 0`), nothing is recorded.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use crate::upstream::{Body, BoxError};

/// Largest request body kept in memory for replay.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// What has been read from the client so far, shared by the attempts.
struct Recording {
    /// The client's body; `None` once it ended.
    source: Option<Incoming>,
    chunks: Vec<Bytes>,
    /// Chunks read from the client so far (recorded or not).
    read: usize,
    len: usize,
    trailers: Option<HeaderMap>,
    /// More than `MAX_REPLAY_BYTES` went through: the chunks are gone and
    /// only `current` may read on (no attempt can be added after that).
    overflowed: bool,
    /// The client's body failed (malformed chunking, reset): the client's
    /// fault, never the endpoint's.
    client_failed: bool,
    size_hint: SizeHint,
    next_attempt: u64,
    /// The newest attempt: the only one that may read the client. An
    /// abandoned attempt's old connection may still poll its body; it must
    /// neither steal the client's waker (the client body has one) nor its
    /// data.
    current: u64,
}

/// A request body, as far as retries are concerned.
pub struct RequestBody(Inner);

enum Inner {
    /// Recorded for replay.
    Recorded(Arc<Mutex<Recording>>),
    /// Passed through once (no retry possible); `None` once taken.
    Once(Option<Incoming>, Arc<AtomicBool>),
}

impl RequestBody {
    /// `record`: whether a retry may need the body again.
    pub fn new(body: Incoming, record: bool) -> Self {
        if !record {
            return Self(Inner::Once(Some(body), Arc::default()));
        }
        let size_hint = body.size_hint();
        let source = (!body.is_end_stream()).then_some(body);
        Self(Inner::Recorded(Arc::new(Mutex::new(Recording {
            source,
            chunks: Vec::new(),
            read: 0,
            len: 0,
            trailers: None,
            overflowed: false,
            client_failed: false,
            size_hint,
            next_attempt: 0,
            current: 0,
        }))))
    }

    /// Whether another attempt can still send the whole body.
    pub fn replayable(&self) -> bool {
        match &self.0 {
            Inner::Recorded(shared) => !lock(shared).overflowed,
            Inner::Once(body, _) => body.is_some(),
        }
    }

    /// Whether reading the client's body failed.
    pub fn client_failed(&self) -> bool {
        match &self.0 {
            Inner::Recorded(shared) => lock(shared).client_failed,
            Inner::Once(_, failed) => failed.load(Ordering::Relaxed),
        }
    }

    /// The body for one attempt (`None` once replay became impossible).
    pub fn take(&mut self) -> Option<Body> {
        match &mut self.0 {
            Inner::Recorded(shared) => {
                let mut rec = lock(shared);
                if rec.overflowed {
                    return None;
                }
                let id = rec.next_attempt;
                rec.next_attempt += 1;
                rec.current = id;
                drop(rec);
                let attempt = AttemptBody {
                    shared: Arc::clone(shared),
                    id,
                    next_chunk: 0,
                    trailers_sent: false,
                };
                Some(attempt.boxed())
            }
            Inner::Once(body, failed) => {
                let failed = Arc::clone(failed);
                let body = body.take()?;
                Some(
                    body.map_err(move |err| {
                        failed.store(true, Ordering::Relaxed);
                        Box::new(err) as BoxError
                    })
                    .boxed(),
                )
            }
        }
    }
}

fn lock<T>(shared: &Mutex<T>) -> MutexGuard<'_, T> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The recording cannot give this attempt the whole body any more.
#[derive(Debug, thiserror::Error)]
#[error(
    "request body no longer available for this attempt (over the {MAX_REPLAY_BYTES}-byte replay limit)"
)]
struct ReplayGone;

/// The client's body failed while another attempt was reading it.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed")]
struct ClientBodyFailed;

/// One attempt's view: the recorded chunks first, then the live source.
struct AttemptBody {
    shared: Arc<Mutex<Recording>>,
    id: u64,
    next_chunk: usize,
    trailers_sent: bool,
}

impl HttpBody for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let shared = Arc::clone(&self.shared);
        let mut rec = lock(&shared);
        if self.next_chunk < rec.read {
            // Behind the client: replay, unless the recording is gone.
            let Some(chunk) = rec.chunks.get(self.next_chunk).cloned() else {
                return Poll::Ready(Some(Err(Box::new(ReplayGone))));
            };
            self.next_chunk += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if rec.current != self.id {
            return Poll::Ready(Some(Err(Box::new(ReplayGone))));
        }
        if rec.client_failed {
            return Poll::Ready(Some(Err(Box::new(ClientBodyFailed))));
        }
        let Some(source) = rec.source.as_mut() else {
            return Poll::Ready(self.trailers_once(&rec).map(Ok));
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                rec.source = None;
                Poll::Ready(self.trailers_once(&rec).map(Ok))
            }
            Poll::Ready(Some(Err(err))) => {
                rec.client_failed = true;
                rec.source = None;
                Poll::Ready(Some(Err(Box::new(err))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = self.record(&mut rec, frame);
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.shared).size_hint
    }
}

impl AttemptBody {
    /// Keeps a copy of `frame` while the recording fits.
    fn record(&mut self, rec: &mut Recording, frame: Frame<Bytes>) -> Frame<Bytes> {
        match frame.into_data() {
            Ok(data) => {
                rec.read += 1;
                self.next_chunk = rec.read;
                if !rec.overflowed && rec.len + data.len() <= MAX_REPLAY_BYTES {
                    rec.len += data.len();
                    rec.chunks.push(data.clone());
                } else if !rec.overflowed {
                    rec.overflowed = true;
                    rec.chunks = Vec::new();
                }
                Frame::data(data)
            }
            Err(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    rec.trailers = Some(trailers.clone());
                    self.trailers_sent = true;
                }
                frame
            }
        }
    }

    fn trailers_once(&mut self, rec: &Recording) -> Option<Frame<Bytes>> {
        if self.trailers_sent {
            return None;
        }
        self.trailers_sent = true;
        rec.trailers.clone().map(Frame::trailers)
    }
}
