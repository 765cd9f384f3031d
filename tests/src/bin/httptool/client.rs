//! The client side shared by `load` and `grpc`: a pooled hyper client,
//! the request to send, one bounded exchange and the error classes tests
//! assert on.

use std::error::Error;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::{self, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::opts::{Failure, Opts};

pub type Client = legacy::Client<HttpConnector, Full<Bytes>>;

/// Builds the client: keep-alive, and with `http2` HTTP/2 prior
/// knowledge over one multiplexed connection. With `resend`, the only
/// retries are of requests that provably never left the client (handed to
/// a pooled connection that closed first, e.g. after GOAWAY), as every
/// real client does; without it even those are reported (`--no-resend`:
/// proves the proxy closed no connection under a request). Anything the
/// peer may have seen is never retried, since the proxy's own retries are
/// what is under test.
pub fn client(http2: bool, resend: bool, max_idle: usize, connect_timeout: Duration) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    legacy::Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .retry_canceled_requests(resend)
        .pool_max_idle_per_host(max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// The request `load` sends over and over (or `grpc` once).
#[derive(Clone)]
pub struct Template {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Template {
    /// From `--url`, `--header k: v`... and `--method`, with `body`.
    pub fn from_opts(
        opts: &Opts,
        default_method: Method,
        body: Bytes,
    ) -> Result<Template, Failure> {
        let uri: Uri = opts.get("url")?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(Failure::Usage(format!(
                "--url must be http://host[:port]/..., got {uri}"
            )));
        }
        let method = match opts.raw("method") {
            Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| Failure::Usage(format!("--method: invalid {m:?}")))?,
            None => default_method,
        };
        let mut headers = HeaderMap::new();
        for header in opts.all("header") {
            let (name, value) = parse_header(header)?;
            headers.append(name, value);
        }
        Ok(Template {
            method,
            uri,
            headers,
            body,
        })
    }

    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Template {
        self.headers.insert(name, HeaderValue::from_static(value));
        self
    }

    fn build(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// `name: value`, as curl's `-H`.
fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), Failure> {
    let bad = || Failure::Usage(format!("--header: expected \"name: value\", got {text:?}"));
    let (name, value) = text.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

/// A complete response: head, whole body and trailers (if any).
pub struct Exchanged {
    pub head: http::response::Parts,
    pub trailers: Option<HeaderMap>,
}

/// Sends the request and reads the whole response, within `timeout`.
/// The error is the class of failure (see [`error_kind`]).
pub async fn exchange(
    client: &Client,
    template: &Template,
    timeout: Duration,
) -> Result<Exchanged, &'static str> {
    let attempt = async {
        let resp = client
            .request(template.build())
            .await
            .map_err(|e| error_kind(&e))?;
        let (head, body) = resp.into_parts();
        let collected = body.collect().await.map_err(|e| error_kind(&e))?;
        let trailers = collected.trailers().cloned();
        Ok(Exchanged { head, trailers })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err("timeout"))
}

/// The failure classes tests assert on: `refused` (connect refused),
/// `reset` (TCP RST, or HTTP/2 RST_STREAM), `refused_stream` (HTTP/2
/// REFUSED_STREAM), `goaway` (HTTP/2 GOAWAY before the response),
/// `closed` (the peer closed before a complete response), `timeout`,
/// `unreachable`, `connect` (other connect failures), `other`.
///
/// The causes are nested (legacy client error, hyper error, h2 or io
/// error), so the whole chain is searched, the io error being the most
/// precise.
pub fn error_kind(err: &(dyn Error + 'static)) -> &'static str {
    let mut kind = "other";
    let mut cause = Some(err);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io_kind(io).unwrap_or(kind);
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            kind = hyper_kind(hyper).unwrap_or(kind);
        } else if let Some(legacy) = err.downcast_ref::<legacy::Error>() {
            kind = if legacy.is_connect() { "connect" } else { kind };
        } else if let Some(h2) = h2_kind(err) {
            return h2;
        }
        cause = err.source();
    }
    kind
}

fn hyper_kind(err: &hyper::Error) -> Option<&'static str> {
    if err.is_incomplete_message() || err.is_closed() || err.is_canceled() {
        return Some("closed");
    }
    err.is_timeout().then_some("timeout")
}

/// h2's error type is not a dependency here, so its text tells what the
/// peer sent: RST_STREAM (REFUSED_STREAM separately, since it promises the
/// request was not processed) or GOAWAY.
fn h2_kind(err: &dyn Error) -> Option<&'static str> {
    let text = err.to_string();
    if text.starts_with("stream error received: refused stream") {
        Some("refused_stream")
    } else if text.starts_with("stream error received") {
        Some("reset")
    } else if text.starts_with("connection error received") {
        Some("goaway")
    } else {
        None
    }
}

fn io_kind(err: &io::Error) -> Option<&'static str> {
    use io::ErrorKind as K;
    Some(match err.kind() {
        K::ConnectionRefused => "refused",
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
        K::TimedOut => "timeout",
        K::UnexpectedEof => "closed",
        K::HostUnreachable | K::NetworkUnreachable => "unreachable",
        _ => return None,
    })
}
