//! The latency and throughput runs on one topology: for each pinning, a
//! closed-loop run (maximum rate) and open-loop runs at fixed rates for
//! each request/response workload, then bulk throughput; and the pinned
//! ping-pong at its first rate [`REPEATS`] more times, for the spread
//! between runs.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use indicatif::ProgressBar;

use super::report::RunResult;
use super::sched::{Pinning, proxy_cpu_ns, set_affinity};
use super::topology::Topology;
use crate::bench_peers::{self, BenchReport};

/// How much work a run does.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
}

impl Plan {
    fn duration(self) -> Duration {
        if self.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }
    }

    /// Open-loop rates (requests/s) below and up to saturation. New
    /// connections stay below what the ephemeral ports allow in TIME_WAIT
    /// (about 28,000 per destination for 60 s) over both pinnings.
    fn rates(self, workload: &str) -> &'static [f64] {
        match (self.quick, workload) {
            (true, _) => &[500.0],
            (false, "tcp-rr") => &[1000.0, 5000.0, 20000.0],
            (false, "tcp-rr-poll") => &[1000.0, 5000.0],
            (false, "tcp-crr") => &[500.0, 1500.0],
            (false, _) => &[500.0, 2000.0, 8000.0],
        }
    }

    /// The request/response workloads of a topology.
    fn workloads(spread: bool) -> &'static [&'static str] {
        if spread {
            &["tcp-rr", "http-rr"]
        } else {
            &["tcp-rr", "tcp-rr-poll", "tcp-crr", "http-rr"]
        }
    }

    fn bulk_bytes(self) -> u64 {
        if self.quick { 16 << 20 } else { 512 << 20 }
    }

    /// Number of runs per topology, for the progress bar.
    pub fn runs(self, spread: bool) -> u64 {
        if spread {
            return 2 * 2 * 2;
        }
        let rr: usize = Plan::workloads(false)
            .iter()
            .map(|w| usize::from(has_max(w)) + self.rates(w).len())
            .sum();
        2 * (rr as u64 + 1) + REPEATS as u64
    }
}

/// Whether `DATAPLANE_BENCH_WORKLOADS` (comma-separated, default all)
/// selects `workload`.
fn selected(workload: &str) -> bool {
    std::env::var("DATAPLANE_BENCH_WORKLOADS")
        .map_or(true, |list| list.split(',').any(|w| w.trim() == workload))
}

/// Extra runs of the pinned ping-pong at its first rate.
pub const REPEATS: usize = 3;

/// Whether a workload gets a closed-loop (maximum rate) run: new
/// connections as fast as possible would run out of ephemeral ports.
fn has_max(workload: &str) -> bool {
    workload != "tcp-crr"
}

/// What [`run_all`] measured.
#[derive(Default)]
pub struct Runs {
    pub results: Vec<RunResult>,
    pub repeats: Vec<RunResult>,
}

/// Runs every workload on `top` in both pinnings. On a two-node
/// topology: the request/response workloads at the maximum and the first
/// rate only (reported as `<workload>-2nodes`), no bulk.
pub fn run_all(top: &Topology, plan: Plan, bar: &ProgressBar) -> anyhow::Result<Runs> {
    let mut results = Vec::new();
    let mut repeats = Vec::new();
    for pinning in [Pinning::Pinned, Pinning::Unpinned] {
        set_affinity(&top.service_pids(), pinning)?;
        for &workload in Plan::workloads(top.spread) {
            if !selected(workload) {
                continue;
            }
            warm_up(top, workload, pinning)?;
            let mut saturation = f64::INFINITY;
            if has_max(workload) {
                bar.set_message(format!(
                    "{} {workload} {} max",
                    top.mode.name(),
                    pinning.name()
                ));
                let max = measure(top, workload, pinning, 0.0, plan)?;
                saturation = max.rps;
                results.push(max);
                bar.inc(1);
            }
            let rates = plan.rates(workload);
            let rates = if top.spread { &rates[..1] } else { rates };
            for &rate in rates {
                bar.set_message(format!(
                    "{} {workload} {} {rate}/s",
                    top.mode.name(),
                    pinning.name()
                ));
                // Past saturation the latency only measures the queue.
                if plan.quick || rate <= saturation * 1.05 {
                    results.push(measure(top, workload, pinning, rate, plan)?);
                }
                bar.inc(1);
            }
        }
        if !top.spread && selected("bulk") {
            bar.set_message(format!("{} bulk {}", top.mode.name(), pinning.name()));
            results.push(bulk(top, pinning, plan)?);
            bar.inc(1);
        }
        if !top.spread && pinning == Pinning::Pinned && selected("tcp-rr") {
            let rate = plan.rates("tcp-rr")[0];
            for i in 0..REPEATS {
                bar.set_message(format!(
                    "{} tcp-rr pinned, repeat {}",
                    top.mode.name(),
                    i + 1
                ));
                repeats.push(measure(top, "tcp-rr", pinning, rate, plan)?);
                bar.inc(1);
            }
        }
    }
    Ok(Runs { results, repeats })
}

