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
    /// Which of [`WORKLOADS`] run (see [`Selection::from_env`]).
    pub workloads: Selection,
}

/// Every workload of the latency part, as `DATAPLANE_BENCH_WORKLOADS`
/// names them (`tcp-rr` and `http-rr` also run on two nodes).
pub const WORKLOADS: [&str; 5] = ["tcp-rr", "tcp-rr-poll", "tcp-crr", "http-rr", "bulk"];

/// A subset of [`WORKLOADS`], one bit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection(u8);

impl Selection {
    pub const ALL: Selection = Selection((1 << WORKLOADS.len()) - 1);

    /// `DATAPLANE_BENCH_WORKLOADS` (comma-separated), or all.
    pub fn from_env() -> anyhow::Result<Selection> {
        match std::env::var("DATAPLANE_BENCH_WORKLOADS") {
            Ok(list) => Selection::parse(&list),
            Err(_) => Ok(Selection::ALL),
        }
    }

    fn parse(list: &str) -> anyhow::Result<Selection> {
        let names = super::envlist::names("DATAPLANE_BENCH_WORKLOADS", list, &WORKLOADS)?;
        let bits = WORKLOADS
            .iter()
            .enumerate()
            .filter(|(_, w)| names.contains(w))
            .fold(0, |bits, (index, _)| bits | 1 << index);
        Ok(Selection(bits))
    }

    pub fn has(self, workload: &str) -> bool {
        WORKLOADS
            .iter()
            .position(|w| *w == workload)
            .is_some_and(|index| self.0 & (1 << index) != 0)
    }

    /// Whether a topology (two nodes: `spread`) has anything to run.
    pub fn any_on(self, spread: bool) -> bool {
        topology_workloads(spread).iter().any(|w| self.has(w)) || (!spread && self.has("bulk"))
    }
}

/// The request/response workloads of a topology.
fn topology_workloads(spread: bool) -> &'static [&'static str] {
    if spread {
        &["tcp-rr", "http-rr"]
    } else {
        &["tcp-rr", "tcp-rr-poll", "tcp-crr", "http-rr"]
    }
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

    /// The selected request/response workloads of a topology.
    fn workloads(self, spread: bool) -> impl Iterator<Item = &'static str> {
        topology_workloads(spread)
            .iter()
            .copied()
            .filter(move |w| self.workloads.has(w))
    }

    fn bulk_bytes(self) -> u64 {
        if self.quick { 16 << 20 } else { 512 << 20 }
    }

    /// Number of runs per topology, for the progress bar.
    pub fn runs(self, spread: bool) -> u64 {
        if spread {
            return 2 * 2 * self.workloads(true).count() as u64;
        }
        let rr: usize = self
            .workloads(false)
            .map(|w| usize::from(has_max(w)) + self.rates(w).len())
            .sum();
        let bulk = u64::from(self.workloads.has("bulk"));
        let repeats = if self.workloads.has("tcp-rr") {
            REPEATS as u64
        } else {
            0
        };
        2 * (rr as u64 + bulk) + repeats
    }
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
        for workload in plan.workloads(top.spread) {
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
        if !top.spread && plan.workloads.has("bulk") {
            bar.set_message(format!("{} bulk {}", top.mode.name(), pinning.name()));
            results.push(bulk(top, pinning, plan)?);
            bar.inc(1);
        }
        if !top.spread && pinning == Pinning::Pinned && plan.workloads.has("tcp-rr") {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_names_what_runs() -> anyhow::Result<()> {
        let bulk = Selection::parse(" bulk ")?;
        assert!(bulk.has("bulk") && !bulk.has("tcp-rr"));
        // Bulk runs on one node only: no two-node topology to build.
        assert!(bulk.any_on(false) && !bulk.any_on(true));
        let rr = Selection::parse("tcp-rr,http-rr")?;
        assert!(rr.any_on(false) && rr.any_on(true) && !rr.has("tcp-crr"));
        assert!(WORKLOADS.iter().all(|w| Selection::ALL.has(w)));
        assert!(Selection::parse("tcp-rr,bogus").is_err());
        assert!(Selection::parse(" , ").is_err());
        Ok(())
    }

    #[test]
    fn the_progress_bar_counts_only_the_selected_runs() -> anyhow::Result<()> {
        let plan = |list| -> anyhow::Result<Plan> {
            Ok(Plan {
                quick: false,
                workloads: Selection::parse(list)?,
            })
        };
        // Both pinnings, one bulk run each.
        assert_eq!(plan("bulk")?.runs(false), 2);
        assert_eq!(plan("bulk")?.runs(true), 0);
        // A maximum and three rates per pinning, then the repeats.
        assert_eq!(plan("tcp-rr")?.runs(false), 2 * 4 + REPEATS as u64);
        assert_eq!(plan("tcp-rr")?.runs(true), 2 * 2);
        Ok(())
    }
}
