//! Tests of the benchmark's load generator (`benchtool`) on a simulated
//! node without an agent: pod `client` talks to pod `server` directly over
//! the node's bridge. The benchmark compares proxy modes by these reports,
//! so they must first be shown right where the answer is known: the
//! requested rate is met, nothing fails, bytes come back.

use anyhow::{Context as _, ensure};
use dataplane_tests::bench_peers::{self, BenchReport};
use dataplane_tests::{Pod, SimNode, http_peers, require_privileges};

const ECHO_PORT: u16 = 7000;

struct Setup {
    node: SimNode,
    server: Pod,
    client: Pod,
}

fn setup(hint: &str) -> anyhow::Result<Setup> {
    let mut node = SimNode::new(hint)?;
    let server = node.add_pod("server")?;
    let client = node.add_pod("client")?;
    Ok(Setup {
        node,
        server,
        client,
    })
}

impl Setup {
    fn run(&self, args: &[&str], prefix: &[&str]) -> anyhow::Result<BenchReport> {
        let report = bench_peers::run_in_pod(&self.node, &self.client, args, prefix)?;
        eprintln!("benchtool {}: {report:?}", args.join(" "));
        Ok(report)
    }
}

/// `completed` within 5% of `expected`, and no errors.
fn ensure_count(report: &BenchReport, expected: u64) -> anyhow::Result<()> {
    let (low, high) = (expected * 95 / 100, expected * 105 / 100);
    ensure!(
        (low..=high).contains(&report.completed),
        "completed {} of {expected}",
        report.completed
    );
    ensure!(
        report.errors == 0,
        "{} errors: {:?}",
        report.errors,
        report.error_kinds
    );
    Ok(())
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn tcp_request_response_and_bulk_between_pods() -> anyhow::Result<()> {
    if !require_privileges("tcp_request_response_and_bulk_between_pods") {
        return Ok(());
    }
    let s = setup("btcp")?;
    let _echo = bench_peers::echo_serve(&s.node, &s.server, ECHO_PORT)?;
    let to = format!("{}:{ECHO_PORT}", s.server.ip);

    // Open loop, pinned to one CPU as the benchmark runs it.
    let open = s.run(
        &[
            "tcp-rr",
            "--to",
            &to,
            "--rate",
            "500",
            "--duration",
            "2",
            "--warmup",
            "0.5",
        ],
        &["taskset", "-c", "0"],
    )?;
    ensure_count(&open, 1000)?;
    let latency = open.latency_us.context("no latency")?;
    ensure!(latency.p50 > 0, "p50 {latency:?}");
    ensure!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);
    let achieved = open.achieved_rate.context("no rate")?;
    ensure!((achieved - 500.0).abs() < 25.0, "achieved {achieved}");
    eprintln!("pod-to-pod tcp-rr p50 {} us", latency.p50);

    let closed = s.run(
        &["tcp-rr", "--to", &to, "--rate", "0", "--duration", "1"],
        &[],
    )?;
    ensure!(
        closed.errors == 0,
        "closed loop errors {:?}",
        closed.error_kinds
    );
    let achieved = closed.achieved_rate.context("no rate")?;
    ensure!(
        achieved > 500.0,
        "closed loop reached only {achieved} req/s"
    );

    let bytes = (64u64 << 20).to_string();
    let bulk = s.run(&["bulk", "--to", &to, "--bytes", &bytes], &[])?;
    ensure!(bulk.mode == "bulk" && bulk.latency_us.is_none());
    ensure!(bulk.errors == 0, "bulk failed: {:?}", bulk.error);
    ensure!(bulk.requested == Some(64 << 20) && bulk.bytes == bulk.requested);
    ensure!(bulk.throughput_bps.is_some_and(|t| t > 0.0));
    Ok(())
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn nothing_listening_is_a_setup_failure() -> anyhow::Result<()> {
    if !require_privileges("nothing_listening_is_a_setup_failure") {
        return Ok(());
    }
    let s = setup("bnone")?;
    let to = format!("{}:{ECHO_PORT}", s.server.ip);
    let args = ["tcp-rr", "--to", &to, "--rate", "10", "--duration", "1"];
    let err = match bench_peers::run_in_pod(&s.node, &s.client, &args, &[]) {
        Ok(report) => anyhow::bail!("ran against nothing: {report:?}"),
        Err(err) => format!("{err:#}"),
    };
    ensure!(
        err.contains("exit status: 1") && err.contains("refused"),
        "unexpected error: {err}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: builds a simulated node; `cargo xtask test` runs it as root or with CI=true"]
fn http_request_response_between_pods() -> anyhow::Result<()> {
    if !require_privileges("http_request_response_between_pods") {
        return Ok(());
    }
    let s = setup("bhttp")?;
    let _backend = http_peers::serve(&s.node, &s.server, "server")?;
    let url = format!("http://{}:{}/", s.server.ip, http_peers::BACKEND_PORT);
    let base = [
        "http-rr",
        "--url",
        &url,
        "--rate",
        "200",
        "--duration",
        "2",
        "--warmup",
        "0.5",
    ];
    let get = s.run(&base, &[])?;
    ensure_count(&get, 400)?;
    ensure!(get.latency_us.is_some_and(|l| l.p50 > 0));

    let mut post = base.to_vec();
    post.extend(["--body-bytes", "1000", "--connections", "4"]);
    ensure_count(&s.run(&post, &[])?, 400)
}
