//! HTTP/1.1 protocol upgrades. `Upgrade: h2c` is declined (the request is
//! served in HTTP/1.1, which RFC 9110 allows a server to do); other
//! upgrades (WebSocket) are passed through: the request goes to one
//! endpoint on a connection of its own, and if the endpoint switches
//! protocols the two upgraded connections are joined byte for byte.
//! Until the request reaches an endpoint (a refused or timed-out connect)
//! it is tried on the next one, as any request; once sent it is never
//! retried, and once switched the bytes belong to the application
//! protocol.

use std::sync::Arc;
use std::time::Instant;

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::attempt::{AttemptError, AttemptGuard};
use super::request::{give_up, local, no_endpoint, overflow};
use super::{reply, translate};
use crate::health::Outcome;
use crate::proxy::Proxy;
use crate::resilience::{Failure, RetryDecision, RetryState};
use crate::state::{Picker, Service};
use crate::upstream::{Body, UpstreamProtocol};

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    None,
    /// HTTP/1.1 asking to become h2c.
    H2c,
    /// Any other upgrade over HTTP/1.1 (WebSocket).
    Tunnel,
    /// An upgrade the proxy cannot carry (over HTTP/2).
    Unsupported,
}

pub fn kind(req: &Request<Incoming>) -> Kind {
    let Some(upgrade) = req.headers().get(UPGRADE) else {
        return Kind::None;
    };
    if req.version() != Version::HTTP_11 {
        return Kind::Unsupported;
    }
    let h2c = upgrade
        .to_str()
        .is_ok_and(|v| v.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")));
    if h2c { Kind::H2c } else { Kind::Tunnel }
}

/// Removes the h2c upgrade offer so the request is served as HTTP/1.1.
pub fn decline_h2c(headers: &mut HeaderMap) {
    headers.remove(UPGRADE);
    headers.remove(HTTP2_SETTINGS);
}

/// Sends the upgrade request to one endpoint and, on `101 Switching
/// Protocols`, joins the client's and the endpoint's connections.
pub async fn proxy(
    proxy: &Arc<Proxy>,
    service: &Arc<Service>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    // The handshake is a GET: a connect failure is retried under the
    // service's retry policy (retryOn, attempts, budget, maxRetries,
    // backoff), like any request.
    let mut retry = RetryState::for_request(&service.policy().retries, true);
    service.budget.deposit(Instant::now());
    let mut picker = Picker::new(service, None);
    let mut response = loop {
        let Some(chosen) = picker.next(false) else {
            let reason = match picker.tries() {
                0 => "no_healthy_upstream",
                _ => "upstream_connect_failure",
            };
            return no_endpoint(proxy, service, reason);
        };
        let mut guard = AttemptGuard::start(proxy, service, chosen);
        let endpoint = &service.endpoints[chosen.index];
        // Upgrade and Connection are hop-by-hop, but here they are the request.
        let mut upstream = match translate::upstream_request(
            &parts,
            endpoint.addr,
            UpstreamProtocol::Http1,
            reply::full(""),
        ) {
            Ok(upstream) => upstream,
            Err(_) => return local(proxy, service, StatusCode::BAD_REQUEST, "bad_upgrade"),
        };
        upstream
            .headers_mut()
            .insert(CONNECTION, http::HeaderValue::from_static("upgrade"));
        match endpoint.pool.send_upgrade(upstream).await {
            Ok(response) => {
                guard.end(true);
                guard.verdict(Outcome::Status(response.status().as_u16()));
                break response;
            }
            Err(err) => {
                let attempt = AttemptError::from_send(&err);
                guard.failed(&attempt);
                debug!(service = %service.id, endpoint = %endpoint.addr, %err, "upgrade failed");
                if let Some(limit) = attempt.overflow {
                    return overflow(proxy, service, limit);
                }
                if attempt.failure != Failure::ConnectFailure {
                    // Sent: the endpoint may have acted on it.
                    return no_endpoint(proxy, service, "upstream_reset");
                }
                let decision = retry.next(
                    &attempt.failure,
                    true,
                    &service.budget,
                    Some(&service.breaker),
                    picker.rng(),
                    Instant::now(),
                );
                match decision {
                    RetryDecision::Retry { after } => tokio::time::sleep(after).await,
                    RetryDecision::GiveUp(reason) => {
                        return give_up(proxy, service, None, &attempt.failure, reason);
                    }
                }
            }
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(pair) => pair,
                Err(err) => return debug!(%err, "upgrade did not complete"),
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                debug!(%err, "upgraded connection ended with an error");
            }
        });
    }
    response.map(|body| body.map_err(|e| Box::new(e) as _).boxed())
}
