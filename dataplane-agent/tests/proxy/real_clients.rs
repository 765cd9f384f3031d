//! The proxy against real third-party clients and servers, not only the
//! project's own peers: a Python grpcio client and servers (gRPC over h2c,
//! the status in trailers-only responses or in trailers after a message),
//! Python `websockets` on both sides of an upgrade, nghttp2's `h2load` and
//! `nghttp`, and curl. The in-process
//! tests use hyper on both sides, as the proxy does, so a mistake shared by
//! the proxy and its test peers (a header hyper tolerates, a frame order,
//! a flow-control habit) would pass them; these peers are written by other
//! people against the specifications.
//!
//! The proxy runs in-process (`support::TestProxy`) on loopback; the peers
//! are child processes on loopback, killed when their handle drops, and
//! every wait is bounded. A peer missing from the machine fails its test
//! with the package to install: `cargo xtask setup` installs them all.

use crate::support;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Backend, Mode, TestProxy, bounded, config};

/// Debian's interpreter, where python3-grpcio and python3-websockets are
/// installed (another `python3` may come first on PATH).
const PYTHON: &str = "/usr/bin/python3";
/// What the Python peers exit with when their module is missing.
const MISSING_MODULE: i32 = 97;
/// Environment that would send a client through an HTTP proxy.
const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "grpc_proxy",
    "no_proxy",
];
/// The README's defaults: no traffic policy at all.
const DEFAULTS: &str = "";
/// Round robin, for tests that check how requests were spread.
const ROUND_ROBIN: &str = "    trafficPolicy:\n      loadBalancer: {algorithm: roundRobin}\n";

/// A program a test runs and the Debian package that provides it.
#[derive(Clone, Copy)]
struct Tool {
    /// What the test needs, as the failure names it.
    needs: &'static str,
    program: &'static str,
    package: &'static str,
    /// The peer script, for Python peers.
    script: Option<&'static str>,
}

const GRPC: Tool = Tool {
    needs: "Python's `grpc` module",
    program: PYTHON,
    package: "python3-grpcio",
    script: Some("grpc_peer.py"),
};
const WEBSOCKETS: Tool = Tool {
    needs: "Python's `websockets` module",
    program: PYTHON,
    package: "python3-websockets",
    script: Some("ws_peer.py"),
};
const H2LOAD: Tool = Tool {
    needs: "`h2load`",
    program: "h2load",
    package: "nghttp2-client",
    script: None,
};
const NGHTTP: Tool = Tool {
    needs: "`nghttp`",
    program: "nghttp",
    package: "nghttp2-client",
    script: None,
};
const CURL: Tool = Tool {
    needs: "`curl`",
    program: "curl",
    package: "curl",
    script: None,
};

impl Tool {
    fn command(self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.program);
        if let Some(script) = self.script {
            let path: PathBuf = [
                env!("CARGO_MANIFEST_DIR"),
                "tests",
                "proxy",
                "peers",
                script,
            ]
            .iter()
            .collect();
            cmd.arg(path);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd
    }

    fn missing(self, detail: &str) -> ! {
        panic!(
            "{} is missing ({detail}): `cargo xtask setup` installs it (Debian package {})",
            self.needs, self.package
        )
    }

    fn spawn(self, args: &[&str]) -> Killed {
        match self.command(args).spawn() {
            Ok(child) => Killed(child),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.missing(&format!("cannot run {}: {err}", self.program))
            }
            Err(err) => panic!("cannot start {}: {err}", self.program),
        }
    }

    /// Judges an exit: a Python peer whose module is missing says so.
    fn check_module(self, status: Option<ExitStatus>, stderr: &str) {
        if self.script.is_some() && status.and_then(|s| s.code()) == Some(MISSING_MODULE) {
            self.missing(stderr.trim());
        }
    }

    /// Runs to completion within `limit` (killed and failed otherwise).
    async fn run(self, args: &[&str], limit: Duration) -> Finished {
        let mut child = self.spawn(args);
        let stdout = drain(child.0.stdout.take());
        let stderr = drain(child.0.stderr.take());
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.0.try_wait().expect("waiting for a child") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} {args:?} still running after {limit:?}",
                self.program
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let finished = Finished {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        };
        self.check_module(Some(status), &finished.stderr);
        finished
    }
}

