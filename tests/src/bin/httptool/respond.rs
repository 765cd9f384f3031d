//! The backend's request handling: the switchable failure mode, the
//! per-request override headers, `/control` and `/stats`.
//!
//! Resilience tests (retries, outlier detection, timeouts, circuit
//! breaking) need a backend that fails in a chosen way and can be switched
//! while the proxy keeps its connections, so the mode lives in shared
//! state changed by `POST /control` rather than in a restart.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;

use crate::opts::{format_duration, parse_duration};

/// Largest request body read (echoed back); larger bodies are refused.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// A request body must arrive within this, or the request is dropped.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap on any delay (mode plus header), so that a typo cannot park a
/// request for hours.
const MAX_DELAY: Duration = Duration::from_secs(60);

pub type Body = BoxBody<Bytes, Infallible>;

/// How the backend answers ordinary requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 with the backend name (or the echoed body).
    Ok,
    /// This status instead of 200.
    Status(StatusCode),
    /// No response at all: HTTP/1 connections are reset (RST), HTTP/2
    /// streams get RST_STREAM.
    Reset,
    /// Wait, then answer as `Ok`.
    Delay(Duration),
    /// Answer 200, then close the connection (`Connection: close` on
    /// HTTP/1, GOAWAY on HTTP/2).
    Close,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Mode, String> {
        let bad = || format!("bad mode {text:?}");
        match text.split_once(':') {
            None if text == "ok" => Ok(Mode::Ok),
            None if text == "reset" => Ok(Mode::Reset),
            None if text == "close" => Ok(Mode::Close),
            Some(("status", code)) => code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .map(Mode::Status)
                .ok_or_else(bad),
            Some(("delay", d)) => parse_duration(d)
                .filter(|d| *d <= MAX_DELAY)
                .map(Mode::Delay)
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Ok => f.write_str("ok"),
            Mode::Status(code) => write!(f, "status:{}", code.as_u16()),
            Mode::Reset => f.write_str("reset"),
            Mode::Delay(d) => write!(f, "delay:{}", format_duration(*d)),
            Mode::Close => f.write_str("close"),
        }
    }
}

/// State shared by every connection of one `serve`.
pub struct Backend {
    name: String,
    name_header: HeaderValue,
    mode: Mutex<Mode>,
    requests: AtomicU64,
}

impl Backend {
    pub fn new(name: &str) -> Result<Backend, String> {
        let name_header =
            HeaderValue::from_str(name).map_err(|_| format!("bad backend name {name:?}"))?;
        Ok(Backend {
            name: name.to_owned(),
            name_header,
            mode: Mutex::new(Mode::Ok),
            requests: AtomicU64::new(0),
        })
    }

    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }
}

/// What the connection must do besides (or instead of) answering.
pub enum Action {
    Respond(Response<Body>),
    /// Answer, then shut the connection down gracefully.
    RespondAndClose(Response<Body>),
    /// Drop the request without any response.
    Reset,
}

/// Handles one request.
pub async fn handle(req: Request<Incoming>, backend: &Backend) -> Action {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/control") => Action::Respond(post_control(req, backend).await),
        (&Method::GET, "/control") => {
            Action::Respond(text(StatusCode::OK, format!("mode={}\n", backend.mode())))
        }
        (&Method::GET, "/stats") => Action::Respond(stats(backend)),
        _ => {
            backend.requests.fetch_add(1, Ordering::Relaxed);
            answer(req, backend).await
        }
    }
}

/// `POST /control` with `mode=<mode>` in the query or the body.
async fn post_control(req: Request<Incoming>, backend: &Backend) -> Response<Body> {
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = read_body(req.into_body(), 4096).await.unwrap_or_default();
    let body = String::from_utf8_lossy(&body);
    let Some(value) = form_value(&query, "mode").or_else(|| form_value(body.trim(), "mode")) else {
        return text(StatusCode::BAD_REQUEST, "missing mode=\n".into());
    };
    match value.parse::<Mode>() {
        Ok(mode) => {
            backend.set_mode(mode);
            text(StatusCode::OK, format!("mode={mode}\n"))
        }
        Err(msg) => text(StatusCode::BAD_REQUEST, format!("{msg}\n")),
    }
}

