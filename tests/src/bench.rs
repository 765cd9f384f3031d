//! `cargo xtask bench`: the same work through each mode (direct, the node
//! proxy captured by eBPF, our sidecars, HAProxy sidecars) in one run, on
//! simulated nodes; latency open-loop at fixed rates, maximum rate, CPU of
//! the proxies per 1000 requests, bulk throughput, and proxy memory as the
//! number of pods grows. Writes `report.json`, `report.md` and SVG plots.

pub mod memory;
pub mod render;
pub mod report;
pub mod run;
pub mod sched;
pub mod topology;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};
use indicatif::{ProgressBar, ProgressStyle};

use report::{Machine, Report};
use run::Plan;
use topology::{Mode, Topology};

/// Command-line options of the benchmark driver.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
}

pub fn main(options: &Options) -> anyhow::Result<Report> {
    let plan = Plan {
        quick: options.quick,
    };
    let counts: &[u32] = if options.quick {
        &[1, 2]
    } else {
        &[1, 8, 32, 64]
    };
    let memory_modes = [Mode::Node, Mode::Sidecar, Mode::Haproxy];
    let runs = plan.runs(false) + plan.runs(true);
    let total = runs * Mode::ALL.len() as u64 + (counts.len() * memory_modes.len()) as u64;
    let bar = progress(total);
    let mut report = Report {
        machine: machine(),
        commit: commit(),
        generated_at: now_utc(),
        quick: options.quick,
        ..Report::default()
    };
    for spread in [false, true] {
        for mode in Mode::ALL {
            bar.set_message(format!("building the {} topology", mode.name()));
            let top = Topology::build(mode, spread)
                .with_context(|| format!("{} topology (two nodes: {spread})", mode.name()))?;
            report.results.extend(run::run_all(&top, plan, &bar)?);
        }
    }
    for mode in memory_modes {
        report.memory.extend(memory::measure(mode, counts, &bar)?);
    }
    bar.finish_with_message("done");
    if options.quick {
        check_quick(&report)?;
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

/// `--quick` is CI's check that every mode moves bytes correctly.
fn check_quick(report: &Report) -> anyhow::Result<()> {
    for result in &report.results {
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
        report.memory.iter().all(|m| m.proxy_rss_bytes > 0),
        "memory not measured"
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
