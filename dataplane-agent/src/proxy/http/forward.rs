//! One HTTP request through the service's policies:
//!
//! ```text
//! admit (max_requests breaker) -> [attempt: pick endpoint (balancer over
//! endpoints outlier detection lets through, a new host on retries) ->
//! send (per-try timeout) -> record outcome (outlier detection, balancer
//! latency) -> retriable failure? retry policy + budget + max_retries
//! breaker -> backoff -> next attempt] -> response, or a local reply that
//! says why (or the service's fallback)
//! ```
//! The whole is bounded by the service's request timeout.

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{HOST, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tracing::debug;

use super::body::RequestBody;
use super::guard::{AttemptGuard, GuardedBody};
use super::headers::strip_hop_by_hop;
use super::reply;
use super::upstream::{Body, tripped_limit};
use crate::balance::{HashSource, hash_key};
use crate::health::{LocalFailure, Outcome};
use crate::metrics::ProxyMetrics;
use crate::proxy::Proxy;
use crate::ratelimit::{Decision, HeaderLookup, Request as RateRequest, retry_after_header};
use crate::resilience::{Failure, GiveUpReason, Limit, RetryDecision, RetryState};
use crate::state::{Chosen, Service};

/// Why one attempt produced no usable response.
struct AttemptError {
    failure: Failure,
    /// What outlier detection is told; `None` when the endpoint is not to
    /// blame (a circuit breaker refused the connection).
    local: Option<LocalFailure>,
    overflow: Option<Limit>,
}

pub async fn handle(
    proxy: &Proxy,
    service: &Service,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let response = match handle_admitted(proxy, service, req, peer).await {
        Ok(response) | Err(response) => response,
    };
    let labels = crate::metrics::ResponseLabels {
        service: service.id.clone(),
        code: response.status().as_u16(),
    };
    proxy.metrics.http_responses.get_or_create(&labels).inc();
    response
}

async fn handle_admitted(
    proxy: &Proxy,
    service: &Service,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Response<Body>> {
    if req.method() == Method::CONNECT || req.headers().contains_key(UPGRADE) {
        // Tunnels and protocol upgrades (WebSocket) are not proxied yet:
        // say so instead of forwarding a request that cannot work.
        return Err(local(
            proxy,
            service,
            StatusCode::NOT_IMPLEMENTED,
            "upgrade_not_supported",
        ));
    }
    admit_rate(proxy, service, &req, peer).await?;
    let slot = service
        .breaker
        .try_acquire(Limit::Requests)
        .map_err(|tripped| overflow(proxy, service, tripped.limit))?;
    let timeout = service.policy().timeouts.request;
    let attempts = attempt_all(proxy, service, req, peer);
    let response = if timeout.is_zero() {
        attempts.await
    } else {
        tokio::time::timeout(timeout, attempts).await.map_err(|_| {
            local(
                proxy,
                service,
                StatusCode::GATEWAY_TIMEOUT,
                "request_timeout",
            )
        })?
    };
    // The slot is held until the response body is done.
    Ok(response.map(|body| GuardedBody::wrap(body, Some(slot))))
}

/// Request headers as the rate limiter's classes see them.
struct Headers<'a>(&'a http::HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name)?.to_str().ok()
    }
}

