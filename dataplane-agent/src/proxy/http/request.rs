//! One HTTP request through the service's policies:
//!
//! ```text
//! rate limit -> maxRequests permit -> [attempt: pick endpoint (balancer
//! over endpoints outlier detection lets through, a new host on retries)
//! -> send (per-try timeout, bounded by the request deadline) -> verdict
//! for outlier detection -> retriable failure? retry policy (method
//! idempotent?) + maxRetries + budget -> backoff -> next attempt] ->
//! response (with `x-dataplane-error` when a retry was refused), or a
//! local reply that says why (or the service's fallback)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant as Deadline;
use tracing::debug;

use super::attempt::{AttemptError, AttemptGuard};
use super::headers::strip_hop_by_hop;
use super::replay::RequestBody;
use super::{grpc, reply, translate, upgrade};
use crate::balance::{HashSource, hash_key};
use crate::health::LocalFailure;
use crate::metrics::ProxyMetrics;
use crate::proxy::Proxy;
use crate::ratelimit::{Decision, HeaderLookup, Request as RateRequest, retry_after_header};
use crate::resilience::{Failure, GiveUpReason, Limit, Permit, RetryDecision, RetryState};
use crate::state::{Picker, Service};
use crate::upstream::Body;

pub async fn handle(
    proxy: &Arc<Proxy>,
    service: &Arc<Service>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> (Response<Body>, Option<Permit>) {
    // What the access log needs, taken before the request is consumed.
    let logged = proxy
        .access_log
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(|| (req.method().clone(), req.uri().clone(), Instant::now()));
    let (response, slot) = match handle_admitted(proxy, service, req, peer).await {
        Ok((response, slot)) => (response, Some(slot)),
        Err(response) => (response, None),
    };
    let code = response.status().as_u16();
    service.counters.response(&proxy.metrics, &service.id, code);
    if let Some((method, uri, started)) = logged {
        access_log(service, peer, &method, &uri, &response, started);
    }
    (response, slot)
}

/// One line per request (`--access-log`), at info level with target
/// `access`: who called what, the status, how long the proxy took to the
/// response head, and why the proxy failed or gave up, if it did.
fn access_log(
    service: &Service,
    peer: SocketAddr,
    method: &Method,
    uri: &http::Uri,
    response: &Response<Body>,
    started: Instant,
) {
    let error = response
        .headers()
        .get(reply::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let upstream_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        target: "access",
        service = %service.id,
        %peer,
        %method,
        path = %uri.path(),
        status = response.status().as_u16(),
        error = %error,
        upstream_ms = format_args!("{upstream_ms:.1}"),
        "request"
    );
}

async fn handle_admitted(
    proxy: &Arc<Proxy>,
    service: &Arc<Service>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<(Response<Body>, Permit), Response<Body>> {
    if req.method() == Method::CONNECT {
        return Err(local(
            proxy,
            service,
            StatusCode::NOT_IMPLEMENTED,
            "connect_not_supported",
        ));
    }
    let upgrade = upgrade::kind(&req);
    if upgrade == upgrade::Kind::H2c {
        // A server may ignore an upgrade offer: answer in HTTP/1.1 (the
        // client goes on in HTTP/1.1, as RFC 9110 7.8 allows).
        upgrade::decline_h2c(req.headers_mut());
    }
    admit_rate(proxy, service, &req, peer).await?;
    let slot = service
        .breaker
        .try_acquire(Limit::Requests)
        .map_err(|tripped| overflow(proxy, service, tripped.limit))?;
    let response = match upgrade {
        upgrade::Kind::Tunnel => upgrade::proxy(proxy, service, req).await,
        upgrade::Kind::None | upgrade::Kind::H2c => attempt_all(proxy, service, req, peer).await,
        upgrade::Kind::Unsupported => local(
            proxy,
            service,
            StatusCode::NOT_IMPLEMENTED,
            "upgrade_not_supported",
        ),
    };
    // The caller holds the slot until the response body is done.
    Ok((response, slot))
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
            proxy.metrics.rate_limited(&service.id, pod, "delayed");
            tokio::time::sleep(wait).await;
            drop(slot);
            Ok(())
        }
        Decision::Reject { retry_after } => {
            proxy.metrics.rate_limited(&service.id, pod, "rejected");
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

/// Methods a client may send twice with the effect of once (RFC 9110
/// 9.2.2), and requests that say so with an `Idempotency-Key`.
fn idempotent(parts: &http::request::Parts) -> bool {
    matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || parts.headers.contains_key("idempotency-key")
}

/// A failed attempt that ends the request whatever the retry policy says.
enum Final {
    /// The request deadline passed.
    TimedOut,
    /// The client's own body failed: its fault, answered 400.
    ClientBody,
}

async fn attempt_all(
    proxy: &Arc<Proxy>,
    service: &Arc<Service>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let policy = &service.policy().retries;
    let mut body = RequestBody::new(body, policy.attempts > 0);
    let timeout = service.policy().timeouts.request;
    let deadline = (!timeout.is_zero()).then(|| Deadline::now() + timeout);
    let is_grpc = grpc::is_grpc(&parts.headers);
    let hash = request_hash(service, &parts, peer);
    let mut retry = RetryState::for_request(policy, idempotent(&parts));
    let mut picker = Picker::new(service, hash);
    service.budget.deposit(Instant::now());
    loop {
        let Some(chosen) = picker.next(true) else {
            return no_endpoint(proxy, service, "no_healthy_upstream");
        };
        let guard = AttemptGuard::start(proxy, service, chosen);
        let attempt = send_once(service, chosen.index, &parts, &mut body, deadline).await;
        let (failure, response) = match attempt {
            Ok(response) => {
                let response = guard.judge(is_grpc, response);
                match response_failure(service, is_grpc, &response) {
                    None => return downstream_response(response, None),
                    Some(failure) => (failure, Some(response)),
                }
            }
            Err(err) => {
                let ending = attempt_failed(guard, &err, &body, deadline);
                if let Some(limit) = err.overflow {
                    return overflow(proxy, service, limit);
                }
                match ending {
                    Some(Final::TimedOut) => return request_timeout(proxy, service),
                    Some(Final::ClientBody) => {
                        return local(proxy, service, StatusCode::BAD_REQUEST, "bad_request_body");
                    }
                    _ => (err.failure, None),
                }
            }
        };
        if deadline.is_some_and(|d| Deadline::now() >= d) {
            // No time left for a retry: do not spend budget or a permit.
            return request_timeout(proxy, service);
        }
        let decision = retry.next(
            &failure,
            body.replayable(),
            &service.budget,
            Some(&service.breaker),
            picker.rng(),
            Instant::now(),
        );
        match decision {
            RetryDecision::Retry { after } => {
                if deadline.is_some_and(|d| Deadline::now() + after >= d) {
                    return request_timeout(proxy, service);
                }
                debug!(service = %service.id, ?failure, ?after, "retrying");
                service.counters.retry(&proxy.metrics, &service.labels);
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
                return give_up(proxy, service, response, &failure, reason);
            }
        }
    }
}

/// The verdict on a failed attempt, and whether the request ends here.
fn attempt_failed(
    guard: AttemptGuard,
    err: &AttemptError,
    body: &RequestBody,
    deadline: Option<Deadline>,
) -> Option<Final> {
    if body.client_failed() {
        // Dropping the guard gives no verdict: the endpoint did nothing wrong.
        return Some(Final::ClientBody);
    }
    guard.failed(err);
    let expired = deadline.is_some_and(|d| Deadline::now() >= d);
    (err.failure == Failure::Timeout && expired).then_some(Final::TimedOut)
}

/// One try against `endpoints[index]`, within the per-try timeout and the
/// request deadline.
async fn send_once(
    service: &Service,
    index: usize,
    parts: &http::request::Parts,
    body: &mut RequestBody,
    deadline: Option<Deadline>,
) -> Result<Response<Body>, AttemptError> {
    let endpoint = &service.endpoints[index];
    let Some(attempt_body) = body.take() else {
        // Unreachable: retries of an unreplayable body are refused earlier.
        return Err(AttemptError::local(Failure::Reset, LocalFailure::Other));
    };
    let protocol = translate::protocol_for(service.config.upstream_protocol, parts.version);
    let request = translate::upstream_request(parts, endpoint.addr, protocol, attempt_body)
        .map_err(|_| AttemptError::local(Failure::Reset, LocalFailure::Other))?;
    // A derived per-try timeout is there to leave time for a retry: a
    // request that cannot be retried after a timeout keeps the whole
    // request timeout (a set one always applies).
    let policy = service.policy();
    // Judged only when the timeout is the derived one (a set one always
    // applies): no scan of `retryOn` per try otherwise.
    let may_retry = || {
        policy.retries.attempts > 0
            && (idempotent(parts) || policy.retries.retry_non_idempotent)
            && policy.retries.is_retriable(&Failure::Timeout)
    };
    let per_try = match policy.retries.per_try_timeout {
        None if !may_retry() => None,
        _ => policy.per_try_timeout(),
    }
    .map(|t| Deadline::now() + t);
    // Which limit applies, and whether running into it blames the
    // endpoint: its per-try timeout always does; the request deadline only
    // if the attempt was given at least half the request timeout (not a
    // retry left with what a slow earlier attempt did not use).
    let now = Deadline::now();
    let half_request = service.policy().timeouts.request / 2;
    let fair = |deadline: Deadline| deadline.saturating_duration_since(now) >= half_request;
    let limit = match (per_try, deadline) {
        (Some(try_limit), Some(deadline)) if deadline < try_limit => {
            Some((deadline, fair(deadline)))
        }
        (Some(try_limit), _) => Some((try_limit, true)),
        (None, Some(deadline)) => Some((deadline, fair(deadline))),
        (None, None) => None,
    };
    let send = endpoint.pool.send(request, protocol);
    let result = match limit {
        Some((limit, blame)) => tokio::time::timeout_at(limit, send)
            .await
            .map_err(|_| AttemptError::timeout(blame))?,
        None => send.await,
    };
    result.map_err(|err| {
        debug!(service = %service.id, %err, "attempt failed");
        AttemptError::from_send(&err)
    })
}

/// Whether the retry policy wants another try for this response: a
/// retriable status, or a gRPC error status in a trailers-only response.
fn response_failure(
    service: &Service,
    is_grpc: bool,
    response: &Response<Body>,
) -> Option<Failure> {
    let policy = &service.policy().retries;
    if let Some(failure) = policy.status_failure(response.status().as_u16()) {
        return Some(failure);
    }
    if !is_grpc {
        return None;
    }
    policy.grpc_failure(grpc::status(response.headers())?)
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

/// The caller gets the last failure (the endpoint's `response`, or the
/// proxy's reply for `failure`), and learns from `x-dataplane-error` when
/// a retry that would have been made was refused.
pub fn give_up(
    proxy: &Proxy,
    service: &Service,
    response: Option<Response<Body>>,
    failure: &Failure,
    reason: GiveUpReason,
) -> Response<Body> {
    // With `attempts: 0` nothing was hidden: failing fast was asked for.
    let hidden_retry = reason
        .error_header()
        .filter(|_| service.policy().retries.attempts > 0);
    // `maxRetries` is a circuit breaker: its overflow is counted and named
    // like the others', on whatever response the caller gets.
    let overflowed = (reason == GiveUpReason::BreakerOpen).then_some(Limit::Retries);
    if let Some(limit) = overflowed {
        ProxyMetrics::reason(&proxy.metrics.overflows, &service.id, limit.as_str());
    }
    let mut response = match response {
        Some(response) => downstream_response(response, hidden_retry),
        None => {
            let mut response = failure_reply(proxy, service, failure);
            if let Some(why) = hidden_retry
                && let Some(value) = response
                    .headers()
                    .get(reply::ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|first| HeaderValue::from_str(&format!("{first}, {why}")).ok())
            {
                response.headers_mut().insert(reply::ERROR_HEADER, value);
            }
            response
        }
    };
    if let Some(limit) = overflowed {
        response.headers_mut().insert(
            reply::OVERFLOW_HEADER,
            HeaderValue::from_static(limit.as_str()),
        );
    }
    response
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

fn request_timeout(proxy: &Proxy, service: &Service) -> Response<Body> {
    local(
        proxy,
        service,
        StatusCode::GATEWAY_TIMEOUT,
        "request_timeout",
    )
}

/// No endpoint could serve the request: the fallback if configured.
pub fn no_endpoint(proxy: &Proxy, service: &Service, reason: &'static str) -> Response<Body> {
    match &service.policy().fallback {
        Some(fallback) => {
            ProxyMetrics::reason(&proxy.metrics.fallbacks, &service.id, reason);
            reply::fallback(fallback, reason)
        }
        None => local(proxy, service, StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

/// A circuit breaker tripped: 503 naming the limit (or the fallback).
pub fn overflow(proxy: &Proxy, service: &Service, limit: Limit) -> Response<Body> {
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

pub fn local(
    proxy: &Proxy,
    service: &Service,
    status: StatusCode,
    reason: &'static str,
) -> Response<Body> {
    ProxyMetrics::reason(&proxy.metrics.local_replies, &service.id, reason);
    reply::error(status, reason)
}

/// The endpoint's response as the client gets it; `error` names a retry
/// the proxy refused, so the caller knows why it sees the failure.
fn downstream_response(response: Response<Body>, error: Option<&'static str>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(error) = error {
        parts
            .headers
            .insert(reply::ERROR_HEADER, HeaderValue::from_static(error));
    }
    Response::from_parts(parts, body)
}
