//! Human-readable renderings of a benchmark [`Report`]: a Markdown summary
//! (`report.md`) and self-contained SVG charts.
//!
//! Everything here is a pure function of the report (no clock, no
//! randomness, no hash-map iteration order), so the same `report.json`
//! always renders to byte-identical files that can be committed and
//! diffed. The charts are simple enough that hand-written SVG is cheaper
//! than a plotting dependency, and it renders on GitHub without fonts or
//! scripts.

use std::collections::BTreeMap;

use super::report::{Churn, MemoryPoint, Report, RssSample, RunResult};

/// Modes in comparison order: the baseline, then the two designs under
/// test, then the reference sidecar. Unknown modes sort after, by name.
const MODES: [&str; 5] = ["direct", "node", "node-fast", "sidecar", "haproxy"];
/// Workloads in the order the report presents them.
const WORKLOADS: [&str; 5] = ["tcp-rr", "tcp-rr-poll", "tcp-crr", "http-rr", "bulk"];
/// Pinned first: every process on one CPU is the less noisy comparison.
const PINNINGS: [&str; 2] = ["pinned", "unpinned"];
/// The mode every "added" / "vs direct" column is relative to.
const BASELINE: &str = "direct";
/// The workload measured in bytes per second rather than requests.
const BULK: &str = "bulk";
/// What a cell shows when the value was not measured.
const MISSING: &str = "–";
const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A latency percentile: its label and how to read it from a run.
type Percentile = (&'static str, fn(&RunResult) -> Option<f64>);

/// The percentiles shown, in both the tables and the latency chart.
const PERCENTILES: [Percentile; 4] = [
    ("p50", |r| r.p50_us),
    ("p90", |r| r.p90_us),
    ("p99", |r| r.p99_us),
    ("p99.9", |r| r.p999_us),
];

// ---------------------------------------------------------------------------
// Ordering and lookup
// ---------------------------------------------------------------------------

/// Position of `name` in `known`, or after all of them when unknown, so
/// that sorting by `(rank, name)` gives the fixed order, then alphabetical.
fn rank(known: &[&str], name: &str) -> usize {
    known.iter().position(|k| *k == name).unwrap_or(known.len())
}

/// The distinct names in `names`, known ones first in their fixed order:
/// a report with an extra mode or workload still renders, after the rest.
fn ordered<'a>(known: &[&str], names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = names.collect();
    out.sort_by_key(|name| (rank(known, name), *name));
    out.dedup();
    out
}

/// Rates come from one configured list but went through JSON as floats,
/// so compare with a relative tolerance rather than `==`. Non-finite rates
/// (e.g. the minimum of an empty list) never match anything.
fn same_rate(a: f64, b: f64) -> bool {
    a.is_finite() && b.is_finite() && (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Open loop: requests sent at a fixed rate, so latency is comparable
/// across modes. Closed-loop runs (rate 0) measure the maximum rate.
fn is_open_loop(run: &RunResult) -> bool {
    run.rate > 0.0
}

/// The runs of one workload and pinning.
fn group<'a>(report: &'a Report, workload: &str, pinning: &str) -> Vec<&'a RunResult> {
    let matches = |r: &&RunResult| r.workload == workload && r.pinning == pinning;
    report.results.iter().filter(matches).collect()
}

/// The first run of `mode` at `rate`; a repeated measurement is ignored
/// rather than shown twice, which would make the tables ambiguous.
fn find<'a>(runs: &[&'a RunResult], mode: &str, rate: f64) -> Option<&'a RunResult> {
    runs.iter()
        .copied()
        .find(|r| r.mode == mode && same_rate(r.rate, rate))
}

/// The distinct open-loop rates of `runs`, ascending.
fn open_rates(runs: &[&RunResult]) -> Vec<f64> {
    let mut rates: Vec<f64> = runs
        .iter()
        .filter(|r| is_open_loop(r))
        .map(|r| r.rate)
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup_by(|a, b| same_rate(*a, *b));
    rates
}

// ---------------------------------------------------------------------------
// Number formatting
// ---------------------------------------------------------------------------

/// `value` with `decimals` decimals, or the missing marker; non-finite
/// numbers (a division by a zero baseline) count as missing.
fn num(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => MISSING.to_string(),
    }
}

/// `value - base`, signed, so that a proxy measured faster than direct
/// (noise) shows as such instead of hiding the sign; never "-0.0".
fn added(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if (v - b).is_finite() => {
            let d = if (v - b).abs() < 0.05 { 0.0 } else { v - b };
            format!("{d:+.1}")
        }
        _ => MISSING.to_string(),
    }
}

/// `value` as a percentage of `base`, or missing without a usable base.
fn percent_of(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 && v.is_finite() => format!("{:.1} %", v / b * 100.0),
        _ => MISSING.to_string(),
    }
}

