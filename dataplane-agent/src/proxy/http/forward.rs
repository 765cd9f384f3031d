//! One HTTP request through the service's policies: choose an endpoint,
//! send, and on a failure decide whether another attempt is allowed.

use std::net::SocketAddr;

use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tracing::debug;

use super::body::RequestBody;
use super::headers::strip_hop_by_hop;
use super::reply;
use super::upstream::Body;
use crate::proxy::Proxy;
use crate::state::Service;

/// Why an attempt failed, as far as the proxy could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    /// No connection could be made (refused, timed out, unreachable).
    Connect,
    /// The connection failed while the request was in flight.
    Reset,
}

pub async fn handle(
    proxy: &Proxy,
    service: &Service,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let timeout = service.policy().timeouts.request;
    let attempts = attempt_all(proxy, service, req, peer);
    if timeout.is_zero() {
        return attempts.await;
    }
    match tokio::time::timeout(timeout, attempts).await {
        Ok(response) => response,
        Err(_) => reply::error(StatusCode::GATEWAY_TIMEOUT, "request_timeout"),
    }
}

async fn attempt_all(
    proxy: &Proxy,
    service: &Service,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut body = match RequestBody::prepare(body).await {
        Ok(body) => body,
        Err(err) => {
            debug!(%peer, %err, "client request body failed");
            return reply::error(StatusCode::BAD_REQUEST, "bad_request_body");
        }
    };
    let mut last_error = None;
    for index in service.balancer.attempt_order(service.endpoints.len()) {
        let endpoint = &service.endpoints[index];
        let Some(attempt_body) = body.take() else {
            break;
        };
        let request = match upstream_request(&parts, endpoint.addr, attempt_body) {
            Ok(request) => request,
            Err(_) => return reply::error(StatusCode::BAD_REQUEST, "bad_request_target"),
        };
        let client = service.clients.for_version(parts.version);
        match client.request(request).await {
            Ok(response) => {
                proxy
                    .metrics
                    .forwarded
                    .get_or_create(&endpoint.labels)
                    .inc();
                return downstream_response(response);
            }
            Err(err) => {
                let kind = if err.is_connect() {
                    proxy
                        .metrics
                        .connect_errors
                        .get_or_create(&endpoint.labels)
                        .inc();
                    AttemptError::Connect
                } else {
                    AttemptError::Reset
                };
                debug!(service = %service.id, endpoint = %endpoint.addr, %err, ?kind, "attempt failed");
                last_error = Some(kind);
                // Only a request that never reached the endpoint is safe
                // to send elsewhere without a retry policy.
                if kind != AttemptError::Connect || !body.replayable() {
                    break;
                }
            }
        }
    }
    match last_error {
        None => no_endpoint(service),
        Some(AttemptError::Connect) => no_endpoint(service),
        Some(AttemptError::Reset) => reply::error(StatusCode::BAD_GATEWAY, "upstream_reset"),
    }
}

fn no_endpoint(service: &Service) -> Response<Body> {
    match &service.policy().fallback {
        Some(fallback) => reply::fallback(fallback, "no_healthy_upstream"),
        None => reply::error(StatusCode::SERVICE_UNAVAILABLE, "no_healthy_upstream"),
    }
}

/// The request as sent to `endpoint`: same method, path, headers and
/// version; the URI names the endpoint so the pool picks its connections.
fn upstream_request(
    parts: &http::request::Parts,
    endpoint: std::net::SocketAddrV4,
    body: Body,
) -> Result<Request<Body>, http::Error> {
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri: Uri = format!("http://{endpoint}{path}").parse()?;
    let mut request = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(parts.version)
        .body(body)?;
    *request.headers_mut() = parts.headers.clone();
    Ok(request)
}

fn downstream_response(response: Response<Incoming>) -> Response<Body> {
    use http_body_util::BodyExt as _;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as _).boxed())
}
