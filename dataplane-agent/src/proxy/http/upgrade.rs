//! HTTP/1.1 protocol upgrades. `Upgrade: h2c` is declined (the request is
//! served in HTTP/1.1, which RFC 9110 allows a server to do); other
//! upgrades (WebSocket) are passed through: the request goes to one
//! endpoint on a connection of its own, and if the endpoint switches
//! protocols the two upgraded connections are joined byte for byte.
//! An upgrade is never retried: once switched, the bytes belong to the
//! application protocol.

use std::sync::Arc;

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::attempt::{AttemptError, AttemptGuard};
use super::request::{local, no_endpoint};
use super::{reply, translate};
use crate::health::Outcome;
use crate::proxy::Proxy;
use crate::state::Service;
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
    let mut available = Vec::new();
    let mut rng = fastrand::Rng::new();
    let Some(chosen) = service.pick(&[], None, &mut available, &mut rng) else {
        return no_endpoint(proxy, service, "no_healthy_upstream");
    };
    let mut guard = AttemptGuard::start(proxy, service, chosen);
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
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
    let mut response = match endpoint.pool.send_upgrade(upstream).await {
        Ok(response) => response,
        Err(err) => {
            guard.end(false);
            if let Some(local) = AttemptError::from_send(&err).local {
                guard.verdict(Outcome::LocalFailure(local));
            }
            debug!(service = %service.id, %err, "upgrade failed");
            return no_endpoint(proxy, service, "upstream_connect_failure");
        }
    };
    guard.end(true);
    guard.verdict(Outcome::Status(response.status().as_u16()));
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