/// A rate as configured: whole numbers without decimals ("1000").
fn rate_label(rate: f64) -> String {
    if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

/// Proxy CPU in milliseconds per 1000 requests: seconds would be mostly
/// leading zeros.
fn cpu_ms(run: &RunResult) -> String {
    num(run.cpu_s_per_1k_req.map(|s| s * 1000.0), 1)
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

/// The whole report as Markdown: header, one section per workload and
/// pinning with its tables, then memory. Tables without rows are left
/// out, so a `--quick` or partial report shows only what was measured.
pub fn markdown(report: &Report) -> String {
    let mut out = header(report);
    let workloads = ordered(
        &WORKLOADS,
        report.results.iter().map(|r| r.workload.as_str()),
    );
    let pinnings = ordered(&PINNINGS, report.results.iter().map(|r| r.pinning.as_str()));
    for workload in &workloads {
        for pinning in &pinnings {
            out.push_str(&section(report, workload, pinning));
        }
    }
    out.push_str(&repeats_section(report));
    out.push_str(&memory_section(report));
    if let Some(churn) = &report.churn {
        out.push_str(&churn_section(churn));
    }
    if let Some(discovery) = &report.discovery {
        out.push_str(&discovery_section(discovery));
    }
    out
}

fn discovery_section(d: &crate::bench::report::DiscoveryScale) -> String {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    format!(
        "\n## Discovery from the Kubernetes API at scale\n\n\
         The agent, run as deployed on a simulated node, reads a stand-in API server \
         holding {} Services (one EndpointSlice each, {} endpoints in all) and {} pods of \
         its node, then endpoint changes arrive at a steady rate while new Services are \
         created one by one.\n\n\
         | measure | value |\n|:--|--:|\n\
         | start to every Service in the agent's state | {:.1} s |\n\
         | agent RSS / PSS, settled (heap allocated) | {:.1} / {:.1} ({:.1}) MiB |\n\
         | endpoint changes applied at the API | {} in {:.1} s |\n\
         | agent CPU meanwhile | {:.2} cores |\n\
         | new Service to the first request answered through its VIP, p50 / p99 ({} samples) | {:.0} / {:.0} ms |\n",
        d.services,
        d.endpoints,
        d.pods,
        d.sync_s,
        mib(d.rss_bytes),
        mib(d.pss_bytes),
        mib(d.heap_allocated_bytes),
        d.changes,
        d.churn_s,
        d.churn_cpu_cores,
        d.effective_ms.len(),
        d.effective_p50_ms,
        d.effective_p99_ms,
    )
}

/// Title and one line of context: numbers mean little without the
/// machine, and a `--quick` run must not be mistaken for a real one.
fn header(report: &Report) -> String {
    let m = &report.machine;
    let cpus = if m.cpus == 0 {
        MISSING.to_string()
    } else {
        m.cpus.to_string()
    };
    let memory = (m.memory_bytes > 0).then(|| m.memory_bytes as f64 / GIB);
    let quick = if report.quick { "yes" } else { "no" };
    let mut out = format!(
        "# Data plane benchmark\n\n**Machine:** {cpus} CPUs, {}, {} GiB, kernel {} · **commit** `{}` · **date** {} · **`--quick`:** {quick}\n\n",
        text(&m.cpu_model),
        num(memory, 1),
        text(&m.kernel),
        text(&report.commit),
        text(&report.generated_at),
    );
    if report.quick {
        out.push_str(
            "> `--quick` run: every mode briefly, for CI; the numbers are not meaningful.\n\n",
        );
    }
    out
}

/// Report text for Markdown: missing when empty, and on one line.
fn text(value: &str) -> String {
    if value.trim().is_empty() {
        MISSING.to_string()
    } else {
        value.replace(['\n', '\r'], " ")
    }
}

/// Table cell text: a `|` would end the cell.
fn cell(value: &str) -> String {
    text(value).replace('|', "\\|")
}

/// A Markdown table under a heading, or nothing at all when there are no
/// rows: a header without rows says less than no table.
fn table(heading: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let align: Vec<&str> = (0..header.len())
        .map(|i| if i == 0 { ":--" } else { "--:" })
        .collect();
    let mut out = format!(
        "### {heading}\n\n| {} |\n|{}|\n",
        header.join(" | "),
        align.join("|")
    );
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out.push('\n');
    out
}

/// The tables of one workload and pinning, under a heading if any.
fn section(report: &Report, workload: &str, pinning: &str) -> String {
    let runs = group(report, workload, pinning);
    let modes = ordered(&MODES, runs.iter().map(|r| r.mode.as_str()));
    let mut tables = latency_table(&runs, &modes);
    if workload == BULK {
        tables.push_str(&bulk_table(&runs, &modes));
    } else {
        tables.push_str(&max_rate_table(&runs, &modes));
    }
    if tables.is_empty() {
        return String::new();
    }
    format!("## {}, {}\n\n{tables}", text(workload), text(pinning))
}

/// Open-loop latency, one block of rows per rate. A mode with runs at
/// other rates but not this one (skipped above its saturation) gets a row
/// of missing values, so the gap is visible rather than silent.
fn latency_table(runs: &[&RunResult], modes: &[&str]) -> String {
    let mut rows = Vec::new();
    for rate in open_rates(runs) {
        let base = find(runs, BASELINE, rate);
        for mode in modes {
            rows.push(match find(runs, mode, rate) {
                Some(run) => latency_row(run, base),
                None => missing_row(mode, &[rate_label(rate)], 7),
            });
        }
    }
    let header = [
        "mode",
        "rate (req/s)",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "added p50 µs",
        "added p99 µs",
        "CPU ms / 1k req",
    ];
    table("Latency at a fixed rate", &header, &rows)
}

/// One latency row. The "added" columns are blank for direct itself,
/// where they would always read +0.0.
fn latency_row(run: &RunResult, base: Option<&RunResult>) -> Vec<String> {
    let mut row = vec![cell(&run.mode), rate_label(run.rate)];
    row.extend(PERCENTILES.iter().map(|(_, get)| num(get(run), 1)));
    if run.mode == BASELINE {
        row.extend([String::new(), String::new()]);
    } else {
        row.push(added(run.p50_us, base.and_then(|b| b.p50_us)));
        row.push(added(run.p99_us, base.and_then(|b| b.p99_us)));
    }
    row.push(cpu_ms(run));
    row
}

/// A row for a mode without a run: the leading cells, then `missing`
/// missing markers.
fn missing_row(mode: &str, leading: &[String], missing: usize) -> Vec<String> {
    let mut row = vec![cell(mode)];
    row.extend(leading.iter().cloned());
    row.extend(std::iter::repeat_n(MISSING.to_string(), missing));
    row
}

/// Closed-loop (maximum rate) runs, relative to direct.
fn max_rate_table(runs: &[&RunResult], modes: &[&str]) -> String {
    if !runs.iter().any(|r| r.rate == 0.0) {
        return String::new();
    }
    let base = find(runs, BASELINE, 0.0).map(|b| b.rps);
    let rows: Vec<Vec<String>> = modes
        .iter()
        .map(|mode| max_rate_row(mode, find(runs, mode, 0.0), base))
        .collect();
    let header = ["mode", "req/s", "vs direct", "CPU ms / 1k req"];
    table("Maximum rate (closed loop)", &header, &rows)
}

/// One maximum-rate row; "vs direct" is blank for direct itself.
fn max_rate_row(mode: &str, run: Option<&RunResult>, base: Option<f64>) -> Vec<String> {
    let Some(run) = run else {
        return missing_row(mode, &[], 3);
    };
    let vs = if mode == BASELINE {
        String::new()
    } else {
        percent_of(Some(run.rps), base)
    };
    vec![cell(mode), num(Some(run.rps), 0), vs, cpu_ms(run)]
}

/// Bulk transfer throughput each way, in MB/s (decimal, like link
/// speeds) and Gbit/s, relative to direct.
fn bulk_table(runs: &[&RunResult], modes: &[&str]) -> String {
    if !runs.iter().any(|r| r.rate == 0.0) {
        return String::new();
    }
    let base = find(runs, BASELINE, 0.0).and_then(|b| b.throughput_bps);
    let rows: Vec<Vec<String>> = modes
        .iter()
        .map(|mode| bulk_row(mode, find(runs, mode, 0.0), base))
        .collect();
    table(
        "Throughput",
        &["mode", "MB/s", "Gbit/s", "vs direct"],
        &rows,
    )
}

/// One throughput row; "vs direct" is blank for direct itself.
fn bulk_row(mode: &str, run: Option<&RunResult>, base: Option<f64>) -> Vec<String> {
    let bps = run.and_then(|r| r.throughput_bps);
    let vs = if mode == BASELINE {
        String::new()
    } else {
        percent_of(bps, base)
    };
    let mb = num(bps.map(|b| b / 1e6), 1);
    vec![cell(mode), mb, num(bps.map(|b| b * 8.0 / 1e9), 2), vs]
}

/// Proxy memory by pod count, with the node proxy's share of what the
/// sidecars need: the ratio is the headline of a sidecarless design.
/// The repeated pinned ping-pong: each run's p50 and, per mode, the
/// added p50 of each run against direct's run of the same index, with
/// their spread (how much one number in the tables above can move).
fn repeats_section(report: &Report) -> String {
    let runs = &report.repeats;
    let modes = ordered(&MODES, runs.iter().map(|r| r.mode.as_str()));
    let of = |mode: &str| -> Vec<&RunResult> { runs.iter().filter(|r| r.mode == mode).collect() };
    let base = of(BASELINE);
    let count = modes.iter().map(|m| of(m).len()).max().unwrap_or(0);
    let mut rows = Vec::new();
    for mode in &modes {
        let mine = of(mode);
        let p50s: Vec<String> = (0..count)
            .map(|i| num(mine.get(i).and_then(|r| r.p50_us), 0))
            .collect();
        let mut added: Vec<f64> = mine
            .iter()
            .zip(&base)
            .filter_map(|(r, b)| Some(r.p50_us? - b.p50_us?))
            .collect();
        added.sort_by(f64::total_cmp);
        let (median, spread) = if *mode == BASELINE || added.is_empty() {
            (String::new(), String::new())
        } else {
            let median = added[added.len() / 2];
            let spread = added[added.len() - 1] - added[0];
            (format!("{median:+.0}"), format!("{spread:.0}"))
        };
        let mut row = vec![cell(mode)];
        row.extend(p50s);
        row.push(median);
        row.push(spread);
        rows.push(row);
    }
    let run_labels: Vec<String> = (1..=count).map(|i| format!("run {i} p50 µs")).collect();
    let mut header = vec!["mode"];
    header.extend(run_labels.iter().map(String::as_str));
    header.extend(["added p50 µs (median)", "spread µs (max − min)"]);
    let rate = runs.first().map_or(String::new(), |r| rate_label(r.rate));
    let table = table(
        &format!("Pinned 100-byte ping-pong at {rate} req/s, run again"),
        &header,
        &rows,
    );
    if table.is_empty() {
        table
    } else {
        format!("## Run-to-run spread\n\n{table}")
    }
}

fn memory_section(report: &Report) -> String {
    let points = &report.memory;
    let modes = ordered(&MODES, points.iter().map(|p| p.mode.as_str()));
    let rows: Vec<Vec<String>> = pod_counts(points)
        .into_iter()
        .map(|pods| memory_row(points, &modes, pods))
        .collect();
    let mut header = vec!["pods"];
    header.extend(modes.iter().copied());
    header.push("node's eBPF maps");
    header.push("node / sidecar");
    let table = table("Total proxy memory, PSS (MiB)", &header, &rows);
    if table.is_empty() {
        table
    } else {
        format!("## Memory\n\n{table}")
    }
}

/// One pod count: MiB per mode, then node over sidecar (missing
/// without both, or with a zero sidecar total).
fn memory_row(points: &[MemoryPoint], modes: &[&str], pods: u32) -> Vec<String> {
    let mut row = vec![pods.to_string()];
    row.extend(
        modes
            .iter()
            .map(|mode| num(memory_mib(points, mode, pods), 1)),
    );
    let maps = points
        .iter()
        .find(|p| p.mode == "node" && p.pods == pods && p.bpf_map_bytes > 0)
        .map(|p| p.bpf_map_bytes as f64 / MIB);
    row.push(num(maps, 1));
    let (node, sidecar) = (
        memory_mib(points, "node", pods),
        memory_mib(points, "sidecar", pods),
    );
    let ratio = node.zip(sidecar.filter(|s| *s > 0.0)).map(|(n, s)| n / s);
    row.push(num(ratio, 2));
    row
}

/// The distinct pod counts measured, ascending (1, 8, 32, 64 in a full
/// run; whatever `--quick` used otherwise).
fn pod_counts(points: &[MemoryPoint]) -> Vec<u32> {
    let mut pods: Vec<u32> = points.iter().map(|p| p.pods).collect();
    pods.sort_unstable();
    pods.dedup();
    pods
}

/// Total proxy memory of `mode` with `pods` pods, in MiB (first point
/// wins): PSS, or RSS in reports from before PSS was measured.
fn memory_mib(points: &[MemoryPoint], mode: &str, pods: u32) -> Option<f64> {
    let point = points.iter().find(|p| p.mode == mode && p.pods == pods)?;
    Some(point_bytes(point) as f64 / MIB)
}

fn point_bytes(point: &MemoryPoint) -> u64 {
    if point.proxy_pss_bytes > 0 {
        point.proxy_pss_bytes
    } else {
        point.proxy_rss_bytes
    }
}

/// `n failed`, by kind when any did: `3 failed (reset: 2, timeout: 1)`.
fn failures(n: u64, kinds: &BTreeMap<String, u64>) -> String {
    if n == 0 || kinds.is_empty() {
        return format!("{n} failed");
    }
    let kinds: Vec<String> = kinds
        .iter()
        .map(|(k, v)| format!("{}: {v}", cell(k)))
        .collect();
    format!("{n} failed ({})", kinds.join(", "))
}

/// The agent's memory through the bursts and the soak: each reading in
/// MiB and against the baseline, then the soak's summary.
fn churn_section(churn: &Churn) -> String {
    let mib = |bytes: u64| bytes as f64 / MIB;
    let base = Some(mib(churn.baseline_rss_bytes));
    let row = |label: String, bytes: u64, fds: Option<u64>| {
        let value = Some(mib(bytes));
        let fds = fds.map_or(MISSING.to_string(), |n| n.to_string());
        vec![label, num(value, 1), added(value, base), fds]
    };
    let mut rows = vec![
        row(
            "baseline (warmed up, idle)".into(),
            churn.baseline_rss_bytes,
            Some(churn.baseline_fds),
        ),
        row("peak during the bursts".into(), churn.peak_rss_bytes, None),
    ];
    for (i, &bytes) in churn.after_burst_rss_bytes.iter().enumerate() {
        rows.push(row(
            format!("{} s after burst {}", churn.gap_s, i + 1),
            bytes,
            churn.after_burst_fds.get(i).copied(),
        ));
    }
    rows.push(row(
        format!("{} s after the last burst", churn.settle_s),
        churn.settled_rss_bytes,
        Some(churn.settled_fds),
    ));
    let soak = &churn.soak;
    let fds = |sample: Option<&RssSample>| sample.map(|s| s.fds);
    rows.push(row(
        "soak: start".into(),
        soak.start_rss_bytes,
        fds(soak.samples.first()),
    ));
    rows.push(row("soak: max".into(), soak.max_rss_bytes, None));
    rows.push(row(
        "soak: end".into(),
        soak.end_rss_bytes,
        fds(soak.samples.last()),
    ));
    rows.push(row(
        format!("{} s after the soak", churn.settle_s),
        soak.settled_rss_bytes,
        Some(soak.settled_fds),
    ));
    let bursts = table(
        "Agent RSS (MiB) and open descriptors",
        &["when", "RSS", "vs baseline", "descriptors"],
        &rows,
    );
    let growth = Some(mib(soak.end_rss_bytes) - mib(soak.start_rss_bytes));
    format!(
        "## Memory under churn ({mode} mode)\n\n\
         {bursts_n} bursts of {conns} concurrent HTTP/1.1 keep-alive connections, {reqs} requests each, \
         then closed ({opened} connections, {done} requests completed, {failed}); then a {soak_s} s \
         soak: rounds of {round} connections {pause} s apart, the config rewritten every {every} s \
         ({writes} versions, {applied} applied, {rejected} rejected) with endpoints, services and pods \
         added and removed ({soak_conns} connections, {soak_done} requests completed, {soak_failed}).\n\n\
         {bursts}**Soak:** growth end − start {growth} MiB, trend over its second half {trend} MiB per 10 min, \
         {samples} samples in `report.json`.\n\n",
        mode = text(&churn.mode),
        bursts_n = churn.bursts,
        conns = churn.burst_connections,
        reqs = churn.requests_per_connection,
        opened = churn.burst_connections_opened,
        done = churn.burst_completed,
        failed = failures(churn.burst_errors, &churn.burst_error_kinds),
        soak_s = soak.duration_s,
        round = soak.connections_per_round,
        every = soak.reconfigure_interval_s,
        writes = soak.config_writes,
        applied = soak.config_reloads,
        rejected = soak.config_rejected,
        soak_conns = soak.connections,
        soak_done = soak.completed,
        soak_failed = failures(soak.errors, &soak.error_kinds),
        pause = soak.pause_s,
        growth = added(growth, Some(0.0)),
        trend = added(Some(soak.trend_bytes_per_min * 10.0 / MIB), Some(0.0)),
        samples = soak.samples.len(),
    )
}

// ---------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------

/// Canvas size; the `viewBox` lets viewers scale it.
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
/// Plot area: room on the left for tick labels, above for the title and
/// the legend, below for the category labels and the x axis title.
const LEFT: f64 = 70.0;
const RIGHT: f64 = 700.0;
const TOP: f64 = 80.0;
const BOTTOM: f64 = 345.0;
/// Colours for modes other than the four known ones, picked by a stable
/// hash of the name so that a mode keeps its colour across charts.
const EXTRA_COLOURS: [&str; 4] = ["#76b7b2", "#edc948", "#b07aa1", "#9c755f"];

/// Fixed colours per mode, so that every chart reads the same way.
fn colour(mode: &str) -> &'static str {
    match mode {
        "direct" => "#4e79a7",
        "node" => "#59a14f",
        "node-fast" => "#76b7b2",
        "sidecar" => "#e15759",
        "haproxy" => "#f28e2b",
        other => {
            let hash = other.bytes().fold(0usize, |h, b| {
                h.wrapping_mul(31).wrapping_add(usize::from(b))
            });
            EXTRA_COLOURS[hash % EXTRA_COLOURS.len()]
        }
    }
}

/// Report strings (mode names, titles) are data: escape them for XML.
fn xml_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The root element, a white background (charts are also viewed on dark
/// pages) and the title. A generic font family: no external fonts.
fn svg_open(title: &str) -> String {
    let title = xml_escape(title);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" \
         height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n<title>{title}</title>\n\
         <path d=\"M0 0H{WIDTH}V{HEIGHT}H0Z\" fill=\"#ffffff\"/>\n\
         <text x=\"{:.1}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">{title}</text>\n",
        WIDTH / 2.0
    )
}

/// The top of the y axis: 10 % headroom over the largest value, so the
/// tallest bar or point does not touch the title area.
fn axis_top(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.1
    } else {
        1.0
    }
}