fn workload_args(top: &Topology, workload: &str) -> Vec<String> {
    match workload {
        "tcp-rr" | "tcp-rr-poll" | "tcp-crr" => {
            let mut args = vec![
                if workload == "tcp-crr" {
                    "tcp-crr"
                } else {
                    "tcp-rr"
                }
                .to_string(),
                "--to".into(),
                top.tcp_target().to_string(),
                "--size".into(),
                "100".into(),
            ];
            if workload == "tcp-rr-poll" {
                args.extend(["--wait".into(), "poll".into()]);
            }
            args
        }
        _ => vec!["http-rr".into(), "--url".into(), top.http_url()],
    }
}

/// Fills pools, caches and the proxies' lazily built state; not measured.
fn warm_up(top: &Topology, workload: &str, pinning: Pinning) -> anyhow::Result<()> {
    let mut args = workload_args(top, workload);
    // New connections warm up paced, to spare the ephemeral ports.
    let rate = if has_max(workload) { "0" } else { "500" };
    args.extend(["--rate", rate, "--duration", "1", "--warmup", "0"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bench_peers::run_in_pod(&top.node, &top.client, &args, pinning.prefix())?;
    Ok(())
}

fn measure(
    top: &Topology,
    workload: &str,
    pinning: Pinning,
    rate: f64,
    plan: Plan,
) -> anyhow::Result<RunResult> {
    let mut args = workload_args(top, workload);
    let duration = plan.duration().as_secs().to_string();
    args.extend([
        "--rate".into(),
        rate.to_string(),
        "--duration".into(),
        duration,
        "--warmup".into(),
        "0".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxies = top.proxy_pids();
    let cpu_before = proxy_cpu_ns(&proxies);
    let report = bench_peers::run_in_pod(&top.node, &top.client, &args, pinning.prefix())
        .with_context(|| format!("{} {workload} at {rate}/s", top.mode.name()))?;
    let cpu_ns = proxy_cpu_ns(&proxies).saturating_sub(cpu_before);
    ensure!(
        report.completed > 0,
        "{} {workload}: no request completed: {report:?}",
        top.mode.name()
    );
    Ok(result(top, workload, pinning, rate, &report, cpu_ns))
}

fn result(
    top: &Topology,
    workload: &str,
    pinning: Pinning,
    rate: f64,
    r: &BenchReport,
    cpu_ns: u64,
) -> RunResult {
    let latency = r.latency_us.as_ref();
    let per_1k = (!proxy_free(top)).then(|| cpu_ns as f64 / 1e9 / (r.completed as f64 / 1000.0));
    let workload = if top.spread {
        format!("{workload}-2nodes")
    } else {
        workload.to_string()
    };
    RunResult {
        mode: top.mode.name().into(),
        workload,
        pinning: pinning.name().into(),
        rate,
        p50_us: latency.map(|l| l.p50 as f64),
        p90_us: latency.map(|l| l.p90 as f64),
        p99_us: latency.map(|l| l.p99 as f64),
        p999_us: latency.map(|l| l.p999 as f64),
        rps: r.achieved_rate.unwrap_or_default(),
        cpu_s_per_1k_req: per_1k,
        throughput_bps: None,
        completed: r.completed,
        errors: r.errors,
    }
}

fn proxy_free(top: &Topology) -> bool {
    top.proxy_pids().is_empty()
}

fn bulk(top: &Topology, pinning: Pinning, plan: Plan) -> anyhow::Result<RunResult> {
    let bytes = plan.bulk_bytes().to_string();
    let target = top.tcp_target().to_string();
    let args = ["bulk", "--to", target.as_str(), "--bytes", bytes.as_str()];
    let report = bench_peers::run_in_pod(&top.node, &top.client, &args, pinning.prefix())?;
    ensure!(
        report.bytes == Some(plan.bulk_bytes()),
        "{} bulk moved {:?} of {} bytes",
        top.mode.name(),
        report.bytes,
        plan.bulk_bytes()
    );
    Ok(RunResult {
        mode: top.mode.name().into(),
        workload: "bulk".into(),
        pinning: pinning.name().into(),
        throughput_bps: report.throughput_bps,
        completed: 1,
        ..RunResult::default()
    })
}
