//! `cargo xtask bench`: the same work through each mode (direct, the node
//! proxy captured by eBPF, our sidecars, HAProxy sidecars) in one run, on
//! simulated nodes; latency open-loop at fixed rates, maximum rate, CPU of
//! the proxies per 1000 requests, bulk throughput, proxy memory as the
//! number of pods grows, and the agent's memory under connection bursts
//! and churn. Writes `report.json`, `report.md` and SVG plots.
//!
//! Environment variables narrow a run (for measuring one thing
//! repeatedly, e.g. comparing allocators):
//!
//! - `DATAPLANE_BENCH_ONLY`: comma-separated parts to run, of `latency`
//!   (the latency, rate and bulk runs), `memory` (memory against pods)
//!   `churn` (memory under churn) and `discovery` (the agent reading a
//!   large cluster from the Kubernetes API); default all.
//! - `DATAPLANE_BENCH_MODES`: comma-separated modes for the latency part,
//!   of `direct`, `node`, `node-fast`, `sidecar`, `haproxy`; default all (keep
//!   `direct`: the added latencies are measured against it).
//! - `DATAPLANE_BENCH_WORKLOADS`: comma-separated workloads for the
//!   latency part, of `tcp-rr` (with the repeats), `tcp-rr-poll`,
//!   `tcp-crr`, `http-rr` and `bulk`; default all. `tcp-rr` and
//!   `http-rr` also run on two nodes; a run without either builds no
//!   two-node topology.
//! - `DATAPLANE_BENCH_SOAK`: the churn soak's length in seconds (default
//!   600, `--quick` 15).

pub mod churn;
pub mod discovery;
pub mod envlist;
pub mod memory;
pub mod render;
pub mod report;
pub mod run;
pub mod sched;
pub mod topology;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use indicatif::{ProgressBar, ProgressStyle};

use churn::ChurnPlan;
use report::{Churn, Machine, Report};
use run::Plan;
use topology::{Mode, Topology};

/// Command-line options of the benchmark driver.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
}

/// The parts of a run (see `DATAPLANE_BENCH_ONLY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parts {
    latency: bool,
    memory: bool,
    churn: bool,
    discovery: bool,
}

impl Parts {
    fn from_env() -> anyhow::Result<Parts> {
        match std::env::var("DATAPLANE_BENCH_ONLY") {
            Ok(list) => Parts::parse(&list),
            Err(_) => Ok(Parts {
                latency: true,
                memory: true,
                churn: true,
                discovery: true,
            }),
        }
    }

    fn parse(list: &str) -> anyhow::Result<Parts> {
        let names = envlist::names(
            "DATAPLANE_BENCH_ONLY",
            list,
            &["latency", "memory", "churn", "discovery"],
        )?;
        Ok(Parts {
            latency: names.contains(&"latency"),
            memory: names.contains(&"memory"),
            churn: names.contains(&"churn"),
            discovery: names.contains(&"discovery"),
        })
    }
}

/// `DATAPLANE_BENCH_MODES`: the modes of the latency part.
fn modes_from_env() -> anyhow::Result<Vec<Mode>> {
    let Ok(list) = std::env::var("DATAPLANE_BENCH_MODES") else {
        return Ok(Mode::ALL.to_vec());
    };
    let known: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
    let names = envlist::names("DATAPLANE_BENCH_MODES", &list, &known)?;
    Ok(names
        .iter()
        .filter_map(|name| Mode::ALL.into_iter().find(|m| m.name() == *name))
        .collect())
}

/// `DATAPLANE_BENCH_SOAK`, in seconds (at most a day).
fn soak_from_env() -> anyhow::Result<Option<Duration>> {
    let Ok(text) = std::env::var("DATAPLANE_BENCH_SOAK") else {
        return Ok(None);
    };
    let secs: u64 = text
        .trim()
        .parse()
        .with_context(|| format!("DATAPLANE_BENCH_SOAK: not a number of seconds: {text:?}"))?;
    ensure!(
        (1..=86_400).contains(&secs),
        "DATAPLANE_BENCH_SOAK: 1..=86400 seconds, got {secs}"
    );
    Ok(Some(Duration::from_secs(secs)))
}