/// The smallest "nice" step (1, 2, 2.5 or 5 times a power of ten) that
/// keeps the tick count, zero included, at most 6. Consecutive candidates
/// at most double, so the count never drops below 4.
fn tick_step(top: f64) -> f64 {
    let magnitude = 10f64.powf((top / 6.0).log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|step| top / step < 6.0)
        .unwrap_or(10.0 * magnitude)
}

/// Decimals a tick label needs to show `step` exactly (2.5 needs one).
fn tick_decimals(step: f64) -> usize {
    (0..6u8)
        .find(|d| {
            let scaled = step * 10f64.powi(i32::from(*d));
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .map_or(6, usize::from)
}

/// Tick values from 0 up to `top`, and the decimals their labels need.
fn ticks(top: f64) -> (Vec<f64>, usize) {
    let step = tick_step(top);
    let values = (0..=6)
        .map(|i| f64::from(i) * step)
        .take_while(|v| *v <= top * (1.0 + 1e-9))
        .collect();
    (values, tick_decimals(step))
}

/// Vertical position of `value` on an axis from 0 to `top`; values
/// outside are clamped to the plot area rather than drawn outside it.
fn y_pos(value: f64, top: f64) -> f64 {
    BOTTOM - (value / top).clamp(0.0, 1.0) * (BOTTOM - TOP)
}

/// Grid lines with labels, the axes, and the rotated unit label.
fn y_axis(top: f64, unit: &str) -> String {
    let (values, decimals) = ticks(top);
    let mut out = String::new();
    for value in values {
        let y = y_pos(value, top);
        out.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{RIGHT}\" y2=\"{y:.1}\" stroke=\"#dddddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{value:.decimals$}</text>\n",
            LEFT - 8.0,
            y + 4.0
        ));
    }
    let middle = (TOP + BOTTOM) / 2.0;
    out.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{BOTTOM}\" stroke=\"#333333\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{BOTTOM}\" x2=\"{RIGHT}\" y2=\"{BOTTOM}\" stroke=\"#333333\"/>\n\
         <text x=\"20\" y=\"{middle:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {middle:.1})\">{}</text>\n",
        xml_escape(unit)
    ));
    out
}