/// A child process killed (and reaped) when dropped, also on panic.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a pipe to its end on a thread of its own.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The JSON objects the Python clients print, one a line.
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("{err}: {line:?}\n{}", self.stderr))
            })
            .collect()
    }
}

/// A Python server peer on a free loopback port: it prints `port N` once
/// listening, then a line per event (`hit` per call or connection).
struct Peer {
    name: String,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    child: Killed,
}

impl Peer {
    async fn start(tool: Tool, name: &str, args: &[&str]) -> Self {
        let all: Vec<&str> = ["server", name].iter().chain(args).copied().collect();
        let mut child = tool.spawn(&all);
        let stderr = drain(child.0.stderr.take());
        let stdout = child.0.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let seen = Arc::clone(&lines);
        std::thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.strip_prefix("port ").map(str::parse::<u16>) {
                    Some(Ok(port)) if port_tx.is_some() => {
                        let _ = port_tx.take().unwrap().send(port);
                    }
                    _ => seen.lock().unwrap().push(line),
                }
            }
        });
        let port = match tokio::time::timeout(Duration::from_secs(20), port_rx).await {
            Ok(Ok(port)) => port,
            outcome => {
                let timed_out = outcome.is_err();
                let _ = child.0.kill();
                let status = child.0.wait().ok();
                let stderr = stderr.join().unwrap();
                tool.check_module(status, &stderr);
                panic!("peer {name} did not listen (timed out: {timed_out}, {status:?}): {stderr}");
            }
        };
        Self {
            name: name.to_string(),
            port,
            lines,
            child,
        }
    }

    fn hits(&self) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == "hit")
            .count()
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The process dies: its port refuses connections from now on.
    fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

/// A mesh config with one HTTP service over `peers`.
fn mesh(peers: &[&Peer], extra: &str) -> String {
    let mut yaml = String::from(
        "services:\n  - name: echo\n    vip: 198.19.0.10:80\n    protocol: http\n    endpoints:\n",
    );
    for peer in peers {
        yaml.push_str(&format!("      - address: 127.0.0.1:{}\n", peer.port));
    }
    yaml.push_str(extra);
    yaml
}

