//! In-process harness for the HTTP request path: the real proxy (policies,
//! pools, hyper on both sides) on loopback sockets, with test backends
//! that can be told to fail in each way a real one does. No root needed.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use dataplane_agent::app::runtime::Runtime;
use dataplane_agent::config::MeshConfig;
use dataplane_agent::metrics::ProxyMetrics;
use dataplane_agent::proxy::Proxy;
use dataplane_agent::reload::ConfigWatcher;
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
    /// Reads the whole request body, then answers this status (so the
    /// proxy has sent every byte before it learns of the failure).
    DrainThen(u16),
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddrV4,
    /// Requests answered (any status).
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// When each request arrived (its head read), in order.
    arrivals: Arc<Mutex<Vec<Instant>>>,
    /// Requests being answered now, and the most seen at once.
    in_flight: Arc<InFlight>,
    mode: Arc<Mutex<Mode>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Concurrent requests at a backend.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl InFlight {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the accept loop and the connection tasks of a backend share.
#[derive(Clone)]
struct Shared {
    name: String,
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    in_flight: Arc<InFlight>,
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
            arrivals: Arc::default(),
            in_flight: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
            tasks: Arc::default(),
        };
        let shared = Shared {
            name: name.to_string(),
            mode: Arc::clone(&backend.mode),
            hits: Arc::clone(&backend.hits),
            connections: Arc::clone(&backend.connections),
            arrivals: Arc::clone(&backend.arrivals),
            in_flight: Arc::clone(&backend.in_flight),
            tasks: Arc::clone(&backend.tasks),
        };
        let accept = tokio::spawn(accept_loop(listener, shared));
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

    /// When each request so far arrived.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until `n` requests have arrived: what a test
    /// needs before the next step depends on a request being in flight.
    pub async fn arrived(&self, n: usize) {
        for _ in 0..1000 {
            if self.arrivals.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{}: {n} requests did not arrive within 10 s", self.name);
    }

    /// The most requests this backend was answering at once, since the
    /// start or the last reset.
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.max.load(Ordering::SeqCst)
    }

    pub fn reset_max_in_flight(&self) {
        let now = self.in_flight.now.load(Ordering::SeqCst);
        self.in_flight.max.store(now, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let current = shared.mode.lock().unwrap().clone();
        let conn = shared.clone();
        let task = tokio::spawn(async move {
            match current {
                Mode::Hang => hang(stream).await,
                Mode::Reset => reset_after_request(stream, &conn).await,
                _ => serve(stream, conn).await,
            }
        });
        shared.tasks.lock().unwrap().push(task);
    }
}

async fn hang(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
}

async fn reset_after_request(mut stream: TcpStream, shared: &Shared) {
    let mut buf = [0u8; 4096];
    if matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
        shared.arrivals.lock().unwrap().push(Instant::now());
    }
    shared.hits.fetch_add(1, Ordering::SeqCst);
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn serve(stream: TcpStream, shared: Shared) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            shared.arrivals.lock().unwrap().push(Instant::now());
            shared.in_flight.enter();
            let current = shared.mode.lock().unwrap().clone();
            let response = answer(&shared.name, current, req).await;
            shared.hits.fetch_add(1, Ordering::SeqCst);
            shared.in_flight.leave();
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
        Mode::DrainThen(code) => {
            let _ = req.into_body().collect().await;
            *response.status_mut() = StatusCode::from_u16(code).unwrap();
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
    /// The admin endpoint, when started as the agent does
    /// ([`TestProxy::start_agent`]).
    pub admin: Option<SocketAddr>,
    task: JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, NodeContext::default()).await
    }

    /// The proxy of a node at `node` (its locality).
    pub async fn start_with(yaml: &str, node: NodeContext) -> Self {
        let config = MeshConfig::parse(yaml, std::path::Path::new("test.yaml")).unwrap();
        let vip = config.services[0].vip;
        let table = ServiceTable::build(&config, None, &node);
        let proxy = Arc::new(Proxy::new(
            Arc::new(ArcSwap::from_pointee(table)),
            ProxyMetrics::default(),
            0,
        ));
        Self::serve(proxy, vip, None).await
    }

    /// The proxy as the agent runs it ([`Runtime::start`]): with the
    /// outlier-detection ticker (which ends ejections and runs the
    /// success-rate and failure-percentage sweeps) and the admin endpoint.
    pub async fn start_agent(yaml: &str, node: NodeContext) -> Self {
        let path = std::path::Path::new("test.yaml");
        let config = MeshConfig::parse(yaml, path).unwrap();
        let vip = config.services[0].vip;
        // Never polled: these tests do not reload.
        let watcher = ConfigWatcher::new(path.to_path_buf(), yaml.to_string());
        let admin = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let runtime = Runtime::start((config, watcher), node, admin, |_| {});
        runtime.set_ready();
        Self::serve(Arc::clone(&runtime.proxy), vip, Some(admin_addr)).await
    }

    pub async fn serve(proxy: Arc<Proxy>, vip: SocketAddrV4, admin: Option<SocketAddr>) -> Self {
        // As the agent listens: accepted sockets inherit Nagle off.
        let listener = dataplane_agent::app::runtime::bind_proxy(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            "--proxy-addr",
        )
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(Arc::clone(&proxy).serve_service(listener, vip));
        Self {
            addr,
            proxy,
            admin,
            task,
        }
    }

    /// `http://<proxy>/`
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The Prometheus text of the proxy's metrics.
    pub fn metrics(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        self.proxy.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    /// Endpoints ejected by outlier detection so far.
    pub fn ejections(&self) -> f64 {
        self.metric(
            "dataplane_policy_outlier_events_total",
            &["event=\"ejected\""],
        )
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
    let endpoints: Vec<String> = backends.iter().map(|b| endpoint(b, "")).collect();
    config_with("http", &endpoints, extra)
}

/// One endpoint entry for [`config_with`]: `fields` are more YAML flow
/// fields, e.g. `"weight: 3"` or `"region: r1, zone: a"`.
pub fn endpoint(backend: &Backend, fields: &str) -> String {
    endpoint_at(backend.addr, fields)
}

pub fn endpoint_at(addr: SocketAddrV4, fields: &str) -> String {
    if fields.is_empty() {
        format!("{{address: {addr}}}")
    } else {
        format!("{{address: {addr}, {fields}}}")
    }
}

/// A config with one service `echo` of `protocol` over `endpoints` (from
/// [`endpoint`]), `extra` appended as in [`config`].
pub fn config_with(protocol: &str, endpoints: &[String], extra: &str) -> String {
    let mut yaml = format!(
        "services:\n  - name: echo\n    vip: 198.19.0.10:80\n    protocol: {protocol}\n    endpoints:\n"
    );
    if endpoints.is_empty() {
        yaml = yaml.replace("endpoints:\n", "endpoints: []\n");
    }
    for e in endpoints {
        yaml.push_str(&format!("      - {e}\n"));
    }
    yaml.push_str(extra);
    yaml
}

/// `extra` for [`config`]: a trafficPolicy given as YAML flow sections,
/// e.g. `policy(&["retries: {attempts: 0}"])`.
pub fn policy(sections: &[&str]) -> String {
    let mut yaml = String::from("    trafficPolicy:\n");
    for s in sections {
        yaml.push_str(&format!("      {s}\n"));
    }
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

/// A client whose connections come from `source` (any 127.0.0.0/8
/// address works on loopback without setup).
pub fn client_from(source: Ipv4Addr, http2: bool) -> Client {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some(source.into()));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

/// A whole response: status, headers and the body read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// `x-dataplane-error`, if any.
    pub fn error(&self) -> Option<&str> {
        self.header("x-dataplane-error")
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The backend that answered (its `x-backend`).
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }
}

/// Sends `req` and reads the whole response; panics if the client fails
/// (the proxy closed or reset instead of answering).
pub async fn send(client: &Client, req: Request<Full<Bytes>>) -> Reply {
    let resp = client.request(req).await.expect("a response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A GET of `/` through the proxy with these headers.
pub async fn get_with(client: &Client, proxy: &TestProxy, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(proxy.url());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(client, req.body(Full::default()).unwrap()).await
}

/// A loopback endpoint that never completes a TCP handshake: a listener
/// whose accept queue (backlog 0) is full and never accepted from, so the
/// kernel drops further SYNs. Nothing leaves the machine.
pub struct Blackhole {
    pub addr: SocketAddrV4,
    _listener: socket2::Socket,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    pub async fn start() -> Self {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket_ipv4().unwrap();
        let mut queued = Vec::new();
        // Fill the accept queue until a connect hangs: from then on the
        // kernel answers no SYN.
        for _ in 0..64 {
            let connect = TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(200), connect).await {
                Ok(Ok(stream)) => queued.push(stream),
                Ok(Err(err)) => panic!("blackhole filler failed: {err}"),
                Err(_) => {
                    return Self {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    };
                }
            }
        }
        panic!("the accept queue never filled: connects to a full backlog do not hang here");
    }
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
    // Spawned before any is awaited: a lazy iterator would run the
    // callers one after another.
    let callers: Vec<_> = callers.collect();
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

/// Polls `check` every 10 ms until it holds or `limit` passes; whether it
/// held.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bounds a test: these machines are small and a hang must fail, not stall CI.
pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), f)
        .await
        .expect("test took over 90 s")
}

/// A raw TCP server on loopback: `on_accept` runs for each connection in
/// its own task. Returns its address and a count of accepted connections.
pub async fn raw_server<F, Fut>(on_accept: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(on_accept(stream));
        }
    });
    (addr, accepted)
}