/// Centre of category `index` of `count` evenly spaced ones.
fn x_centre(index: usize, count: usize) -> f64 {
    LEFT + (index as f64 + 0.5) * (RIGHT - LEFT) / count.max(1) as f64
}

/// Category labels under the x axis, and the axis title if any.
fn x_labels(labels: &[String], title: &str) -> String {
    let mut out = String::new();
    for (i, label) in labels.iter().enumerate() {
        let x = x_centre(i, labels.len());
        let label = xml_escape(label);
        out.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
            BOTTOM + 20.0
        ));
    }
    if !title.is_empty() {
        let (x, y) = ((LEFT + RIGHT) / 2.0, BOTTOM + 42.0);
        out.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\">{}</text>\n",
            xml_escape(title)
        ));
    }
    out
}

/// A legend swatch at `(x, y)` (its left end, vertically centred).
type Swatch = fn(f64, f64, &str) -> String;

/// A filled square, for bars. A path, not a rect: `<rect>` is one bar.
fn square_swatch(x: f64, y: f64, colour: &str) -> String {
    format!(
        "<path d=\"M{x:.1} {:.1}h10v10h-10Z\" fill=\"{colour}\"/>\n",
        y - 5.0
    )
}

/// A short line with a marker, for line charts.
fn line_swatch(x: f64, y: f64, colour: &str) -> String {
    format!(
        "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{colour}\" stroke-width=\"2\"/>\n\
         <circle cx=\"{:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{colour}\"/>\n",
        x + 12.0,
        x + 6.0
    )
}

