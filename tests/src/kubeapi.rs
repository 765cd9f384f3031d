//! A stand-in Kubernetes API server for the agent's Kubernetes source.
//!
//! No API server can run on these machines, so this one serves recorded
//! objects (YAML of the real API, under `tests/fixtures/kubernetes/`) in
//! the real wire format to the real kube-rs client: lists with a
//! `resourceVersion`, watches as streams of `ADDED`/`MODIFIED`/`DELETED`/
//! `BOOKMARK` lines, `410 Gone` (an `ERROR` event with a `Status`) for a
//! watch from a compacted version, and the field selector the agent uses
//! for its node's pods. Tests change objects while the agent watches, and
//! make the server fail the ways a real one does: streams reset, history
//! compacted, the server unreachable.
//!
//! What it does not do: authentication, admission, label selectors,
//! pagination (every list fits one page), protobuf.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// The kinds the agent watches, by their collection path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Service,
    EndpointSlice,
    Pod,
    /// The mesh's custom resource (its CRD installed).
    TrafficPolicy,
}

impl Kind {
    fn of(kind: &str) -> Option<Self> {
        Some(match kind {
            "Namespace" => Self::Namespace,
            "Service" => Self::Service,
            "EndpointSlice" => Self::EndpointSlice,
            "Pod" => Self::Pod,
            "TrafficPolicy" => Self::TrafficPolicy,
            _ => return None,
        })
    }

    fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/api/v1/namespaces" => Self::Namespace,
            "/api/v1/services" => Self::Service,
            "/apis/discovery.k8s.io/v1/endpointslices" => Self::EndpointSlice,
            "/api/v1/pods" => Self::Pod,
            "/apis/mesh.sidecarless.dev/v1alpha1/trafficpolicies" => Self::TrafficPolicy,
            _ => return None,
        })
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Namespace => "NamespaceList",
            Self::Service => "ServiceList",
            Self::EndpointSlice => "EndpointSliceList",
            Self::Pod => "PodList",
            Self::TrafficPolicy => "TrafficPolicyList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::TrafficPolicy => "mesh.sidecarless.dev/v1alpha1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Pod => "Pod",
            Self::TrafficPolicy => "TrafficPolicy",
        }
    }
}

/// A running fake API server on a loopback (or the current namespace's)
/// address. Dropping it stops it.
pub struct KubeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

struct Inner {
    state: Mutex<State>,
    /// The accept loop, while listening.
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Every open connection.
    connections: Mutex<JoinSet<()>>,
}

#[derive(Default)]
struct State {
    version: u64,
    objects: BTreeMap<Kind, BTreeMap<String, Value>>,
    /// Every change, for watches that start from an older version.
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// A watch from a version older than this gets `410 Gone`.
    oldest: u64,
    watchers: Vec<Watcher>,
    /// Requests served, as `LIST <kind>` or `WATCH <kind>`.
    requests: Vec<String>,
    /// Kinds this cluster does not have (a CRD not installed): 404.
    missing: std::collections::BTreeSet<Kind>,
}

