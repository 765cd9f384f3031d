//! Request bodies that can be sent again on a retry.
//!
//! The first attempt streams the client's body as it arrives (nothing
//! waits for it to finish, so streaming and gRPC requests flow at once)
//! while a copy of up to [`MAX_REPLAY_BYTES`] is kept. A retry replays the
//! copy and then continues with what the client has not sent yet. A body
//! larger than that cannot be replayed, and such a request is not retried
//! (Envoy does the same with its per-request buffer limit).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::upstream::{Body, BoxError};

/// Largest request body kept in memory for replay.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// What has been read from the client so far, shared by the attempts.
struct Recording {
    /// The client's body; `None` once it ended.
    source: Option<Incoming>,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// More than `MAX_REPLAY_BYTES` went through: no replay possible.
    overflowed: bool,
    size_hint: SizeHint,
}

/// A request body, as far as retries are concerned.
pub struct RequestBody {
    shared: Arc<Mutex<Recording>>,
}

impl RequestBody {
    pub fn new(body: Incoming) -> Self {
        let size_hint = body.size_hint();
        let source = (!body.is_end_stream()).then_some(body);
        let recording = Recording {
            source,
            chunks: Vec::new(),
            len: 0,
            trailers: None,
            overflowed: false,
            size_hint,
        };
        Self {
            shared: Arc::new(Mutex::new(recording)),
        }
    }

    /// Whether another attempt can still send the whole body.
    pub fn replayable(&self) -> bool {
        !lock(&self.shared).overflowed
    }

    /// The body for one attempt (`None` once replay became impossible).
    pub fn take(&mut self) -> Option<Body> {
        if !self.replayable() {
            return None;
        }
        let attempt = AttemptBody {
            shared: Arc::clone(&self.shared),
            next_chunk: 0,
            trailers_sent: false,
        };
        Some(attempt.boxed())
    }
}

fn lock(shared: &Mutex<Recording>) -> MutexGuard<'_, Recording> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One attempt's view: the recorded chunks first, then the live source.
struct AttemptBody {
    shared: Arc<Mutex<Recording>>,
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
        if let Some(chunk) = rec.chunks.get(self.next_chunk) {
            self.next_chunk += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
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
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Box::new(err)))),
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
                if !rec.overflowed && rec.len + data.len() <= MAX_REPLAY_BYTES {
                    rec.len += data.len();
                    rec.chunks.push(data.clone());
                    self.next_chunk = rec.chunks.len();
                } else {
                    rec.overflowed = true;
                    rec.chunks.clear();
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