/// One row of legend entries under the title; text width is estimated
/// (about 7 px per character at 12 px) since there is no font metric.
fn legend(modes: &[&str], swatch: Swatch) -> String {
    let (mut x, y) = (LEFT, 52.0);
    let mut out = String::new();
    for mode in modes {
        out.push_str(&swatch(x, y, colour(mode)));
        let name = xml_escape(mode);
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{name}</text>\n",
            x + 16.0,
            y + 4.0
        ));
        x += 16.0 + 7.0 * mode.chars().count() as f64 + 20.0;
    }
    out
}

/// Grouped bars of latency percentiles per mode for one workload, pinning
/// and rate (closed loop: rate 0). None when no run matches or none has a
/// latency. The axis is linear from 0: the point is how much each proxy
/// adds, which a log scale would hide.
pub fn latency_svg(report: &Report, workload: &str, pinning: &str, rate: f64) -> Option<String> {
    let runs = chart_runs(report, workload, pinning, rate);
    let values = runs
        .iter()
        .flat_map(|r| PERCENTILES.iter().filter_map(|(_, get)| get(r)));
    let max = values.filter(|v| v.is_finite()).reduce(f64::max)?;
    let top = axis_top(max);
    let what = if rate > 0.0 {
        format!("{} req/s", rate_label(rate))
    } else {
        "max rate".to_string()
    };
    let mut svg = svg_open(&format!("{workload}, {pinning}, {what}: latency"));
    svg.push_str(&y_axis(top, "µs"));
    let labels: Vec<String> = PERCENTILES
        .iter()
        .map(|(label, _)| label.to_string())
        .collect();
    svg.push_str(&x_labels(&labels, ""));
    svg.push_str(&bars(&runs, top));
    let modes: Vec<&str> = runs.iter().map(|r| r.mode.as_str()).collect();
    svg.push_str(&legend(&modes, square_swatch));
    svg.push_str("</svg>");
    Some(svg)
}

/// The runs a latency chart shows: one per mode, in mode order.
fn chart_runs<'a>(
    report: &'a Report,
    workload: &str,
    pinning: &str,
    rate: f64,
) -> Vec<&'a RunResult> {
    let runs = group(report, workload, pinning);
    let modes = ordered(&MODES, runs.iter().map(|r| r.mode.as_str()));
    modes
        .iter()
        .filter_map(|mode| find(&runs, mode, rate))
        .collect()
}

/// One `<rect>` per measured (run, percentile), grouped by percentile; a
/// missing value leaves a gap in its group. Each bar has a tooltip.
fn bars(runs: &[&RunResult], top: f64) -> String {
    let group_width = (RIGHT - LEFT) / PERCENTILES.len() as f64;
    let bar_width = group_width * 0.8 / runs.len().max(1) as f64;
    let mut out = String::new();
    for (g, (label, get)) in PERCENTILES.iter().enumerate() {
        for (m, run) in runs.iter().enumerate() {
            let Some(value) = get(run).filter(|v| v.is_finite()) else {
                continue;
            };
            let x = LEFT + g as f64 * group_width + group_width * 0.1 + m as f64 * bar_width;
            let y = y_pos(value, top);
            out.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                 <title>{} {label}: {value:.1} µs</title></rect>\n",
                bar_width * 0.9,
                BOTTOM - y,
                colour(&run.mode),
                xml_escape(&run.mode)
            ));
        }
    }
    out
}

/// Total proxy memory against pods, one line per mode. Pod counts are
/// evenly spaced categories, not a linear axis: 1 and 8 would otherwise
/// overlap next to 64. None when the report has no memory points.
pub fn memory_svg(report: &Report) -> Option<String> {
    let points = &report.memory;
    let max = points
        .iter()
        .map(|p| point_bytes(p) as f64 / MIB)
        .reduce(f64::max)?;
    let top = axis_top(max);
    let modes = ordered(&MODES, points.iter().map(|p| p.mode.as_str()));
    let pods = pod_counts(points);
    let mut svg = svg_open("Total proxy memory (PSS) vs pods");
    svg.push_str(&y_axis(top, "MiB"));
    let labels: Vec<String> = pods.iter().map(u32::to_string).collect();
    svg.push_str(&x_labels(&labels, "pods"));
    for mode in &modes {
        svg.push_str(&series(points, mode, &pods, top));
    }
    svg.push_str(&legend(&modes, line_swatch));
    svg.push_str("</svg>");
    Some(svg)
}