/// The service's rate limit: passes, waits in the bounded delay queue
/// (which counts as pending for `maxPendingRequests`), or answers 429.
async fn admit_rate(
    proxy: &Proxy,
    service: &Service,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<(), Response<Body>> {
    let Some(limiter) = &service.limiter else {
        return Ok(());
    };
    // Decided before any await: the lookups borrow non-Send state.
    let (decision, pod) = {
        let services = proxy.services.load();
        let pod = services.pod_at(peer.ip());
        let headers = Headers(req.headers());
        let decision = limiter.check(&RateRequest::http(pod, &headers), Instant::now());
        (decision, pod.map(str::to_string))
    };
    let pod = pod.as_deref();
    match decision {
        Decision::Allow => Ok(()),
        Decision::Delay { wait, slot } => {
            let Ok(_pending) = service.breaker.try_acquire(Limit::PendingRequests) else {
                return Err(overflow(proxy, service, Limit::PendingRequests));
            };
            proxy.metrics.rate_limited(service, pod, "delayed");
            tokio::time::sleep(wait).await;
            drop(slot);
            Ok(())
        }
        Decision::Reject { retry_after } => {
            proxy.metrics.rate_limited(service, pod, "rejected");
            let mut response = local(
                proxy,
                service,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
            );
            if let Ok(value) = HeaderValue::from_str(&retry_after_header(retry_after)) {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, value);
            }
            Err(response)
        }
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
    let mut body = RequestBody::new(body);
    let hash = request_hash(service, &parts, peer);
    let policy = &service.policy().retries;
    let mut retry = RetryState::new(policy);
    let capacity = (policy.attempts as usize)
        .saturating_add(1)
        .min(service.endpoints.len());
    let mut tried = Vec::with_capacity(capacity);
    let mut available = Vec::new();
    let mut rng = fastrand::Rng::new();
    service.budget.deposit(Instant::now());
    loop {
        let Some(chosen) = service.pick(&tried, hash, &mut available, &mut rng) else {
            return no_endpoint(proxy, service, "no_healthy_upstream");
        };
        tried.push(chosen.index);
        let (failure, response) = match send_once(proxy, service, chosen, &parts, &mut body).await {
            Ok(response) => match response_failure(service, &response) {
                None => return downstream_response(response),
                Some(failure) => (failure, Some(response)),
            },
            Err(err) => {
                if let Some(limit) = err.overflow {
                    return overflow(proxy, service, limit);
                }
                (err.failure, None)
            }
        };
        let now = Instant::now();
        let replayable = body.replayable();
        match retry.next(
            &failure,
            replayable,
            &service.budget,
            Some(&service.breaker),
            &mut rng,
            now,
        ) {
            RetryDecision::Retry { after } => {
                debug!(service = %service.id, ?failure, ?after, "retrying");
                proxy.metrics.retries.get_or_create(&service.labels).inc();
                tokio::time::sleep(after).await;
            }
            RetryDecision::GiveUp(reason) => {
                if reason != GiveUpReason::NotRetriable {
                    ProxyMetrics::reason(
                        &proxy.metrics.retry_giveups,
                        &service.id,
                        reason.as_str(),
                    );
                }
                return match response {
                    Some(response) => downstream_response(response),
                    None => failure_reply(proxy, service, &failure),
                };
            }
        }
    }
}

/// One try against the chosen endpoint, reporting its outcome to outlier
/// detection and the balancer (also if the try is abandoned half-way).
async fn send_once(
    proxy: &Proxy,
    service: &Service,
    chosen: Chosen,
    parts: &http::request::Parts,
    body: &mut RequestBody,
) -> Result<Response<Incoming>, AttemptError> {
    let endpoint = &service.endpoints[chosen.index];
    let guard = AttemptGuard::start(proxy, service, chosen.index);
    let Some(attempt_body) = body.take() else {
        // Unreachable: retries of a streamed body are refused earlier.
        guard.finish(None, false);
        return Err(AttemptError::local(Failure::Reset, LocalFailure::Other));
    };
    let request = match upstream_request(parts, endpoint.addr, attempt_body) {
        Ok(request) => request,
        Err(_) => {
            guard.finish(None, false);
            return Err(AttemptError::local(Failure::Reset, LocalFailure::Other));
        }
    };
    let client = endpoint.clients.for_version(parts.version);
    let result = match service.policy().retries.per_try_timeout {
        Some(limit) => match tokio::time::timeout(limit, client.request(request)).await {
            Ok(result) => result.map_err(|e| classify_error(&e)),
            Err(_) => Err(AttemptError::local(Failure::Timeout, LocalFailure::Other)),
        },
        None => client
            .request(request)
            .await
            .map_err(|e| classify_error(&e)),
    };
    let outcome = match &result {
        Ok(response) => Some(Outcome::Status(response.status().as_u16())),
        Err(err) => err.local.map(Outcome::LocalFailure),
    };
    // A probe must always report back, or its slot stays taken.
    let outcome = outcome.or(chosen
        .probe
        .then_some(Outcome::LocalFailure(LocalFailure::Other)));
    guard.finish(outcome, result.is_ok());
    result
}

impl AttemptError {
    fn local(failure: Failure, local: LocalFailure) -> Self {
        Self {
            failure,
            local: Some(local),
            overflow: None,
        }
    }
}

fn classify_error(err: &hyper_util::client::legacy::Error) -> AttemptError {
    if let Some(limit) = tripped_limit(err) {
        return AttemptError {
            failure: Failure::ConnectFailure,
            local: None,
            overflow: Some(limit),
        };
    }
    if err.is_connect() {
        let timed_out = std::error::Error::source(err)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
        let local = if timed_out {
            LocalFailure::ConnectTimeout
        } else {
            LocalFailure::ConnectRefused
        };
        return AttemptError::local(Failure::ConnectFailure, local);
    }
    if refused_stream(err) {
        // The server did not process the stream (HTTP/2 REFUSED_STREAM):
        // safe to retry, and not the endpoint's fault.
        return AttemptError {
            failure: Failure::RefusedStream,
            local: None,
            overflow: None,
        };
    }
    AttemptError::local(Failure::Reset, LocalFailure::Reset)
}

fn refused_stream(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// Whether the retry policy wants another try for this response: a
/// retriable status, or a gRPC error status in a trailers-only response.
fn response_failure(service: &Service, response: &Response<Incoming>) -> Option<Failure> {
    let policy = &service.policy().retries;
    if let Some(failure) = policy.status_failure(response.status().as_u16()) {
        return Some(failure);
    }
    let grpc = response.headers().get("grpc-status")?.to_str().ok()?;
    policy.grpc_failure(grpc.parse().ok()?)
}

/// The key for ring-hash and Maglev balancing, if configured.
fn request_hash(service: &Service, parts: &http::request::Parts, peer: SocketAddr) -> Option<u64> {
    match service.policy().load_balancer.hash.source()? {
        HashSource::Header(name) => parts.headers.get(name).map(|v| hash_key(v.as_bytes())),
        HashSource::SourceIp => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
    }
}

/// The proxy's answer when the last attempt got no response.
fn failure_reply(proxy: &Proxy, service: &Service, failure: &Failure) -> Response<Body> {
    match failure {
        Failure::ConnectFailure => no_endpoint(proxy, service, "upstream_connect_failure"),
        Failure::Timeout => local(
            proxy,
            service,
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_per_try_timeout",
        ),
        _ => local(
            proxy,
            service,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_reset",
        ),
    }
}

/// No endpoint could serve the request: the fallback if configured.
fn no_endpoint(proxy: &Proxy, service: &Service, reason: &'static str) -> Response<Body> {
    match &service.policy().fallback {
        Some(fallback) => {
            ProxyMetrics::reason(&proxy.metrics.fallbacks, &service.id, reason);
            reply::fallback(fallback, reason)
        }
        None => local(proxy, service, StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

/// A circuit breaker tripped: 503 naming the limit (or the fallback).
fn overflow(proxy: &Proxy, service: &Service, limit: Limit) -> Response<Body> {
    ProxyMetrics::reason(&proxy.metrics.overflows, &service.id, limit.as_str());
    let mut response = match &service.policy().fallback {
        Some(fallback) => {
            ProxyMetrics::reason(&proxy.metrics.fallbacks, &service.id, limit.as_str());
            reply::fallback(fallback, limit.as_str())
        }
        None => local(proxy, service, StatusCode::SERVICE_UNAVAILABLE, "overflow"),
    };
    response.headers_mut().insert(
        reply::OVERFLOW_HEADER,
        HeaderValue::from_static(limit.as_str()),
    );
    response
}

fn local(
    proxy: &Proxy,
    service: &Service,
    status: StatusCode,
    reason: &'static str,
) -> Response<Body> {
    ProxyMetrics::reason(&proxy.metrics.local_replies, &service.id, reason);
    reply::error(status, reason)
}

/// The request as sent upstream: same method, path, headers and version.
/// The connection goes to the endpoint whatever the URI says (each
/// endpoint has its own pools), so the URI keeps the client's authority,
/// which becomes HTTP/2's `:authority`; failing that, the Host header, or
/// the endpoint.
fn upstream_request(
    parts: &http::request::Parts,
    endpoint: std::net::SocketAddrV4,
    body: Body,
) -> Result<Request<Body>, http::Error> {
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| Some(parts.headers.get(HOST)?.to_str().ok()?.to_string()))
        .unwrap_or_else(|| endpoint.to_string());
    let uri: Uri = match format!("http://{authority}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => format!("http://{endpoint}{path}").parse()?,
    };
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
