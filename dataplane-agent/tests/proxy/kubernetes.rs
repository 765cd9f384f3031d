//! The Kubernetes source through the real kube-rs client, against the
//! stand-in API server (`dataplane_tests::kubeapi`: recorded objects in
//! the real JSON wire format, watch streams, 410 Gone, outages): what it
//! publishes, how fast changes arrive, what it skips, and that an API
//! server outage under load fails no request through the proxy.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dataplane_agent::app::runtime::Runtime;
use dataplane_agent::config::MeshConfig;
use dataplane_agent::discovery::{Discovered, Feed};
use dataplane_agent::kubernetes::metrics::KubernetesMetrics;
use dataplane_agent::kubernetes::{self, KubernetesConfig, source};
use dataplane_agent::reload::ConfigWatcher;
use dataplane_agent::state::NodeContext;
use dataplane_tests::kubeapi::{Kind, KubeApi};
use http::Request;
use http_body_util::{BodyExt as _, Full};
use tokio::sync::watch;

use crate::support::{Backend, Mode, TestProxy, bounded, client};

const CLUSTER: &str = include_str!("../../../tests/fixtures/kubernetes/cluster.yaml");
const BAD: &str = include_str!("../../../tests/fixtures/kubernetes/bad.yaml");

/// A scratch directory for a kubeconfig, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dp-kube-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The API server, and the source watching it as node `node-a`.
struct Watching {
    api: KubeApi,
    rx: watch::Receiver<Arc<Discovered>>,
    metrics: KubernetesMetrics,
    _scratch: Scratch,
}