struct Watcher {
    kind: Kind,
    node: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl KubeApi {
    /// Serves the objects of `fixture` (multi-document YAML) on `listen`
    /// (port 0: any free port).
    pub async fn start(fixture: &str, listen: SocketAddr) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                version: 1000,
                ..State::default()
            }),
            accept: Mutex::new(None),
            connections: Mutex::new(JoinSet::new()),
        });
        let listener = TcpListener::bind(listen)
            .await
            .context("binding the fake API server")?;
        let addr = listener.local_addr()?;
        let api = Self { inner, addr };
        api.apply_yaml(fixture)?;
        api.serve(listener);
        Ok(api)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server into `dir` (a bearer token, as a
    /// service account has; the server ignores it).
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{}\n\
                 contexts:\n- name: test\n  context:\n    cluster: test\n    user: agent\n\
                 current-context: test\nusers:\n- name: agent\n  user:\n    token: test-token\n",
                self.addr
            ),
        )?;
        Ok(path)
    }

    /// Creates or replaces each object of `yaml` (multi-document), as
    /// `kubectl apply` would: watchers see `ADDED` or `MODIFIED`.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        let mut state = self.state();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let mut object: Value = Value::deserialize(doc).context("fixture YAML")?;
            if object.is_null() {
                continue;
            }
            let kind = object["kind"]
                .as_str()
                .and_then(Kind::of)
                .with_context(|| format!("unknown kind in {object}"))?;
            state.version += 1;
            let version = state.version;
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            let key = key(&object);
            // What the API server maintains itself: the generation (bumped
            // when the spec changes), the creation time, and the status
            // (written through its own subresource, not by an apply).
            let old = state.objects.get(&kind).and_then(|o| o.get(&key)).cloned();
            let generation = match &old {
                None => 1,
                Some(old) => {
                    let before = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    before + i64::from(old["spec"] != object["spec"])
                }
            };
            object["metadata"]["generation"] = json!(generation);
            if object["metadata"]["creationTimestamp"].is_null() {
                let created = old
                    .as_ref()
                    .map(|o| o["metadata"]["creationTimestamp"].clone())
                    .unwrap_or_else(|| {
                        let s = version % 86_400;
                        json!(format!(
                            "2026-12-01T{:02}:{:02}:{:02}Z",
                            s / 3600,
                            s / 60 % 60,
                            s % 60
                        ))
                    });
                object["metadata"]["creationTimestamp"] = created;
            }
            if let Some(old) = &old
                && object.get("status").is_none()
                && !old["status"].is_null()
            {
                object["status"] = old["status"].clone();
            }
            let existed = state
                .objects
                .entry(kind)
                .or_default()
                .insert(key, object.clone())
                .is_some();
            state.publish(kind, if existed { "MODIFIED" } else { "ADDED" }, object);
        }
        Ok(())
    }

    /// Deletes an object: watchers see `DELETED`.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> anyhow::Result<()> {
        let mut state = self.state();
        let key = format!("{namespace}/{name}");
        let mut object = state
            .objects
            .get_mut(&kind)
            .and_then(|o| o.remove(&key))
            .with_context(|| format!("no {} {key}", kind.name()))?;
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.publish(kind, "DELETED", object);
        Ok(())
    }

    /// Resets every open connection (watches included), as a crashed API
    /// server or a broken load balancer does; the server still listens.
    pub fn reset_connections(&self) {
        lock(&self.inner.connections).abort_all();
        self.state().watchers.clear();
    }

    /// Compacts the history: every open watch gets `410 Gone` and ends, and
    /// a watch from any version before now is refused the same way, so
    /// clients must list again.
    pub fn expire_history(&self) {
        let mut state = self.state();
        state.oldest = state.version + 1;
        state.history.clear();
        let gone = event_line("ERROR", &gone_status(state.oldest));
        for watcher in state.watchers.drain(..) {
            let _ = watcher.tx.send(gone.clone());
        }
    }

    /// Stops listening and resets every connection: clients get
    /// connection refused until [`Self::resume`].
    pub fn stop(&self) {
        if let Some(accept) = lock(&self.inner.accept).take() {
            accept.abort();
        }
        self.reset_connections();
    }

    /// Listens again on the same address after [`Self::stop`] (the old
    /// listener closes when its aborted task is dropped: retried briefly).
    pub async fn resume(&self) -> anyhow::Result<()> {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(err) if tries < 100 => {
                    tries += 1;
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => {
                    return Err(err).context("listening again on the fake API server's address");
                }
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Makes `kind` unknown to the server (its CRD uninstalled) or known
    /// again.
    pub fn set_installed(&self, kind: Kind, installed: bool) {
        let mut state = self.state();
        if installed {
            state.missing.remove(&kind);
        } else {
            state.missing.insert(kind);
        }
    }

    /// The object as the server holds it now (status included).
    pub fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&kind)?
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.state().watchers.len()
    }

    /// How many policy status writes were served.
    pub fn status_writes(&self) -> usize {
        let state = self.state();
        state
            .requests
            .iter()
            .filter(|r| *r == "PATCH TrafficPolicy/status")
            .count()
    }

    /// How many lists and watches of `kind` were served.
    pub fn requests(&self, kind: Kind) -> (usize, usize) {
        let state = self.state();
        let count = |verb: &str| {
            let wanted = format!("{verb} {}", kind.name());
            state.requests.iter().filter(|r| **r == wanted).count()
        };
        (count("LIST"), count("WATCH"))
    }

    fn serve(&self, listener: TcpListener) {
        let inner = Arc::clone(&self.inner);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = Arc::clone(&inner);
                let mut connections = lock(&inner.connections);
                // Reap finished connections.
                while connections.try_join_next().is_some() {}
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let inner = Arc::clone(&handler);
                        async move { Ok::<_, Infallible>(handle(&inner, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        if let Some(old) = lock(&self.inner.accept).replace(accept) {
            old.abort();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.inner.state)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

impl State {
    /// Records a change and sends it to the watchers of its kind.
    fn publish(&mut self, kind: Kind, kind_of_event: &'static str, object: Value) {
        let version = self.version;
        let line = event_line(kind_of_event, &object);
        self.watchers.retain(|w| {
            w.kind != kind
                || !matches_node(&object, w.node.as_deref())
                || w.tx.send(line.clone()).is_ok()
        });
        self.history.push((version, kind, kind_of_event, object));
    }
}

fn key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// The field selector the agent uses for its pods: `spec.nodeName=<node>`.
fn matches_node(object: &Value, node: Option<&str>) -> bool {
    node.is_none_or(|node| object["spec"]["nodeName"].as_str() == Some(node))
}

fn event_line(kind_of_event: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": kind_of_event, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn gone_status(oldest: u64) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version (oldest is {oldest})"),
        "reason": "Expired", "code": 410
    })
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    if req.method() == http::Method::PATCH {
        return patch_status(inner, req).await;
    }
    let Some(kind) = Kind::from_path(req.uri().path()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "no such resource here");
    };
    if lock(&inner.state).missing.contains(&kind) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.to_string(), percent_decode(v)))
        })
        .collect();
    let node = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_string);
    let mut state = lock(&inner.state);
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        state.requests.push(format!("WATCH {}", kind.name()));
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        if from + 1 < state.oldest {
            let _ = tx.send(event_line("ERROR", &gone_status(state.oldest)));
        } else {
            for (version, k, kind_of_event, object) in &state.history {
                if *version > from && *k == kind && matches_node(object, node.as_deref()) {
                    let _ = tx.send(event_line(kind_of_event, object));
                }
            }
            // A bookmark: where the stream stands, as a real server sends
            // them (the client moves its resume point without an event).
            let bookmark = json!({
                "kind": kind.name(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": state.version.to_string()}
            });
            let _ = tx.send(event_line("BOOKMARK", &bookmark));
            state.watchers.push(Watcher { kind, node, tx });
        }
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs);
        return Response::new(
            WatchBody {
                rx,
                ends: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            }
            .boxed(),
        );
    }
    state.requests.push(format!("LIST {}", kind.name()));
    // Pages, as a real server serves them to a client that sets `limit`
    // (kube-rs's watcher asks for 500 at a time): `metadata.continue`
    // names the last key served and the listing's resource version, which
    // every page reports. Objects changed between two pages are not held
    // back as etcd would; the watch from that version then delivers them.
    let limit: Option<usize> = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0);
    let (version, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (state.version, None),
        Some(token) => match parse_continue(token) {
            Some((version, _)) if version + 1 < state.oldest => {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "the provided continue parameter is too old",
                );
            }
            Some((version, after)) => (version, Some(after)),
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                );
            }
        },
    };
    let matching: Vec<(&String, &Value)> = state
        .objects
        .get(&kind)
        .into_iter()
        .flat_map(|o| o.iter())
        .filter(|(key, o)| {
            after
                .as_ref()
                .is_none_or(|after| key.as_str() > after.as_str())
                && matches_node(o, node.as_deref())
        })
        .collect();
    let end = limit.map_or(matching.len(), |l| l.min(matching.len()));
    let items: Vec<Value> = matching[..end]
        .iter()
        .map(|(_, o)| {
            // Items of a real list carry no kind or apiVersion.
            let mut item = (*o).clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": version.to_string()});
    if end < matching.len() {
        let last = matching[end - 1].0;
        metadata["continue"] = json!(format!("v{version}k{last}"));
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    let list = json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

/// `v<version>k<last key>`, as pages name the next one.
fn parse_continue(token: &str) -> Option<(u64, String)> {
    let (version, last) = token.strip_prefix('v')?.split_once('k')?;
    Some((version.parse().ok()?, last.to_string()))
}

/// `PATCH .../namespaces/<ns>/trafficpolicies/<name>/status` with a JSON
/// merge patch: the object's status changes, watchers see `MODIFIED`.
async fn patch_status(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let [
        "apis",
        "mesh.sidecarless.dev",
        "v1alpha1",
        "namespaces",
        namespace,
        "trafficpolicies",
        name,
        "status",
    ] = parts.as_slice()
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "only TrafficPolicy status is patched here",
        );
    };
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let mut state = lock(&inner.state);
    state.requests.push("PATCH TrafficPolicy/status".into());
    let key = format!("{namespace}/{name}");
    let Some(mut object) = state
        .objects
        .get(&Kind::TrafficPolicy)
        .and_then(|o| o.get(&key))
        .cloned()
    else {
        return status(StatusCode::NOT_FOUND, "NotFound", "no such TrafficPolicy");
    };
    merge(&mut object["status"], &patch["status"]);
    state.version += 1;
    object["metadata"]["resourceVersion"] = json!(state.version.to_string());
    state
        .objects
        .entry(Kind::TrafficPolicy)
        .or_default()
        .insert(key, object.clone());
    state.publish(Kind::TrafficPolicy, "MODIFIED", object.clone());
    json_response(StatusCode::OK, &object)
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        if value.is_null() {
            if let Some(map) = target.as_object_mut() {
                map.remove(key);
            }
        } else {
            merge(&mut target[key.as_str()], value);
        }
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A watch response: the event lines sent to it, until the watch's
/// `timeoutSeconds` passes or the server drops it.
struct WatchBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    ends: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Poll::Ready(line) = self.rx.poll_recv(cx) {
            return Poll::Ready(line.map(|l| Ok(Frame::data(l))));
        }
        let ended = self
            .ends
            .as_mut()
            .is_some_and(|ends| ends.as_mut().poll(cx).is_ready());
        if ended {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// A [`KubeApi`] serving inside a network namespace (a simulated node's,
/// where the agent runs), on its own thread and runtime. Dropping it stops
/// the server.
pub struct KubeApiInNetns {
    api: Arc<KubeApi>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApiInNetns {
    /// Serves `fixture` on `127.0.0.1:<any port>` inside `netns`.
    pub fn start(netns: &str, fixture: &str) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let ns = std::fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening netns {netns}"))?;
        let fixture = fixture.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let started = (|| -> anyhow::Result<(tokio::runtime::Runtime, KubeApi)> {
                // SAFETY: setns on this thread only; the fd is valid while
                // `ns` lives.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    anyhow::bail!("setns: {}", std::io::Error::last_os_error());
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let listen = SocketAddr::from(([127, 0, 0, 1], 0));
                let api = rt.block_on(KubeApi::start(&fixture, listen))?;
                Ok((rt, api))
            })();
            match started {
                Ok((rt, api)) => {
                    let api = Arc::new(api);
                    let _ = ready_tx.send(Ok(Arc::clone(&api)));
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    api.stop();
                }
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                }
            }
        });
        let api = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the fake API server did not start")??;
        Ok(Self {
            api,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl std::ops::Deref for KubeApiInNetns {
    type Target = KubeApi;

    fn deref(&self) -> &KubeApi {
        &self.api
    }
}

impl Drop for KubeApiInNetns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
