//! Tests of the HTTP test peer (`httptool`) on a simulated node without an
//! agent: pod B talks to pod A directly over the node's bridge. The
//! resilience tests judge the proxy by httptool's reports, so the reports
//! must first be shown right against a backend with known behaviour.

use anyhow::ensure;
use dataplane_tests::http_peers::{self, LoadReport};
use dataplane_tests::{Pod, SimNode, require_privileges};

/// Both protocols the load client speaks.
const PROTOCOLS: [&[&str]; 2] = [&[], &["--http2"]];
const REQUESTS: u64 = 50;

struct Setup {
    node: SimNode,
    backend: Pod,
    client: Pod,
    url: String,
}

fn setup(hint: &str) -> anyhow::Result<Setup> {
    let mut node = SimNode::new(hint)?;
    let backend = node.add_pod("backend")?;
    let client = node.add_pod("client")?;
    let url = format!("http://{}:{}/", backend.ip, http_peers::BACKEND_PORT);
    Ok(Setup {
        node,
        backend,
        client,
        url,
    })
}

impl Setup {
    /// 50 requests, 4 at a time, plus `extra` arguments.
    fn load(&self, extra: &[&str]) -> anyhow::Result<LoadReport> {
        let requests = REQUESTS.to_string();
        let mut args = vec![
            "--url",
            &self.url,
            "--requests",
            &requests,
            "--concurrency",
            "4",
        ];
        args.extend_from_slice(extra);
        let report = http_peers::load(&self.node, &self.client, &args)?;
        eprintln!("load {extra:?}: {report:?}");
        ensure!(
            report.sent == REQUESTS,
            "sent {} of {REQUESTS}",
            report.sent
        );
        Ok(report)
    }

    fn set_mode(&self, mode: &str) -> anyhow::Result<()> {
        http_peers::set_mode(&self.node, &self.backend, mode)?;
        let now = http_peers::mode(&self.node, &self.backend)?;
        ensure!(now == mode, "mode is {now}, wanted {mode}");
        Ok(())
    }

    /// Runs a load and checks the backend counted exactly its requests.
    fn counted_load(&self, extra: &[&str]) -> anyhow::Result<LoadReport> {
        let before = http_peers::backend_requests(&self.node, &self.backend)?;
        let report = self.load(extra)?;
        let after = http_peers::backend_requests(&self.node, &self.backend)?;
        ensure!(
            after - before == REQUESTS,
            "backend counted {} requests",
            after - before
        );
        Ok(report)
    }
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn httptool_modes_over_http1_and_http2() -> anyhow::Result<()> {
    if !require_privileges("httptool_modes_over_http1_and_http2") {
        return Ok(());
    }
    let s = setup("httpmode")?;
    let _backend = http_peers::serve(&s.node, &s.backend, "backend-1")?;
    for proto in PROTOCOLS {
        let ok = s.counted_load(proto)?;
        ensure!(
            ok.ok == REQUESTS && ok.status(200) == REQUESTS,
            "{proto:?}: {ok:?}"
        );
        ensure!(ok.backends.get("backend-1") == Some(&REQUESTS), "{ok:?}");
        ensure!(ok.error_total() == 0 && ok.latency_us.max > 0, "{ok:?}");
    }
    s.set_mode("status:503")?;
    for proto in PROTOCOLS {
        let failing = s.counted_load(proto)?;
        ensure!(
            failing.status(503) == REQUESTS && failing.ok == 0,
            "{failing:?}"
        );
        ensure!(
            failing.backends.get("backend-1") == Some(&REQUESTS),
            "{failing:?}"
        );
    }
    s.set_mode("reset")?;
    for proto in PROTOCOLS {
        let reset = s.load(proto)?;
        ensure!(reset.statuses.is_empty(), "{proto:?}: {reset:?}");
        ensure!(reset.error("reset") == REQUESTS, "{proto:?}: {reset:?}");
    }
    s.set_mode("delay:300ms")?;
    for proto in PROTOCOLS {
        let mut args = proto.to_vec();
        args.extend(["--timeout-ms", "100"]);
        let slow = s.load(&args)?;
        ensure!(slow.error("timeout") == REQUESTS, "{proto:?}: {slow:?}");
    }
    s.set_mode("close")?;
    let closing = s.load(&[])?;
    ensure!(
        closing.ok == REQUESTS,
        "close mode over HTTP/1.1: {closing:?}"
    );
    s.set_mode("ok")?;
    let back = s.load(&["--http2"])?;
    ensure!(back.ok == REQUESTS, "{back:?}");
    Ok(())
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn httptool_grpc_trailers_overrides_and_open_loop() -> anyhow::Result<()> {
    if !require_privileges("httptool_grpc_trailers_overrides_and_open_loop") {
        return Ok(());
    }
    let s = setup("httpgrpc")?;
    let _backend = http_peers::serve(&s.node, &s.backend, "backend-1")?;
    let url = format!("{}pkg.Svc/Method", s.url);
    let grpc = http_peers::grpc(&s.node, &s.client, &url)?;
    ensure!(grpc.status == Some(200) && grpc.trailers, "{grpc:?}");
    ensure!(grpc.grpc_status.as_deref() == Some("0"), "{grpc:?}");
    ensure!(grpc.backend.as_deref() == Some("backend-1"), "{grpc:?}");
    ensure!(http_peers::backend_requests(&s.node, &s.backend)? == 1);

    let overridden = s.load(&[
        "--header",
        "x-test-status: 429",
        "--method",
        "POST",
        "--body-bytes",
        "100",
    ])?;
    ensure!(overridden.status(429) == REQUESTS, "{overridden:?}");
    let open = s.load(&[
        "--rate",
        "200",
        "--header",
        "x-test-delay-ms: 50",
        "--http2",
    ])?;
    ensure!(open.ok == REQUESTS, "{open:?}");
    // Open loop at 200/s: 50 requests start over ~250 ms although each
    // takes 50 ms, so far more than 4 overlap and it finishes quickly.
    ensure!(
        open.elapsed_ms < 2000 && open.latency_us.p50 >= 50_000,
        "{open:?}"
    );
    ensure!(http_peers::backend_requests(&s.node, &s.backend)? == 1 + 2 * REQUESTS);
    Ok(())
}
