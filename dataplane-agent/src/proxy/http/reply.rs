//! Responses the proxy makes itself: errors that say which layer failed
//! and why, and the service's configured fallback.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};

use crate::config::Fallback;
use crate::upstream::Body;

/// Names why the proxy answered instead of an endpoint, e.g.
/// `no_healthy_upstream`, `upstream_timeout`.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-dataplane-error");
/// Names the circuit-breaker limit that tripped, e.g. `max_requests`.
pub const OVERFLOW_HEADER: HeaderName = HeaderName::from_static("x-dataplane-overflow");
/// Marks a configured fallback response; its value is the reason.
pub const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-dataplane-fallback");

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A plain-text error from the proxy.
pub fn error(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut response = Response::new(full(format!("{reason}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(reason));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

/// The configured fallback (validated when the config was loaded).
pub fn fallback(fallback: &Fallback, reason: &'static str) -> Response<Body> {
    let mut response = Response::new(full(fallback.body.clone()));
    *response.status_mut() =
        StatusCode::from_u16(fallback.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let headers = response.headers_mut();
    for (name, value) in &fallback.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers.insert(FALLBACK_HEADER, HeaderValue::from_static(reason));
    response
}