/// One mode's line and markers. A pod count without a point breaks the
/// line instead of joining its neighbours across the gap.
fn series(points: &[MemoryPoint], mode: &str, pods: &[u32], top: f64) -> String {
    let (colour, name) = (colour(mode), xml_escape(mode));
    let (mut path, mut markers, mut drawing) = (String::new(), String::new(), false);
    for (i, count) in pods.iter().enumerate() {
        let Some(mib) = memory_mib(points, mode, *count) else {
            drawing = false;
            continue;
        };
        let (x, y) = (x_centre(i, pods.len()), y_pos(mib, top));
        path.push_str(&format!("{}{x:.1} {y:.1}", if drawing { "L" } else { "M" }));
        drawing = true;
        markers.push_str(&format!(
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{colour}\">\
             <title>{name}, {count} pods: {mib:.1} MiB</title></circle>\n"
        ));
    }
    format!("<path d=\"{path}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>\n{markers}")
}

#[cfg(test)]
mod tests {
    use super::super::report::{Machine, Soak};
    use super::*;

    fn run(mode: &str, workload: &str, pinning: &str, rate: f64) -> RunResult {
        RunResult {
            mode: mode.into(),
            workload: workload.into(),
            pinning: pinning.into(),
            rate,
            completed: 1000,
            ..RunResult::default()
        }
    }

    /// An open-loop run with p50/p90/p99/p99.9 and proxy CPU.
    fn latency(mode: &str, pinning: &str, rate: f64, p: [f64; 4], cpu: Option<f64>) -> RunResult {
        RunResult {
            p50_us: Some(p[0]),
            p90_us: Some(p[1]),
            p99_us: Some(p[2]),
            p999_us: Some(p[3]),
            rps: rate,
            cpu_s_per_1k_req: cpu,
            ..run(mode, "tcp-rr", pinning, rate)
        }
    }

    fn max_rate(mode: &str, rps: f64) -> RunResult {
        RunResult {
            rps,
            p50_us: Some(10.0),
            ..run(mode, "tcp-rr", "pinned", 0.0)
        }
    }

    fn bulk(mode: &str, bps: f64) -> RunResult {
        RunResult {
            throughput_bps: Some(bps),
            ..run(mode, "bulk", "unpinned", 0.0)
        }
    }

    fn memory(mode: &str, pods: u32, mib: u64) -> MemoryPoint {
        let proxies = if mode == "node" { 1 } else { pods };
        MemoryPoint {
            mode: mode.into(),
            pods,
            proxies,
            // RSS counts the shared binary in every sidecar; PSS once.
            proxy_rss_bytes: (mib + u64::from(proxies)) << 20,
            proxy_pss_bytes: mib << 20,
            bpf_map_bytes: if mode == "node" { 3 << 20 } else { 0 },
        }
    }

    fn repeat(mode: &str, p50: f64) -> RunResult {
        RunResult {
            p50_us: Some(p50),
            ..run(mode, "tcp-rr", "pinned", 1000.0)
        }
    }

    fn machine() -> Machine {
        Machine {
            cpus: 2,
            cpu_model: "Test CPU @ 3.0GHz".into(),
            memory_bytes: 8 << 30,
            kernel: "6.8.0-test".into(),
        }
    }

    /// Deliberately out of order, so the tests see the renderer sort.
    fn sample() -> Report {
        Report {
            machine: machine(),
            commit: "abc1234-dirty".into(),
            generated_at: "2026-01-02T03:04:05Z".into(),
            quick: false,
            results: vec![
                bulk("node", 1.5e9),
                latency(
                    "haproxy",
                    "pinned",
                    1000.0,
                    [60.0, 70.0, 110.0, 300.0],
                    Some(0.09),
                ),
                latency(
                    "node",
                    "pinned",
                    1000.0,
                    [32.5, 35.0, 60.0, 150.0],
                    Some(0.045),
                ),
                latency("direct", "pinned", 1000.0, [20.0, 25.0, 40.0, 80.0], None),
                latency(
                    "sidecar",
                    "pinned",
                    1000.0,
                    [45.0, 50.0, 90.0, 200.0],
                    Some(0.08),
                ),
                latency("direct", "pinned", 5000.0, [21.0, 26.0, 41.0, 81.0], None),
                latency("direct", "unpinned", 1000.0, [18.0, 22.0, 35.0, 70.0], None),
                max_rate("node", 40000.0),
                max_rate("direct", 50000.0),
                bulk("direct", 2e9),
            ],
            memory: vec![
                memory("sidecar", 8, 160),
                memory("node", 1, 10),
                memory("sidecar", 1, 20),
                memory("node", 8, 16),
                memory("haproxy", 1, 8),
            ],
            repeats: vec![
                repeat("node", 40.0),
                repeat("direct", 20.0),
                repeat("node", 35.0),
                repeat("direct", 22.0),
                repeat("node", 31.0),
                repeat("direct", 19.0),
            ],
            churn: None,
            discovery: None,
        }
    }

    fn position(haystack: &str, needle: &str) -> usize {
        haystack
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{haystack}"))
    }

    #[test]
    fn header_names_machine_commit_date_and_quick() {
        let md = markdown(&sample());
        let line = "**Machine:** 2 CPUs, Test CPU @ 3.0GHz, 8.0 GiB, kernel 6.8.0-test · \
                    **commit** `abc1234-dirty` · **date** 2026-01-02T03:04:05Z · **`--quick`:** no";
        assert!(md.contains(line), "{md}");
        assert!(!md.contains("not meaningful"));
        let quick = markdown(&Report {
            quick: true,
            ..sample()
        });
        assert!(quick.contains("**`--quick`:** yes") && quick.contains("not meaningful"));
    }

    #[test]
    fn latency_rows_show_percentiles_added_latency_and_cpu() {
        let md = markdown(&sample());
        // Added p50 32.5 - 20 and p99 60 - 40; CPU 0.045 s = 45 ms per 1k.
        let node = "| node | 1000 | 32.5 | 35.0 | 60.0 | 150.0 | +12.5 | +20.0 | 45.0 |";
        assert!(md.contains(node), "{md}");
        // Direct: no added latency, no proxy CPU.
        assert!(
            md.contains("| direct | 1000 | 20.0 | 25.0 | 40.0 | 80.0 |  |  | – |"),
            "{md}"
        );
    }