async fn watch_api(name: &str, fixture: &str) -> Watching {
    let api = KubeApi::start(fixture, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .unwrap();
    let scratch = Scratch::new(name);
    let kubeconfig = api.write_kubeconfig(&scratch.0).unwrap();
    watch_with(api, scratch, kubeconfig, None).await
}

/// The source for `api`, keeping its snapshot at `snapshot`.
async fn watch_with(
    api: KubeApi,
    scratch: Scratch,
    kubeconfig: PathBuf,
    snapshot: Option<PathBuf>,
) -> Watching {
    let cfg = KubernetesConfig {
        kubeconfig: Some(kubeconfig),
        node: "node-a".into(),
        snapshot,
        snapshot_max_age: Duration::from_secs(3600),
    };
    kubernetes::client(&cfg).await.unwrap();
    let metrics = KubernetesMetrics::default();
    let rx = source::start(&cfg, metrics.clone()).unwrap();
    Watching {
        api,
        rx,
        metrics,
        _scratch: scratch,
    }
}

impl Watching {
    /// Waits until every kind is listed and watched.
    async fn watching_all(&mut self) {
        self.until(Duration::from_secs(10), |s| !s.services.is_empty())
            .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.api.open_watches() < 5 {
            assert!(Instant::now() < deadline, "the watches never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the published state satisfies `check`; how long it took.
    async fn until(&mut self, limit: Duration, check: impl Fn(&Discovered) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if check(&self.rx.borrow_and_update()) {
                return start.elapsed();
            }
            let left = limit.saturating_sub(start.elapsed());
            if tokio::time::timeout(left, self.rx.changed()).await.is_err() {
                panic!(
                    "state not reached within {limit:?}; now: {:#?}",
                    self.rx.borrow()
                );
            }
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let mut registry = prometheus_client::registry::Registry::default();
        self.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find(|l| {
                l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}_total "))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

fn vip(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

fn endpoints_of(state: &Discovered, name: &str) -> Vec<SocketAddrV4> {
    state
        .services
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.endpoints.iter().map(|e| e.address).collect())
        .unwrap_or_default()
}

/// An EndpointSlice of `cart` with one endpoint.
fn slice(name: &str, ip: Ipv4Addr, port: u16, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: shop\n  \
         labels: {{kubernetes.io/service-name: cart}}\naddressType: IPv4\nendpoints:\n- addresses: [{ip}]\n  \
         conditions: {{ready: {ready}, serving: true, terminating: {}}}\nports:\n- name: http\n  port: {port}\n  protocol: TCP\n",
        !ready
    )
}

#[tokio::test]
async fn the_cluster_is_listed_and_converted() {
    bounded(async {
        let mut w = watch_api("list", CLUSTER).await;
        w.until(Duration::from_secs(10), |s| !s.services.is_empty())
            .await;
        let state = w.rx.borrow().clone();
        let names: Vec<_> = state.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cart", "payments:grpc", "payments:metrics"]);
        assert_eq!(state.services[0].vip, vip([10, 96, 0, 10], 80));
        assert_eq!(endpoints_of(&state, "cart").len(), 3);
        let pods: Vec<_> = state
            .pods
            .iter()
            .filter_map(|p| p.name.as_deref())
            .collect();
        assert_eq!(pods, ["shop/frontend-7d9c8b-abcde", "legacy/reporter-0"]);
        assert_eq!(w.metric("dataplane_kubernetes_up"), 1.0);
        assert_eq!(w.metric("dataplane_kubernetes_services"), 3.0);
        assert_eq!(w.metric("dataplane_kubernetes_skipped_objects"), 0.0);
        // One listing per kind; the pods' with the node's field selector
        // (the server filters: node-b's pods never arrive).
        for kind in [
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Namespace,
            Kind::Pod,
        ] {
            assert_eq!(w.api.requests(kind).0, 1, "{kind:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn endpoint_service_and_pod_changes_arrive_within_a_second() {
    bounded(async {
        let mut w = watch_api("changes", CLUSTER).await;
        w.until(Duration::from_secs(10), |s| !s.services.is_empty())
            .await;
        let first = vip([10, 244, 1, 11], 8080);
        assert!(endpoints_of(&w.rx.borrow(), "cart").contains(&first));

        // Ready -> not ready (as when a pod starts terminating).
        let cart_slice = CLUSTER
            .split("\n---\n")
            .find(|d| d.contains("name: cart-x7k2p"))
            .unwrap()
            .replacen(
                "conditions: {ready: true, serving: true, terminating: false}",
                "conditions: {ready: false, serving: true, terminating: true}",
                1,
            );
        w.api.apply_yaml(&cart_slice).unwrap();
        let took = w
            .until(Duration::from_secs(1), |s| {
                !endpoints_of(s, "cart").contains(&first)
            })
            .await;
        eprintln!("ready -> terminating took {took:?}");

        // A new pod of this node in an enrolled namespace, then its
        // namespace unlabelled: the pods of that namespace leave.
        w.api
            .apply_yaml(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: new-0, namespace: shop, uid: u-new-0}\n\
                 spec: {nodeName: node-a, containers: [{name: c, image: i}]}\nstatus: {phase: Pending}\n",
            )
            .unwrap();
        w.until(Duration::from_secs(3), |s| s.pods.iter().any(|p| p.uid == "u-new-0"))
            .await;
        w.api
            .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {}}\n")
            .unwrap();
        w.until(Duration::from_secs(3), |s| {
            s.pods.iter().all(|p| !p.name.as_deref().unwrap_or_default().starts_with("shop/"))
        })
        .await;

        // A deleted Service leaves at once.
        w.api.delete(Kind::Service, "shop", "cart").unwrap();
        w.until(Duration::from_secs(3), |s| s.services.iter().all(|s| s.name != "cart"))
            .await;
    })
    .await;
}

#[tokio::test]
async fn bad_objects_are_skipped_counted_and_the_rest_keeps_working() {
    bounded(async {
        let mut w = watch_api("bad", CLUSTER).await;
        w.until(Duration::from_secs(10), |s| !s.services.is_empty())
            .await;
        w.api.apply_yaml(BAD).unwrap();
        w.until(Duration::from_secs(2), |s| {
            s.services.iter().any(|s| s.name == "broken-port:admin")
        })
        .await;
        let state = w.rx.borrow().clone();
        assert_eq!(
            endpoints_of(&state, "cart").len(),
            3,
            "the rest is unchanged"
        );
        assert_eq!(
            endpoints_of(&state, "broken-port:admin"),
            [vip([10, 244, 1, 41], 8081)]
        );
        // The 70000 port, the "not-an-ip" address, the "yes" annotation.
        assert_eq!(w.metric("dataplane_kubernetes_skipped_objects"), 3.0);
        // Counted once, not at each later conversion (one runs for this
        // new pod).
        w.api
            .apply_yaml(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: later, namespace: shop, uid: u-later}\n\
                 spec: {nodeName: node-a, containers: []}\n",
            )
            .unwrap();
        w.until(Duration::from_secs(5), |s| s.pods.iter().any(|p| p.uid == "u-later"))
            .await;
        assert_eq!(w.metric("dataplane_kubernetes_skipped_objects"), 3.0);
    })
    .await;
}

#[tokio::test]
async fn dropped_streams_resume_and_410_gone_relists_without_losing_state() {
    bounded(async {
        let mut w = watch_api("relist", CLUSTER).await;
        w.watching_all().await;
        let before = w.rx.borrow().clone();

        w.api.reset_connections();
        // The watch resumes from the last version seen (a dropped stream
        // needs no listing, unless the client saw it fail).
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.api.requests(Kind::Pod).1 < 2 {
            assert!(
                Instant::now() < deadline,
                "the watch never resumed after the reset"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A change after the reset arrives on the new watch.
        w.api.delete(Kind::Pod, "legacy", "reporter-0").unwrap();
        w.until(Duration::from_secs(10), |s| s.pods.len() == 1)
            .await;

        w.watching_all().await;
        let lists = w.api.requests(Kind::Service).0;
        w.api.expire_history();
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.api.requests(Kind::Service).0 == lists {
            assert!(
                Instant::now() < deadline,
                "no relist after 410 Gone: {:?}",
                w.api.requests(Kind::Service)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.api.delete(Kind::Service, "shop", "cart").unwrap();
        w.until(Duration::from_secs(10), |s| s.services.len() == 2)
            .await;
        assert_eq!(w.rx.borrow().services, before.services[1..]);
        assert!(w.metric("dataplane_kubernetes_failures") >= 1.0);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_api_server_keeps_the_state_says_how_stale_and_catches_up() {
    bounded(async {
        let mut w = watch_api("outage", CLUSTER).await;
        w.watching_all().await;
        let before = w.rx.borrow().clone();
        w.api.stop();
        // Changed while the agent cannot see it.
        w.api.delete(Kind::Service, "shop", "cart").unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(*w.rx.borrow().clone(), *before, "the last state stays");
        assert_eq!(w.metric("dataplane_kubernetes_up"), 0.0);
        assert!(w.metric("dataplane_kubernetes_stale_seconds") >= 1.0);

        w.api.resume().await.unwrap();
        w.until(Duration::from_secs(15), |s| s.services.len() == 2)
            .await;
        // Every kind back (their retries run apart), the state is fresh.
        let deadline = Instant::now() + Duration::from_secs(20);
        while w.metric("dataplane_kubernetes_up") != 1.0
            || w.metric("dataplane_kubernetes_stale_seconds") != 0.0
        {
            assert!(
                Instant::now() < deadline,
                "still stale after the server came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Closed-loop GET callers until `stop`; the failures they saw.
async fn steady_load(
    addr: SocketAddr,
    callers: usize,
    stop: Arc<AtomicBool>,
) -> (usize, Vec<String>) {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let client = client(false);
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get(format!("http://{addr}/"))
                        .body(Full::default())
                        .unwrap();
                    match client.request(req).await {
                        Ok(resp) if resp.status().is_success() => {
                            if resp.into_body().collect().await.is_ok() {
                                ok += 1;
                            } else {
                                failed.push("truncated body".to_string());
                            }
                        }
                        Ok(resp) => failed.push(format!("{}", resp.status())),
                        Err(err) => failed.push(err.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            })
        })
        .collect();
    let mut all = (0, Vec::new());
    for task in tasks {
        let (ok, failed) = task.await.unwrap();
        all.0 += ok;
        all.1.extend(failed);
    }
    all
}

/// The proxy as the agent runs it, with an empty config file and the
/// Kubernetes source attached, serving the VIP of `cart`.
async fn proxy_fed_by(
    w: &Watching,
    name: &str,
) -> (TestProxy, tokio::task::JoinHandle<()>, Scratch) {
    let scratch = Scratch::new(&format!("{name}-config"));
    let file = scratch.0.join("mesh.yaml");
    std::fs::write(&file, "services: []\n").unwrap();
    let config = MeshConfig::load(&file).unwrap();
    let watcher = ConfigWatcher::new(file.clone(), "services: []\n".into());
    let admin = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let mut rt = Runtime::start((config, watcher), NodeContext::default(), admin, |_| {});
    rt.attach(Box::new(Feed::new("kubernetes", w.rx.clone())));
    let proxy = TestProxy::serve(Arc::clone(&rt.proxy), vip([10, 96, 0, 10], 80), None).await;
    let run = tokio::spawn(async move {
        rt.run_until_shutdown(Duration::from_secs(1), |_, _| {})
            .await;
    });
    (proxy, run, scratch)
}

/// Namespace `shop`, Service `cart` at 10.96.0.10:80, a slice per backend.
fn cart_cluster(backends: &[&Backend]) -> String {
    let mut cluster = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, protocol: TCP}]}\n",
    );
    for (i, b) in backends.iter().enumerate() {
        cluster.push_str("---\n");
        cluster.push_str(&slice(
            &format!("cart-{i}"),
            *b.addr.ip(),
            b.addr.port(),
            true,
        ));
    }
    cluster
}

/// A terminating endpoint finishes the requests it has and gets no new
/// ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_endpoint_finishes_its_requests_and_gets_no_new_ones() {
    bounded(async {
        let slow = Backend::start("slow", Mode::Delay(Duration::from_secs(2))).await;
        let fast = Backend::start("fast", Mode::Ok).await;
        let mut w = watch_api("terminating", &cart_cluster(&[&slow, &fast])).await;
        w.until(Duration::from_secs(10), |s| {
            endpoints_of(s, "cart").len() == 2
        })
        .await;
        let (proxy, run, _scratch) = proxy_fed_by(&w, "terminating").await;
        let cart = vip([10, 96, 0, 10], 80);
        let in_proxy = |addr: SocketAddrV4| {
            proxy
                .proxy
                .services
                .load()
                .get(&cart)
                .is_some_and(|s| s.endpoints.iter().any(|e| e.addr == addr))
        };
        assert!(
            crate::support::eventually(Duration::from_secs(5), || in_proxy(slow.addr)).await,
            "the proxy has both endpoints"
        );

        // Requests until one is in flight on the slow endpoint.
        let url = proxy.url();
        let mut pending = Vec::new();
        for _ in 0..6 {
            let url = url.clone();
            pending.push(tokio::spawn(async move {
                let req = Request::get(url).body(Full::default()).unwrap();
                let resp = client(false)
                    .request(req)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((status, body.to_bytes()))
            }));
        }
        slow.arrived(1).await;
        // Its pod starts terminating: not ready, still serving.
        w.api
            .apply_yaml(&slice("cart-0", *slow.addr.ip(), slow.addr.port(), false))
            .unwrap();
        assert!(
            crate::support::eventually(Duration::from_secs(3), || !in_proxy(slow.addr)).await,
            "the terminating endpoint leaves the proxy's table"
        );
        let arrived = slow.arrivals().len();
        for _ in 0..20 {
            let req = Request::get(proxy.url()).body(Full::default()).unwrap();
            let resp = client(false).request(req).await.unwrap();
            assert_eq!(resp.status(), http::StatusCode::OK);
        }
        // What it had in flight finished, on its connection.
        for p in pending {
            let (status, body) = p.await.unwrap().expect("an in-flight request finished");
            assert_eq!(status, http::StatusCode::OK, "{body:?}");
        }
        assert!(slow.hits() >= 1, "the slow endpoint answered its request");
        assert_eq!(slow.arrivals().len(), arrived, "no new request reached it");
        run.abort();
    })
    .await;
}

/// The proxy as the agent runs it, fed by the Kubernetes source: under
/// steady load, the API server's streams reset, its history expires (410)
/// and it is unreachable for 30 s. No request fails, and an endpoint added
/// during the outage gets traffic once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_failures_under_load_fail_no_request() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let backends = [
            Backend::start("a", Mode::Ok).await,
            Backend::start("b", Mode::Ok).await,
            Backend::start("c", Mode::Ok).await,
        ];
        let late = Backend::start("late", Mode::Ok).await;
        let mut w = watch_api("load", &cart_cluster(&backends.each_ref())).await;
        w.until(Duration::from_secs(10), |s| {
            endpoints_of(s, "cart").len() == 3
        })
        .await;

        let (proxy, run, _scratch) = proxy_fed_by(&w, "load").await;

        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(steady_load(proxy.addr, 4, Arc::clone(&stop)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        w.api.reset_connections();
        tokio::time::sleep(Duration::from_secs(2)).await;
        w.api.expire_history();
        tokio::time::sleep(Duration::from_secs(2)).await;
        w.api.stop();
        // Meanwhile: a fourth endpoint.
        w.api
            .apply_yaml(&slice("cart-late", *late.addr.ip(), late.addr.port(), true))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(late.hits(), 0, "the outage hid the change");
        w.api.resume().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while late.hits() == 0 {
            assert!(
                Instant::now() < deadline,
                "the change made during the outage never arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = load.await.unwrap();
        run.abort();
        eprintln!("{ok} requests, {} failed", failed.len());
        assert!(ok > 1000, "the load ran ({ok} requests)");
        assert!(failed.is_empty(), "failed: {failed:?}");
        for b in &backends {
            assert!(b.hits() > 0, "{} served", b.name);
        }
    })
    .await
    .expect("test took over 120 s");
}

#[tokio::test]
async fn an_agent_started_while_the_api_server_is_down_routes_from_its_snapshot() {
    bounded(async {
        let scratch = Scratch::new("snapshot");
        let path = scratch.0.join("kubernetes.snapshot");
        let api = KubeApi::start(CLUSTER, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let kubeconfig = api.write_kubeconfig(&scratch.0).unwrap();
        let mut first = watch_with(api, scratch, kubeconfig.clone(), Some(path.clone())).await;
        first
            .until(Duration::from_secs(10), |s| !s.services.is_empty())
            .await;
        let listed = first.rx.borrow().clone();
        assert!(listed.complete);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(Instant::now() < deadline, "no snapshot written");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The API server goes away; a new agent starts.
        first.api.stop();
        let cfg = KubernetesConfig {
            kubeconfig: Some(kubeconfig),
            node: "node-a".into(),
            snapshot: Some(path.clone()),
            snapshot_max_age: Duration::from_secs(3600),
        };
        let metrics = KubernetesMetrics::default();
        let rx = source::start(&cfg, metrics).unwrap();
        let mut expected = (*listed).clone();
        expected.listed = false;
        assert_eq!(
            *rx.borrow().clone(),
            expected,
            "the snapshot's state, whole, but not listed by this agent"
        );

        // Another node's snapshot is not used.
        let other = KubernetesConfig {
            node: "node-b".into(),
            ..cfg
        };
        let rx = source::start(&other, KubernetesMetrics::default()).unwrap();
        assert!(!rx.borrow().complete, "nothing to route from");
    })
    .await;
}

fn attempts_of(state: &Discovered, name: &str) -> Option<u32> {
    state
        .services
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.traffic_policy.retries.attempts)
}

fn policy_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: mesh.sidecarless.dev/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
    )
}

/// The `Accepted` condition the agent wrote on a policy.
fn accepted(api: &KubeApi, name: &str) -> Option<(String, String, String)> {
    let object = api.object(Kind::TrafficPolicy, "shop", name)?;
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    let text = |k: &str| condition[k].as_str().unwrap_or_default().to_string();
    Some((text("status"), text("reason"), text("message")))
}

async fn until_accepted(
    api: &KubeApi,
    name: &str,
    check: impl Fn(&(String, String, String)) -> bool,
) -> (String, String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(condition) = accepted(api, name)
            && check(&condition)
        {
            return condition;
        }
        assert!(
            Instant::now() < deadline,
            "status of {name} never reached: {:?}",
            accepted(api, name)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn traffic_policies_apply_to_their_service_and_bad_ones_keep_the_last_good() {
    bounded(async {
        let mut w = watch_api("policy", CLUSTER).await;
        w.watching_all().await;
        assert_eq!(attempts_of(&w.rx.borrow(), "cart"), Some(2), "the default");
        w.api
            .apply_yaml(&policy_yaml(
                "cart-resilience",
                "{targetRef: {kind: Service, name: cart}, retries: {attempts: 4}}",
            ))
            .unwrap();
        w.until(Duration::from_secs(5), |s| {
            attempts_of(s, "cart") == Some(4)
        })
        .await;
        until_accepted(&w.api, "cart-resilience", |c| c.0 == "True").await;

        // A typo: reported on the object, naming the field; the last good
        // version stays in force.
        w.api
            .apply_yaml(&policy_yaml(
                "cart-resilience",
                "{targetRef: {kind: Service, name: cart}, retries: {attempts: lots}}",
            ))
            .unwrap();
        let (status, reason, message) =
            until_accepted(&w.api, "cart-resilience", |c| c.1 == "Invalid").await;
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
        assert!(message.contains("spec.retries.attempts"), "{message}");
        assert_eq!(attempts_of(&w.rx.borrow(), "cart"), Some(4));
        assert_eq!(w.metric("dataplane_kubernetes_skipped_objects"), 1.0);

        // A second policy for the same Service: the older one applies.
        w.api
            .apply_yaml(&policy_yaml(
                "cart-other",
                "{targetRef: {name: cart}, retries: {attempts: 1}}",
            ))
            .unwrap();
        until_accepted(&w.api, "cart-other", |c| c.1 == "Conflicted").await;
        assert_eq!(attempts_of(&w.rx.borrow(), "cart"), Some(4));

        // Fixed, then deleted: the default comes back.
        w.api
            .apply_yaml(&policy_yaml(
                "cart-resilience",
                "{targetRef: {kind: Service, name: cart}, retries: {attempts: 3}}",
            ))
            .unwrap();
        w.until(Duration::from_secs(5), |s| {
            attempts_of(s, "cart") == Some(3)
        })
        .await;
        until_accepted(&w.api, "cart-resilience", |c| c.0 == "True").await;
        w.api
            .delete(Kind::TrafficPolicy, "shop", "cart-other")
            .unwrap();
        w.api
            .delete(Kind::TrafficPolicy, "shop", "cart-resilience")
            .unwrap();
        w.until(Duration::from_secs(5), |s| {
            attempts_of(s, "cart") == Some(2)
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_cluster_without_the_crd_is_read_all_the_same() {
    bounded(async {
        let api = KubeApi::start(CLUSTER, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        api.set_installed(Kind::TrafficPolicy, false);
        let scratch = Scratch::new("nocrd");
        let kubeconfig = api.write_kubeconfig(&scratch.0).unwrap();
        let mut w = watch_with(api, scratch, kubeconfig, None).await;
        w.until(Duration::from_secs(10), |s| {
            s.complete && !s.services.is_empty()
        })
        .await;
        assert_eq!(w.metric("dataplane_kubernetes_up"), 1.0);
    })
    .await;
}

/// Every agent computes the same verdict on a policy; each waits a random
/// part of a few seconds before writing it and writes only if no other
/// agent's write has landed meanwhile: four agents write it about once,
/// not four times.
#[tokio::test]
async fn agents_mostly_leave_a_policy_status_to_the_first_writer() {
    bounded(async {
        let mut w = watch_api("spread", CLUSTER).await;
        w.watching_all().await;
        let cfg = KubernetesConfig {
            kubeconfig: Some(w.api.write_kubeconfig(&w._scratch.0).unwrap()),
            node: "node-b".into(),
            snapshot: None,
            snapshot_max_age: Duration::from_secs(3600),
        };
        let mut others = Vec::new();
        for _ in 0..3 {
            let mut rx = source::start(&cfg, KubernetesMetrics::default()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while rx.borrow_and_update().services.is_empty() {
                assert!(Instant::now() < deadline, "another agent never listed");
                let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
            }
            others.push(rx);
        }
        while w.api.open_watches() < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = w.api.status_writes();
        w.api
            .apply_yaml(&policy_yaml(
                "cart-resilience",
                "{targetRef: {kind: Service, name: cart}, retries: {attempts: 4}}",
            ))
            .unwrap();
        until_accepted(&w.api, "cart-resilience", |c| c.0 == "True").await;
        // Every agent's time to write has passed (3 s spread, 1 s tick).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let writes = w.api.status_writes() - before;
        // Measured: 1 each time; 3 when every agent wrote at once.
        assert!(
            (1..=2).contains(&writes),
            "{writes} status writes by 4 agents"
        );
        drop(others);
    })
    .await;
}