pub fn main(options: &Options) -> anyhow::Result<Report> {
    let parts = Parts::from_env()?;
    let modes = modes_from_env()?;
    let plan = Plan {
        quick: options.quick,
        workloads: run::Selection::from_env()?,
    };
    let churn_plan = ChurnPlan::new(options.quick, soak_from_env()?);
    let counts: &[u32] = if options.quick {
        &[1, 2]
    } else {
        &[1, 8, 32, 64]
    };
    let memory_modes = [Mode::Node, Mode::Sidecar, Mode::Haproxy];
    let runs = plan.runs(false) + plan.runs(true);
    let mut total = 0;
    if parts.latency {
        total += runs * modes.len() as u64;
    }
    if parts.memory {
        total += (counts.len() * memory_modes.len()) as u64;
    }
    if parts.churn {
        total += churn_plan.steps();
    }
    if parts.discovery {
        total += 1;
    }
    let bar = progress(total);
    let mut report = Report {
        machine: machine(),
        commit: commit(),
        generated_at: now_utc(),
        quick: options.quick,
        ..Report::default()
    };
    let spreads = [false, true]
        .into_iter()
        .filter(|&spread| parts.latency && plan.workloads.any_on(spread));
    for spread in spreads {
        for &mode in &modes {
            bar.set_message(format!("building the {} topology", mode.name()));
            let top = Topology::build(mode, spread)
                .with_context(|| format!("{} topology (two nodes: {spread})", mode.name()))?;
            let runs = run::run_all(&top, plan, &bar)?;
            report.results.extend(runs.results);
            report.repeats.extend(runs.repeats);
        }
    }
    for mode in memory_modes.into_iter().filter(|_| parts.memory) {
        report.memory.extend(memory::measure(mode, counts, &bar)?);
    }
    if parts.churn {
        report.churn = Some(churn::measure(&churn_plan, &bar).context("memory under churn")?);
    }
    if parts.discovery {
        bar.set_message("discovery at scale");
        report.discovery = Some(discovery::measure(options.quick).context("discovery at scale")?);
        bar.inc(1);
    }
    bar.finish_with_message("done");
    if let Some(churn) = &report.churn {
        println!("{}", churn_summary(churn));
    }
    if let Some(d) = &report.discovery {
        println!(
            "discovery: {} services, {} endpoints, {} pods: synced in {:.1} s, agent RSS {:.1} MiB \
             (PSS {:.1}, heap allocated {:.1}); {} endpoint changes in {:.1} s: agent CPU {:.2} cores; new Service to \
             first answered request p50 {:.0} ms, p99 {:.0} ms ({} samples)",
            d.services,
            d.endpoints,
            d.pods,
            d.sync_s,
            d.rss_bytes as f64 / f64::from(1 << 20),
            d.pss_bytes as f64 / f64::from(1 << 20),
            d.heap_allocated_bytes as f64 / f64::from(1 << 20),
            d.changes,
            d.churn_s,
            d.churn_cpu_cores,
            d.effective_p50_ms,
            d.effective_p99_ms,
            d.effective_ms.len()
        );
    }
    if options.quick {
        check_quick(&report, parts)?;
    }
    write(&report, &options.out)?;
    Ok(report)
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The churn numbers, printed at the end of every run (`--quick` only
/// checks that they were measured: these machines are too noisy for
/// thresholds).
fn churn_summary(churn: &Churn) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let after: Vec<String> = churn
        .after_burst_rss_bytes
        .iter()
        .map(|&b| format!("{:.1}", mib(b)))
        .collect();
    let soak = &churn.soak;
    format!(
        "churn: agent RSS (MiB): baseline {:.1}, peak {:.1}, after each burst of {} [{}], \
         settled {:.1} ({:+.1} vs baseline); agent descriptors: baseline {}, settled {}; \
         burst requests failed: {} {:?}\n\
         churn: soak {:.0} s ({} config versions, {} connections, {} requests, {} failed {:?}): \
         start {:.1}, max {:.1}, end {:.1} ({:+.1}), trend {:+.2} MiB/10 min, settled {:.1}",
        mib(churn.baseline_rss_bytes),
        mib(churn.peak_rss_bytes),
        churn.burst_connections,
        after.join(", "),
        mib(churn.settled_rss_bytes),
        mib(churn.settled_rss_bytes) - mib(churn.baseline_rss_bytes),
        churn.baseline_fds,
        churn.settled_fds,
        churn.burst_errors,
        churn.burst_error_kinds,
        soak.duration_s,
        soak.config_writes,
        soak.connections,
        soak.completed,
        soak.errors,
        soak.error_kinds,
        mib(soak.start_rss_bytes),
        mib(soak.max_rss_bytes),
        mib(soak.end_rss_bytes),
        mib(soak.end_rss_bytes) - mib(soak.start_rss_bytes),
        soak.trend_bytes_per_min * 10.0 / f64::from(1 << 20),
        mib(soak.settled_rss_bytes),
    )
}

/// `--quick` is CI's check that every mode moves bytes correctly and
/// that the memory parts ran.
fn check_quick(report: &Report, parts: Parts) -> anyhow::Result<()> {
    for result in report.results.iter().chain(&report.repeats) {
        ensure!(
            result.errors == 0 && result.completed > 0,
            "{} {} {}: {} completed, {} errors",
            result.mode,
            result.workload,
            result.pinning,
            result.completed,
            result.errors
        );
    }
    ensure!(
        !parts.latency || !report.results.is_empty(),
        "latency not measured"
    );
    ensure!(
        !parts.memory
            || (!report.memory.is_empty()
                && report.memory.iter().all(|m| m.proxy_pss_bytes > 0)
                && report
                    .memory
                    .iter()
                    .all(|m| m.mode != "node" || m.bpf_map_bytes > 0)),
        "memory not measured"
    );
    if parts.churn {
        let churn = report.churn.as_ref().context("churn not measured")?;
        check_churn_ran(churn)?;
    }
    if parts.discovery {
        let d = report
            .discovery
            .as_ref()
            .context("discovery not measured")?;
        ensure!(
            d.sync_s > 0.0 && d.rss_bytes > 0 && d.changes > 0 && !d.effective_ms.is_empty(),
            "discovery at scale measured nothing: {d:?}"
        );
    }
    Ok(())
}

/// That the churn part did what it says: every burst measured and
/// served, the soak sampled, its traffic served and every config
/// version applied. Not a judgement of the memory numbers.
fn check_churn_ran(churn: &Churn) -> anyhow::Result<()> {
    let soak = &churn.soak;
    ensure!(
        churn.baseline_rss_bytes > 0
            && churn.after_burst_rss_bytes.len() == churn.bursts as usize
            && churn.settled_rss_bytes > 0,
        "churn: bursts not measured: {churn:?}"
    );
    ensure!(
        churn.burst_completed > 0 && soak.completed > 0,
        "churn: no request completed (bursts {}, soak {})",
        churn.burst_completed,
        soak.completed
    );
    ensure!(
        soak.samples.len() >= 2 && soak.samples.iter().all(|s| s.rss_bytes > 0),
        "churn: soak not sampled"
    );
    ensure!(
        soak.config_writes > 0 && soak.config_reloads > 0 && soak.config_rejected == 0,
        "churn: {} config versions written, {} applied, {} rejected",
        soak.config_writes,
        soak.config_reloads,
        soak.config_rejected
    );
    Ok(())
}

fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(out.join("report.md"), render::markdown(report))?;
    for workload in ["tcp-rr", "http-rr", "tcp-rr-2nodes", "http-rr-2nodes"] {
        for pinning in ["pinned", "unpinned"] {
            let rate = report
                .results
                .iter()
                .filter(|r| r.workload == workload && r.rate > 0.0)
                .map(|r| r.rate)
                .fold(f64::INFINITY, f64::min);
            if let Some(svg) = render::latency_svg(report, workload, pinning, rate) {
                std::fs::write(out.join(format!("latency-{workload}-{pinning}.svg")), svg)?;
            }
        }
    }
    if let Some(svg) = render::memory_svg(report) {
        std::fs::write(out.join("memory.svg"), svg)?;
    }
    Ok(())
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let mem_kib: u64 = field(&meminfo, "MemTotal")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Machine {
        cpus: sched::num_cpus(),
        cpu_model: field(&cpuinfo, "model name"),
        memory_bytes: mem_kib * 1024,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn command_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit() -> String {
    let hash = command_output(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
    let dirty = command_output(Command::new("git").args(["status", "--porcelain"]))
        .is_some_and(|s| !s.is_empty());
    match hash {
        Some(hash) if dirty => format!("{hash}-dirty"),
        Some(hash) => hash,
        None => "unknown".into(),
    }
}

fn now_utc() -> String {
    command_output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_name_what_runs() -> anyhow::Result<()> {
        let only_churn = Parts::parse("churn")?;
        assert_eq!(
            only_churn,
            Parts {
                latency: false,
                memory: false,
                churn: true,
                discovery: false,
            }
        );
        let two = Parts::parse(" memory, churn ")?;
        assert!(!two.latency && two.memory && two.churn);
        assert!(Parts::parse("latency,bogus").is_err());
        assert!(Parts::parse(" , ").is_err());
        Ok(())
    }
}