fn stats(backend: &Backend) -> Response<Body> {
    let json = serde_json::json!({
        "name": backend.name,
        "requests": backend.requests.load(Ordering::Relaxed),
    });
    let mut resp = text(StatusCode::OK, format!("{json}\n"));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Per-request overrides, so a test can make single requests fail or
/// slow without switching the whole backend.
struct Overrides {
    status: Option<StatusCode>,
    delay: Duration,
}

impl Overrides {
    fn from_headers(headers: &HeaderMap) -> Overrides {
        let number = |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.parse().ok() };
        Overrides {
            status: number("x-test-status")
                .and_then(|c| u16::try_from(c).ok())
                .and_then(|c| StatusCode::from_u16(c).ok()),
            delay: Duration::from_millis(number("x-test-delay-ms").unwrap_or(0)),
        }
    }
}

/// An ordinary request, answered according to the mode and overrides.
async fn answer(req: Request<Incoming>, backend: &Backend) -> Action {
    let mode = backend.mode();
    if mode == Mode::Reset {
        return Action::Reset;
    }
    let overrides = Overrides::from_headers(req.headers());
    let grpc = is_grpc(req.headers());
    let version = req.version();
    let Some(body) = read_body(req.into_body(), MAX_BODY).await else {
        return Action::Reset;
    };
    let mode_delay = match mode {
        Mode::Delay(d) => d,
        _ => Duration::ZERO,
    };
    let delay = (mode_delay + overrides.delay).min(MAX_DELAY);
    // Even a zero sleep waits for tokio's next millisecond tick.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = match (overrides.status, mode) {
        (Some(status), _) | (None, Mode::Status(status)) => status,
        _ => StatusCode::OK,
    };
    let payload = if body.is_empty() {
        Bytes::from(format!("{}\n", backend.name))
    } else {
        body
    };
    let mut resp = match grpc && status == StatusCode::OK {
        true => grpc_ok(payload),
        false => bytes(status, payload),
    };
    resp.headers_mut()
        .insert("x-backend", backend.name_header.clone());
    if mode != Mode::Close {
        return Action::Respond(resp);
    }
    // `Connection` is illegal in HTTP/2; there GOAWAY does the closing.
    if version < Version::HTTP_2 {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Action::RespondAndClose(resp)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A successful gRPC answer: the status lives in trailers, which is what
/// a proxy most easily breaks (HTTP/1 downgrade, buffering).
fn grpc_ok(payload: Bytes) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("grpc-message", HeaderValue::from_static("ok"));
    let body = Full::new(payload)
        .with_trailers(std::future::ready(Some(Ok(trailers))))
        .boxed();
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// The whole body, or `None` if it is too large, broken or too slow.
async fn read_body(body: Incoming, limit: usize) -> Option<Bytes> {
    let collect = Limited::new(body, limit).collect();
    let collected = tokio::time::timeout(BODY_TIMEOUT, collect).await.ok()?;
    Some(collected.ok()?.to_bytes())
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    bytes(status, Bytes::from(body))
}

fn bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = status;
    resp
}

/// The value of `key` in an `a=b&c=d` string, percent-decoded.
fn form_value(form: &str, key: &str) -> Option<String> {
    form.split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

/// Minimal `%XX` decoding (`status%3A503`); invalid escapes stay as is.
fn percent_decode(text: &str) -> String {
    let raw = text.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        for text in ["ok", "reset", "close", "status:503", "delay:300ms"] {
            let mode: Mode = text.parse().expect(text);
            assert_eq!(mode.to_string(), text);
        }
        assert_eq!(
            "delay:2s".parse::<Mode>(),
            Ok(Mode::Delay(Duration::from_secs(2)))
        );
        for bad in ["", "status:", "status:99", "delay:5", "delay:1h", "nope"] {
            assert!(bad.parse::<Mode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(
            form_value("a=1&mode=status%3A503", "mode").as_deref(),
            Some("status:503")
        );
        assert_eq!(
            form_value("mode=delay:300ms", "mode").as_deref(),
            Some("delay:300ms")
        );
        assert_eq!(form_value("x=1", "mode"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
