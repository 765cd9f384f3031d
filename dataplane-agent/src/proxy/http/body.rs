//! Request bodies: buffered (so that a retry can send them again) when
//! small and complete, streamed otherwise.

use bytes::Bytes;
use futures_util::stream;
use http::HeaderMap;
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::Incoming;

use super::upstream::{Body, BoxError};

/// Largest request body kept in memory for replay (Envoy buffers up to its
/// per-route buffer limit for the same purpose).
pub const MAX_REPLAY_BYTES: u64 = 64 * 1024;

/// A request body, as far as retries are concerned.
pub enum RequestBody {
    /// Complete in memory: can be sent any number of times.
    Replayable {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Streamed from the client: can be sent once.
    Streaming(Option<Incoming>),
}

impl RequestBody {
    /// Buffers `body` if it is empty or its exact size is known and small.
    pub async fn prepare(body: Incoming) -> Result<Self, hyper::Error> {
        let small = body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BYTES);
        if !(body.is_end_stream() || small) {
            return Ok(Self::Streaming(Some(body)));
        }
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Self::Replayable {
            data: collected.to_bytes(),
            trailers,
        })
    }

    pub fn replayable(&self) -> bool {
        matches!(self, Self::Replayable { .. })
    }

    /// The body for one attempt; `None` once a streaming body was used.
    pub fn take(&mut self) -> Option<Body> {
        match self {
            Self::Replayable { data, trailers } => Some(replay(data.clone(), trailers.clone())),
            Self::Streaming(body) => body
                .take()
                .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()),
        }
    }
}

fn replay(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    if data.is_empty() && trailers.is_none() {
        return Empty::new().map_err(|never| match never {}).boxed();
    }
    let mut frames = Vec::with_capacity(2);
    if !data.is_empty() {
        frames.push(Ok::<_, BoxError>(Frame::data(data)));
    }
    if let Some(trailers) = trailers {
        frames.push(Ok(Frame::trailers(trailers)));
    }
    StreamBody::new(stream::iter(frames)).boxed()
}