/// A number field of a JSON object (0 when absent).
fn count(value: &Value, key: &str) -> u64 {
    value.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn total(object: &Value) -> u64 {
    object
        .as_object()
        .map_or(0, |map| map.values().filter_map(Value::as_u64).sum())
}

/// gRPC calls per client run, and how many the client keeps in flight.
const CALLS: usize = 300;
const CONCURRENCY: usize = 8;

fn grpc_calls(proxy: &TestProxy, status: u32) -> f64 {
    proxy.metric(
        "dataplane_http_grpc_responses_total",
        &[&format!("grpc_status=\"{status}\"")],
    )
}

async fn grpc_servers(modes: [(&str, &str); 3]) -> [Peer; 3] {
    let [(a, a_mode), (b, b_mode), (c, c_mode)] = modes;
    let (a_mode, b_mode, c_mode) = ([a_mode], [b_mode], [c_mode]);
    let (a, b, c) = tokio::join!(
        Peer::start(GRPC, a, &a_mode),
        Peer::start(GRPC, b, &b_mode),
        Peer::start(GRPC, c, &c_mode),
    );
    [a, b, c]
}

/// The grpcio client's report: answers by server name, failures by code.
async fn grpc_client(proxy: &TestProxy, method: &str) -> Value {
    let target = proxy.addr.to_string();
    let (calls, concurrency) = (CALLS.to_string(), CONCURRENCY.to_string());
    let done = GRPC
        .run(
            &["client", &target, method, &calls, &concurrency],
            Duration::from_secs(30),
        )
        .await;
    let mut reports = done.success("the grpcio client").json_lines();
    assert_eq!(reports.len(), 1, "{}", done.stdout);
    reports.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_calls_succeed_and_spread_over_grpcio_servers() {
    bounded(async {
        let servers = grpc_servers([("a", "ok"), ("b", "ok"), ("c", "ok")]).await;
        let proxy = TestProxy::start(&mesh(&servers.iter().collect::<Vec<_>>(), DEFAULTS)).await;
        let report = grpc_client(&proxy, "Call").await;
        assert_eq!(total(&report["failed"]), 0, "{report}");
        assert_eq!(total(&report["answered"]), CALLS as u64, "{report}");
        for server in &servers {
            let answered = count(&report["answered"], &server.name);
            assert!(
                answered >= 60,
                "{} answered {answered}: {report}",
                server.name
            );
        }
        let hits: usize = servers.iter().map(Peer::hits).sum();
        assert_eq!(hits, CALLS, "every call reached a server once");
        assert_eq!(grpc_calls(&proxy, 0), CALLS as f64, "{}", proxy.metrics());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_server_answering_unavailable_is_ejected_and_its_calls_retried() {
    bounded(async {
        let servers =
            grpc_servers([("good-1", "ok"), ("good-2", "ok"), ("bad", "unavailable")]).await;
        let bad = &servers[2];
        let endpoints: Vec<&Peer> = servers.iter().collect();
        // The default detector (5 consecutive 5xx: UNAVAILABLE is a 503),
        // and the gateway-error one alone, with their thresholds.
        for (threshold, detector) in [
            (5, "{}"),
            (3, "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 3}"),
        ] {
            let extra = format!("    trafficPolicy:\n      outlierDetection: {detector}\n");
            let proxy = TestProxy::start(&mesh(&endpoints, &extra)).await;
            let bad_before = bad.hits();
            let report = grpc_client(&proxy, "Call").await;
            let case = format!("outlierDetection {detector}: {report}");
            assert_eq!(total(&report["failed"]), 0, "{case}");
            assert_eq!(total(&report["answered"]), CALLS as u64, "{case}");
            assert_eq!(count(&report["answered"], "bad"), 0, "{case}");
            let bad_calls = bad.hits() - bad_before;
            let metrics = proxy.metrics();
            let ejected = metrics.lines().any(|l| {
                l.starts_with("dataplane_policy_outlier_events_total")
                    && l.contains("event=\"ejected\"")
                    && l.contains(&format!("endpoint=\"127.0.0.1:{}\"", bad.port))
            });
            assert!(ejected, "{detector}: bad not ejected:\n{metrics}");
            // Ejected at the threshold: only calls already in flight
            // could still land there, not a third of them.
            assert!(
                (threshold..threshold + CONCURRENCY).contains(&bad_calls),
                "{detector}: the UNAVAILABLE server got {bad_calls} calls"
            );
            // Every UNAVAILABLE was counted by grpc_status and retried.
            assert_eq!(grpc_calls(&proxy, 14), bad_calls as f64, "{metrics}");
            assert_eq!(grpc_calls(&proxy, 0), CALLS as f64, "{metrics}");
            let retries = proxy.metric("dataplane_http_retries_total", &[]);
            assert_eq!(retries, bad_calls as f64, "{metrics}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_server_failing_after_its_message_is_judged_by_its_trailers() {
    bounded(async {
        let servers = grpc_servers([
            ("good-1", "ok"),
            ("good-2", "ok"),
            ("bad", "late-unavailable"),
        ])
        .await;
        let bad = &servers[2];
        let proxy = TestProxy::start(&mesh(&servers.iter().collect::<Vec<_>>(), DEFAULTS)).await;
        let report = grpc_client(&proxy, "Stream").await;
        // The message was forwarded before the status came: those calls
        // cannot be retried, so the client sees them fail until the
        // trailers' UNAVAILABLE (a 503) gets the server ejected.
        let bad_calls = bad.hits();
        let metrics = proxy.metrics();
        assert!(
            (5..5 + CONCURRENCY).contains(&bad_calls),
            "the failing server got {bad_calls} calls: {report}\n{metrics}"
        );
        assert_eq!(
            count(&report["failed"], "UNAVAILABLE"),
            bad_calls as u64,
            "{report}"
        );
        assert_eq!(total(&report["failed"]), bad_calls as u64, "{report}");
        assert_eq!(
            total(&report["answered"]),
            (CALLS - bad_calls) as u64,
            "{report}"
        );
        assert_eq!(count(&report["answered"], "bad"), 0, "{report}");
        assert!(
            metrics.contains(&format!(
                "endpoint=\"127.0.0.1:{}\",event=\"ejected\",reason=\"consecutive_5xx\"",
                bad.port
            )),
            "{metrics}"
        );
        assert_eq!(grpc_calls(&proxy, 14), bad_calls as f64, "{metrics}");
        assert_eq!(
            grpc_calls(&proxy, 0),
            (CALLS - bad_calls) as f64,
            "{metrics}"
        );
        assert_eq!(proxy.metric("dataplane_http_retries_total", &[]), 0.0);
    })
    .await
}

/// The websockets client's reports, one per connection.
async fn websocket_client(proxy: &TestProxy, connections: usize, big: usize) -> Vec<Value> {
    let url = format!("ws://{}/chat", proxy.addr);
    let done = WEBSOCKETS
        .run(
            &["client", &url, &connections.to_string(), &big.to_string()],
            Duration::from_secs(30),
        )
        .await;
    let reports = done.success("the websockets client").json_lines();
    assert_eq!(reports.len(), connections, "{}", done.stdout);
    reports
}

/// Whether one connection did everything: greeting, both echoes
/// byte-exact, a clean close handshake in good time.
fn websocket_ok(report: &Value, big: u64) -> bool {
    let backend = report["backend"].as_str().unwrap_or("?");
    report["error"].is_null()
        && report["greeting"] == format!("hello from {backend}").as_str()
        && report["text_echoed"] == true
        && report["binary_echoed"] == true
        && report["binary_bytes"] == big
        && report["close_code"] == 1000
        && report["close_seconds"].as_f64().is_some_and(|s| s < 2.0)
}

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_echo_both_ways_and_close_through_the_proxy() {
    bounded(async {
        let (a, b) = tokio::join!(
            Peer::start(WEBSOCKETS, "ws-a", &[]),
            Peer::start(WEBSOCKETS, "ws-b", &[]),
        );
        let proxy = TestProxy::start(&mesh(&[&a, &b], ROUND_ROBIN)).await;
        let reports = websocket_client(&proxy, 4, MIB).await;
        for report in &reports {
            assert!(websocket_ok(report, MIB as u64), "{report}");
        }
        for peer in [&a, &b] {
            let served = reports
                .iter()
                .filter(|r| r["backend"] == peer.name.as_str())
                .count();
            assert_eq!(served, 2, "round robin over two: {reports:?}");
        }
        // The server saw each close handshake complete with 1000 too.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let closed: Vec<String> = [&a, &b]
                .iter()
                .flat_map(|p| p.lines())
                .filter(|l| l.starts_with("closed"))
                .collect();
            if closed.len() == 4 {
                assert!(closed.iter().all(|l| l == "closed 1000"), "{closed:?}");
                break;
            }
            assert!(Instant::now() < deadline, "servers saw {closed:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            proxy.metric("dataplane_http_responses_total", &["code=\"101\""]),
            4.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_succeed_while_one_endpoint_refuses_connections() {
    bounded(async {
        let (mut dead, a, b) = tokio::join!(
            Peer::start(WEBSOCKETS, "ws-dead", &[]),
            Peer::start(WEBSOCKETS, "ws-a", &[]),
            Peer::start(WEBSOCKETS, "ws-b", &[]),
        );
        // Round robin, so the dead endpoint's turns come for sure.
        let proxy = TestProxy::start(&mesh(&[&dead, &a, &b], ROUND_ROBIN)).await;
        dead.kill();
        let reports = websocket_client(&proxy, 6, 1024).await;
        let failed: Vec<&Value> = reports.iter().filter(|r| !websocket_ok(r, 1024)).collect();
        assert!(
            failed.is_empty(),
            "{} of 6 upgrades failed with the first endpoint refusing: {failed:?}",
            failed.len()
        );
        assert!(
            proxy.metric("dataplane_proxy_upstream_connect_errors", &[]) >= 1.0,
            "the refused connects are counted"
        );
    })
    .await
}

/// h2load's summary: (succeeded, failed, 2xx) of `requests`.
fn h2load_summary(output: &str) -> (u64, u64, u64) {
    let field = |line: &str, name: &str| -> u64 {
        line.split(',')
            .find_map(|part| part.trim().strip_suffix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in {line:?}"))
    };
    let line = |prefix: &str| -> &str {
        output
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in h2load's output:\n{output}"))
    };
    let requests = line("requests: ");
    let statuses = line("status codes: ");
    (
        field(requests, "succeeded"),
        field(requests, "failed"),
        field(statuses, "2xx"),
    )
}

/// The value of `name` in `nghttp -v`'s trace of the response headers.
fn nghttp_header<'a>(trace: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!(") {name}: ");
    trace.lines().find_map(|l| {
        let (_, rest) = l.split_once("] recv (stream_id=")?;
        Some(rest.split_once(&needle)?.1.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_through_the_proxy_to_http1_and_http2_backends() {
    bounded(async {
        for (upstream, version) in [("http1", "HTTP/1.1"), ("http2", "HTTP/2.0")] {
            let backends = [
                Backend::start("b1", Mode::Ok).await,
                Backend::start("b2", Mode::Ok).await,
                Backend::start("b3", Mode::Ok).await,
            ];
            let extra = format!("    upstreamProtocol: {upstream}\n");
            let proxy =
                TestProxy::start(&config(&backends.iter().collect::<Vec<_>>(), &extra)).await;
            let url = format!("http://{}/", proxy.addr);
            let done = H2LOAD
                .run(
                    &["-n", "2000", "-c", "4", "-m", "10", &url],
                    Duration::from_secs(30),
                )
                .await;
            done.success("h2load");
            let (succeeded, failed, ok) = h2load_summary(&done.stdout);
            let case = format!("upstream {upstream}:\n{}", done.stdout);
            assert_eq!((succeeded, failed, ok), (2000, 0, 2000), "{case}");
            let hits: Vec<usize> = backends.iter().map(Backend::hits).collect();
            assert_eq!(hits.iter().sum::<usize>(), 2000, "{hits:?}");
            assert!(hits.iter().all(|&h| h >= 500), "spread: {hits:?}");
            if upstream == "http2" {
                // Multiplexed: one upstream connection per endpoint.
                for backend in &backends {
                    let connections = backend
                        .connections
                        .load(std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(connections, 1, "{} connections", backend.name);
                }
            }
            // One request traced, to see the version the backend spoke.
            let trace = NGHTTP
                .run(&["-v", "-t", "10", &url], Duration::from_secs(15))
                .await;
            trace.success("nghttp");
            assert_eq!(
                nghttp_header(&trace.stdout, ":status"),
                Some("200"),
                "{}",
                trace.stdout
            );
            assert_eq!(
                nghttp_header(&trace.stdout, "x-request-version"),
                Some(version),
                "upstream {upstream}: {}",
                trace.stdout
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_prior_knowledge_and_http1() {
    bounded(async {
        let (a, b) = (
            Backend::start("a", Mode::Ok).await,
            Backend::start("b", Mode::Ok).await,
        );
        let proxy = TestProxy::start(&config(&[&a, &b], ROUND_ROBIN)).await;
        let url = format!("http://{}/hello", proxy.addr);
        let mut answered_by = Vec::new();
        for (flag, status_line) in [
            ("--http2-prior-knowledge", "HTTP/2 200"),
            ("--http1.1", "HTTP/1.1 200 OK"),
        ] {
            let done = CURL
                .run(
                    &[
                        "-sS",
                        "-i",
                        "--max-time",
                        "10",
                        "--noproxy",
                        "*",
                        flag,
                        &url,
                    ],
                    Duration::from_secs(15),
                )
                .await;
            done.success("curl");
            let text = done.stdout.replace("\r\n", "\n");
            let (head, body) = text.split_once("\n\n").expect("head and body");
            let mut lines = head.lines();
            assert_eq!(
                lines.next().map(str::trim_end),
                Some(status_line),
                "{flag}: {text}"
            );
            let backend = lines
                .find_map(|l| l.strip_prefix("x-backend: "))
                .unwrap_or_else(|| panic!("{flag}: no x-backend in {head}"));
            assert!(["a", "b"].contains(&backend), "{flag}: {head}");
            assert_eq!(body, backend, "{flag}: the backend's own body");
            answered_by.push(backend.to_string());
        }
        answered_by.sort();
        assert_eq!(answered_by, ["a", "b"], "round robin over two");
        assert_eq!((a.hits(), b.hits()), (1, 1));
    })
    .await
}
