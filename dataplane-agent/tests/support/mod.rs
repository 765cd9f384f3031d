//! In-process harness for the HTTP request path: the real proxy (policies,
//! pools, hyper on both sides) on loopback sockets, with test backends
//! that can be told to fail in each way a real one does. No root needed.

#![allow(dead_code, reason = "each test file uses part of the harness")]

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use dataplane_agent::config::MeshConfig;
use dataplane_agent::metrics::ProxyMetrics;
use dataplane_agent::proxy::Proxy;
use dataplane_agent::state::{NodeContext, ServiceTable};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How a test backend answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 200 with its name as the body.
    Ok,
    /// 200 after a delay.
    Delay(Duration),
    /// This status.
    Status(u16),
    /// Reads the request, then resets the connection.
    Reset,
    /// Accepts and never answers.
    Hang,
    /// 200 with the request body echoed.
    Echo,
    /// gRPC-style: 200, a message, then trailers with this grpc-status.
    GrpcTrailers(u32),
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddrV4,
    /// Requests answered (any status).
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    mode: Arc<Mutex<Mode>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Backend {
    pub async fn start(name: &str, mode: Mode) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to IPv4")
        };
        let backend = Self {
            name: name.to_string(),
            addr,
            hits: Arc::default(),
            connections: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
            tasks: Arc::default(),
        };
        let accept = tokio::spawn(accept_loop(
            listener,
            name.to_string(),
            Arc::clone(&backend.mode),
            Arc::clone(&backend.hits),
            Arc::clone(&backend.connections),
            Arc::clone(&backend.tasks),
        ));
        backend.tasks.lock().unwrap().push(accept);
        backend
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// The process dies: its listener and every connection close at once.
    pub fn kill(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.fetch_add(1, Ordering::SeqCst);
        let current = mode.lock().unwrap().clone();
        let (name, mode, hits) = (name.clone(), Arc::clone(&mode), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            match current {
                Mode::Hang => hang(stream).await,
                Mode::Reset => reset_after_request(stream, &hits).await,
                _ => serve(stream, name, mode, hits).await,
            }
        });
        tasks.lock().unwrap().push(task);
    }
}

async fn hang(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
}

async fn reset_after_request(mut stream: TcpStream, hits: &AtomicUsize) {
    let mut buf = [0u8; 4096];
    let _ = stream.read(&mut buf).await;
    hits.fetch_add(1, Ordering::SeqCst);
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn serve(stream: TcpStream, name: String, mode: Arc<Mutex<Mode>>, hits: Arc<AtomicUsize>) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (name, mode, hits) = (name.clone(), Arc::clone(&mode), Arc::clone(&hits));
        async move {
            let current = mode.lock().unwrap().clone();
            let response = answer(&name, current, req).await;
            hits.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).boxed()
}

async fn answer(name: &str, mode: Mode, req: Request<Incoming>) -> Response<TestBody> {
    let mut response = Response::new(full(name.to_string()));
    response
        .headers_mut()
        .insert("x-backend", name.parse().unwrap());
    let version = format!("{:?}", req.version());
    response
        .headers_mut()
        .insert("x-request-version", version.parse().unwrap());
    match mode {
        Mode::Ok | Mode::Hang | Mode::Reset => {}
        Mode::Delay(d) => tokio::time::sleep(d).await,
        Mode::Status(code) => *response.status_mut() = StatusCode::from_u16(code).unwrap(),
        Mode::Echo => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            *response.body_mut() = full(body.unwrap_or_default());
        }
        Mode::GrpcTrailers(code) => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", code.to_string().parse().unwrap());
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                Ok(Frame::trailers(trailers)),
            ];
            *response.body_mut() = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            response
                .headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
        }
    }
    response
}

/// The proxy serving the config's first service on a loopback listener
/// (as a dedicated service listener: no capture involved).
pub struct TestProxy {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    task: JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    pub async fn start(yaml: &str) -> Self {
        let config = MeshConfig::parse(yaml, std::path::Path::new("test.yaml")).unwrap();
        let vip = config.services[0].vip;
        let table = ServiceTable::build(&config, None, &NodeContext::default());
        let proxy = Arc::new(Proxy::new(
            Arc::new(ArcSwap::from_pointee(table)),
            ProxyMetrics::default(),
            0,
        ));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(Arc::clone(&proxy).serve_service(listener, vip));
        Self { addr, proxy, task }
    }

    /// The Prometheus text of the proxy's metrics.
    pub fn metrics(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        self.proxy.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    /// Sum of the samples of `name` whose labels contain every `filter`.
    pub fn metric(&self, name: &str, filters: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A mesh config with one service `echo` over `backends` and `policy` as
/// its trafficPolicy (YAML flow or block, indented for the service).
pub fn config(backends: &[&Backend], extra: &str) -> String {
    let mut yaml = String::from(
        "services:\n  - name: echo\n    vip: 198.19.0.10:80\n    protocol: http\n    endpoints:\n",
    );
    for b in backends {
        yaml.push_str(&format!("      - address: {}\n", b.addr));
    }
    yaml.push_str(extra);
    yaml
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// A keep-alive HTTP/1.1 client (or HTTP/2 prior knowledge), as an
/// application's pooled client.
pub fn client(http2: bool) -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http()
}

/// `concurrency` closed-loop callers doing `each` GETs; every status seen,
/// with the error header of failures.
pub async fn load(
    proxy: &TestProxy,
    concurrency: usize,
    each: usize,
) -> Vec<(StatusCode, Option<String>)> {
    let client = client(false);
    let uri: http::Uri = format!("http://{}/", proxy.addr).parse().unwrap();
    let callers = (0..concurrency).map(|_| {
        let (client, uri) = (client.clone(), uri.clone());
        tokio::spawn(async move {
            let mut seen = Vec::with_capacity(each);
            for _ in 0..each {
                let req = Request::get(uri.clone()).body(Full::default()).unwrap();
                match client.request(req).await {
                    Ok(resp) => {
                        let error = resp
                            .headers()
                            .get("x-dataplane-error")
                            .map(|v| v.to_str().unwrap_or("?").to_string());
                        let mut status = resp.status();
                        if resp.into_body().collect().await.is_err() {
                            // A truncated body is a failure too.
                            status = StatusCode::BAD_GATEWAY;
                        }
                        seen.push((status, error));
                    }
                    Err(err) => {
                        seen.push((StatusCode::IM_A_TEAPOT, Some(format!("client: {err}"))))
                    }
                }
            }
            seen
        })
    });
    let mut all = Vec::new();
    for caller in callers {
        all.extend(caller.await.unwrap());
    }
    all
}

/// The failures among `results`, for assertion messages.
pub fn failures(results: &[(StatusCode, Option<String>)]) -> Vec<&(StatusCode, Option<String>)> {
    results.iter().filter(|(s, _)| !s.is_success()).collect()
}

/// Bounds a test: these machines are small and a hang must fail, not stall CI.
pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), f)
        .await
        .expect("test took over 90 s")
}