    #[test]
    fn rows_are_in_mode_then_rate_order_with_gaps_shown() {
        let md = markdown(&sample());
        let rows = [
            "| direct | 1000 ",
            "| node | 1000 ",
            "| sidecar | 1000 ",
            "| haproxy | 1000 ",
            "| direct | 5000 ",
        ];
        let at: Vec<usize> = rows.iter().map(|row| position(&md, row)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{md}");
        // Only direct ran at 5000 req/s: the others show as missing.
        assert!(
            md.contains("| node | 5000 | – | – | – | – | – | – | – |"),
            "{md}"
        );
    }

    #[test]
    fn sections_follow_workload_then_pinning_order() {
        let md = markdown(&sample());
        let pinned = position(&md, "## tcp-rr, pinned");
        let unpinned = position(&md, "## tcp-rr, unpinned");
        let bulk = position(&md, "## bulk, unpinned");
        assert!(pinned < unpinned && unpinned < bulk && bulk < position(&md, "## Memory"));
        assert!(
            !md.contains("## bulk, pinned") && !md.contains("http-rr"),
            "{md}"
        );
    }

    #[test]
    fn max_rate_is_relative_to_direct() {
        let md = markdown(&sample());
        assert!(md.contains("| direct | 50000 |  | – |"), "{md}");
        assert!(md.contains("| node | 40000 | 80.0 % | – |"), "{md}");
        // No closed-loop run in the unpinned section: no such table there.
        let unpinned = &md[position(&md, "## tcp-rr, unpinned")..position(&md, "## bulk")];
        assert!(!unpinned.contains("Maximum rate"), "{unpinned}");
    }

    #[test]
    fn bulk_shows_throughput_and_share_of_direct() {
        let md = markdown(&sample());
        assert!(md.contains("| direct | 2000.0 | 16.00 |  |"), "{md}");
        assert!(md.contains("| node | 1500.0 | 12.00 | 75.0 % |"), "{md}");
        let bulk = &md[position(&md, "## bulk")..];
        assert!(
            !bulk.contains("Latency") && !bulk.contains("Maximum rate"),
            "{bulk}"
        );
    }

    #[test]
    fn memory_table_has_mode_columns_and_node_to_sidecar_ratio() {
        let md = markdown(&sample());
        assert!(
            md.contains("| pods | node | sidecar | haproxy | node's eBPF maps | node / sidecar |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | 10.0 | 20.0 | 8.0 | 3.0 | 0.50 |"),
            "{md}"
        );
        assert!(md.contains("| 8 | 16.0 | 160.0 | – | 3.0 | 0.10 |"), "{md}");
        assert!(md.contains("Total proxy memory, PSS (MiB)"), "{md}");
    }

    #[test]
    fn memory_falls_back_to_rss_for_reports_without_pss() {
        let mut report = sample();
        for point in &mut report.memory {
            point.proxy_pss_bytes = 0;
        }
        let md = markdown(&report);
        assert!(
            md.contains("| 1 | 11.0 | 21.0 | 9.0 | 3.0 | 0.52 |"),
            "{md}"
        );
    }

    #[test]
    fn repeats_show_each_run_and_the_spread_of_added_p50() {
        let md = markdown(&sample());
        assert!(md.contains("## Run-to-run spread"), "{md}");
        assert!(md.contains("at 1000 req/s, run again"), "{md}");
        // Added per run: 20, 13, 12 -> median 13, spread 8.
        assert!(md.contains("| node | 40 | 35 | 31 | +13 | 8 |"), "{md}");
        assert!(md.contains("| direct | 20 | 22 | 19 |  |  |"), "{md}");
    }

    #[test]
    fn empty_report_has_a_header_and_no_tables() {
        let md = markdown(&Report::default());
        assert!(md.starts_with("# Data plane benchmark"));
        assert!(md.contains("– CPUs, –, – GiB, kernel –"), "{md}");
        assert!(!md.contains('|') && !md.contains("##"), "{md}");
        assert!(latency_svg(&Report::default(), "tcp-rr", "pinned", 1000.0).is_none());
        assert!(memory_svg(&Report::default()).is_none());
    }

    #[test]
    fn table_cells_escape_pipes() {
        let mut report = sample();
        report.results.push(max_rate("a|b", 1.0));
        assert!(markdown(&report).contains("| a\\|b | 1 |"));
    }

    #[test]
    fn latency_svg_has_one_bar_per_value_and_a_legend() {
        let mut report = sample();
        // A missing percentile is a missing bar, not a zero-height one.
        report.results[1].p999_us = None;
        let svg = latency_svg(&report, "tcp-rr", "pinned", 1000.0).unwrap_or_default();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 4 * 4 - 1, "{svg}");
        assert_eq!(svg.matches("</rect>").count(), 4 * 4 - 1);
        assert!(svg.contains("tcp-rr, pinned, 1000 req/s: latency"));
        // The sample's modes (it has no node-fast run).
        for mode in ["direct", "node", "sidecar", "haproxy"] {
            assert!(svg.contains(&format!(">{mode}</text>")), "{mode}: {svg}");
            assert!(svg.contains(colour(mode)));
        }
        for label in ["p50", "p90", "p99", "p99.9"] {
            assert!(svg.contains(&format!(">{label}</text>")));
        }
    }

    #[test]
    fn latency_svg_matches_workload_pinning_and_rate() {
        let report = sample();
        let svg = latency_svg(&report, "tcp-rr", "pinned", 5000.0).unwrap_or_default();
        assert_eq!(svg.matches("<rect").count(), 4, "{svg}");
        let max = latency_svg(&report, "tcp-rr", "pinned", 0.0).unwrap_or_default();
        assert!(max.contains("max rate: latency") && max.matches("<rect").count() == 2);
        assert!(latency_svg(&report, "tcp-rr", "pinned", 2000.0).is_none());
        assert!(latency_svg(&report, "http-rr", "pinned", 1000.0).is_none());
        assert!(latency_svg(&report, "tcp-rr", "pinned", f64::INFINITY).is_none());
        // Bulk runs have no latency at all.
        assert!(latency_svg(&report, "bulk", "unpinned", 0.0).is_none());
    }

    #[test]
    fn latency_svg_axis_covers_the_largest_value() {
        let svg = latency_svg(&sample(), "tcp-rr", "pinned", 1000.0).unwrap_or_default();
        // Max 300 µs, axis to 330: steps of 50 up to 300.
        assert!(
            svg.contains(">300</text>") && !svg.contains(">350</text>"),
            "{svg}"
        );
        assert!(svg.contains(">µs</text>"));
    }

