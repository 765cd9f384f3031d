//! Admin HTTP endpoint: `/metrics` (Prometheus), `/healthz` (liveness),
//! `/ready` (readiness: false while starting and draining), `/config_dump`
//! (the mesh config in force), `/clusters` (services and endpoints as the
//! proxy sees them now).

mod clusters;

pub use clusters::{BreakerStatus, Clusters, EndpointStatus, ServiceStatus};

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::debug;

use crate::config::MeshConfig;
use crate::state::SharedServices;

pub struct Admin {
    pub registry: Registry,
    pub ready: AtomicBool,
    pub config: arc_swap::ArcSwap<MeshConfig>,
    /// The proxy's services, for `/clusters`.
    pub services: SharedServices,
}

impl Admin {
    /// Serves until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let admin = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    async move { Ok::<_, Infallible>(admin.route(&req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(err) = conn.await {
                    debug!(%err, "admin connection error");
                }
            });
        }
    }

    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => self.metrics(),
            // Liveness: the process answers. Unlike /ready it stays OK
            // while starting and draining, so the kubelet does not restart
            // an agent that is busy doing what it should.
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/ready" if self.ready.load(Ordering::Acquire) => {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            }
            "/ready" => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "starting\n".into(),
            ),
            "/config_dump" => json(&**self.config.load()),
            "/clusters" => json(&Clusters::of(
                &self.services.load(),
                std::time::Instant::now(),
            )),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            Ok(()) => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(err) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                err.to_string(),
            ),
        }
    }
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(json) => reply(StatusCode::OK, "application/json", json),
        Err(err) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            err.to_string(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