    #[test]
    fn svg_text_is_xml_escaped() {
        let mut report = sample();
        report.results.push(max_rate("<a&b>", 1.0));
        report.memory.push(memory("\"q\"", 1, 1));
        let svg = latency_svg(&report, "tcp-rr", "pinned", 0.0).unwrap_or_default();
        assert!(
            svg.contains("&lt;a&amp;b&gt;") && !svg.contains("<a&b>"),
            "{svg}"
        );
        let svg = memory_svg(&report).unwrap_or_default();
        assert!(
            svg.contains("&quot;q&quot;") && !svg.contains("\"q\""),
            "{svg}"
        );
        assert_eq!(xml_escape("a'b"), "a&apos;b");
    }

    #[test]
    fn memory_svg_draws_a_line_and_markers_per_mode() {
        let svg = memory_svg(&sample()).unwrap_or_default();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("Total proxy memory (PSS) vs pods") && svg.contains(">MiB</text>"));
        // Five points as markers; the legend adds one marker per mode.
        assert_eq!(svg.matches("<circle").count(), 5 + 3, "{svg}");
        for mode in ["node", "sidecar", "haproxy"] {
            assert!(svg.contains(&format!(">{mode}</text>")), "{mode}");
        }
        assert!(
            svg.contains(">1</text>") && svg.contains(">8</text>") && svg.contains(">pods</text>")
        );
    }

    #[test]
    fn memory_svg_breaks_lines_at_missing_points() {
        let mut report = sample();
        report.memory = vec![
            memory("node", 1, 1),
            memory("node", 64, 1),
            memory("sidecar", 8, 1),
        ];
        let svg = memory_svg(&report).unwrap_or_default();
        let node = colour("node");
        let line = svg
            .lines()
            .find(|l| l.starts_with("<path") && l.contains(node))
            .unwrap_or_default();
        assert_eq!(line.matches('M').count(), 2, "{line}");
        assert!(!line.contains('L'), "{line}");
    }

    #[test]
    fn ticks_are_nice_and_four_to_six() {
        let mut top = 0.013;
        while top < 1e7 {
            let (values, decimals) = ticks(top);
            assert!((4..=6).contains(&values.len()), "{top}: {values:?}");
            assert!(
                values.iter().all(|v| *v <= top * (1.0 + 1e-9)),
                "{top}: {values:?}"
            );
            let step = values[1];
            let mantissa = step / 10f64.powf(step.log10().floor());
            let nice = [1.0, 2.0, 2.5, 5.0]
                .iter()
                .any(|m| (m - mantissa).abs() < 1e-9);
            assert!(nice, "{top}: step {step}");
            assert_eq!(
                format!("{:.decimals$}", step).parse::<f64>().ok(),
                Some(step),
                "{top}"
            );
            top *= 1.07;
        }
    }

    #[test]
    fn rendering_is_deterministic_and_survives_json() {
        let report = sample();
        let json = serde_json::to_string(&report).unwrap_or_default();
        let back: Report = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(markdown(&report), markdown(&back));
        assert_eq!(memory_svg(&report), memory_svg(&back));
        let svg = |r: &Report| latency_svg(r, "tcp-rr", "pinned", 1000.0);
        assert_eq!(svg(&report), svg(&back));
        assert!(svg(&report).is_some());
    }

    #[test]
    fn number_formatting_handles_missing_and_bad_values() {
        assert_eq!(num(None, 1), "–");
        assert_eq!(num(Some(f64::NAN), 1), "–");
        assert_eq!(added(Some(20.01), Some(20.0)), "+0.0");
        assert_eq!(added(Some(19.0), Some(20.0)), "-1.0");
        assert_eq!(added(Some(1.0), None), "–");
        assert_eq!(percent_of(Some(1.0), Some(0.0)), "–");
        assert_eq!(rate_label(2500.0), "2500");
        assert_eq!(rate_label(0.5), "0.5");
    }

    fn churn() -> Churn {
        let m = 1 << 20;
        Churn {
            mode: "node".into(),
            bursts: 2,
            burst_connections: 1000,
            requests_per_connection: 3,
            baseline_rss_bytes: 10 * m,
            baseline_fds: 40,
            peak_rss_bytes: 40 * m,
            after_burst_rss_bytes: vec![12 * m, 11 * m],
            after_burst_fds: vec![300, 200],
            gap_s: 2.0,
            settled_rss_bytes: 10 * m,
            settled_fds: 40,
            settle_s: 30.0,
            burst_connections_opened: 2000,
            burst_completed: 6000,
            burst_error_kinds: BTreeMap::from([("reset".to_string(), 2), ("timeout".into(), 1)]),
            burst_errors: 3,
            soak: Soak {
                duration_s: 600.0,
                connections_per_round: 100,
                pause_s: 0.5,
                reconfigure_interval_s: 3.0,
                config_writes: 200,
                config_reloads: 200,
                start_rss_bytes: 12 * m,
                max_rss_bytes: 14 * m,
                end_rss_bytes: 13 * m,
                trend_bytes_per_min: 0.05 * m as f64,
                settled_rss_bytes: 11 * m,
                ..Soak::default()
            },
        }
    }

    #[test]
    fn churn_section_shows_each_reading_against_the_baseline() {
        let md = markdown(&Report {
            churn: Some(churn()),
            ..Report::default()
        });
        assert!(md.contains("## Memory under churn (node mode)"), "{md}");
        assert!(
            md.contains("6000 requests completed, 3 failed (reset: 2, timeout: 1))"),
            "{md}"
        );
        assert!(md.contains("rounds of 100 connections 0.5 s apart"), "{md}");
        assert!(
            md.contains("| baseline (warmed up, idle) | 10.0 | +0.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| peak during the bursts | 40.0 | +30.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| 2 s after burst 2 | 11.0 | +1.0 | 200 |"),
            "{md}"
        );
        assert!(
            md.contains("| 30 s after the last burst | 10.0 | +0.0 |"),
            "{md}"
        );
        assert!(md.contains("| soak: end | 13.0 | +3.0 |"), "{md}");
        assert!(md.contains("growth end − start +1.0 MiB"), "{md}");
        assert!(
            md.contains("trend over its second half +0.5 MiB per 10 min"),
            "{md}"
        );
        assert!(!markdown(&Report::default()).contains("churn"));
    }
}
