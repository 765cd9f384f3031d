//! Agent memory under churn (node mode): does the node proxy give memory
//! back once connections are gone, and does it stay flat while
//! connections, endpoints, services and pods come and go?
//!
//! One simulated node: a client pod, four backend pods serving HTTP, six
//! spare pods, and the agent. Four HTTP services (`web-0..3`) carry the
//! traffic; the config also holds 40 to 120 services without traffic.
//!
//! 1. Baseline: the agent's RSS once started and warmed up by a small
//!    burst.
//! 2. Bursts: `benchtool burst` in the client pod opens `connections`
//!    keep-alive connections at once over the four services, each makes
//!    a few requests, all close together. RSS is sampled during each
//!    burst (the peak), `gap` after it, and after a final `settle`.
//! 3. Soak: for `soak`, the client runs rounds of connections,
//!    `soak_pause` apart, while the config is rewritten every `reconfigure` with the
//!    traffic services' endpoints rotated, untrafficked services and
//!    their endpoints added and removed, spare pods enrolled and
//!    unenrolled, and pods that are not (yet) on the node coming and
//!    going; the agent reloads each version. RSS is sampled every
//!    `sample`, then once more after `settle` without traffic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use indicatif::ProgressBar;
use serde::Deserialize;

use super::report::{Churn, RssSample, Soak};
use super::sched::rss_bytes;
use crate::agent::Agent;
use crate::bench_peers::benchtool;
use crate::{Pod, Proc, SimNode, http_peers};

/// Services that carry the traffic, and the backends behind them.
const TRAFFIC_SERVICES: u8 = 4;
const BACKENDS: usize = 4;
/// Pods enrolled and unenrolled as the config changes.
const SPARE_PODS: usize = 6;
/// Requests on each connection before it closes.
const REQUESTS_PER_CONNECTION: u32 = 3;
/// The warm-up burst, before the baseline is read.
const WARMUP_CONNECTIONS: u32 = 20;
/// How often RSS is read while a burst runs (for the peak).
const PEAK_SAMPLE: Duration = Duration::from_millis(50);
/// Bound on each connect and request of `benchtool burst`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one round of `benchtool burst` may take by its own bounds:
/// a connect and every request, plus its slack.
const ROUND_BUDGET: Duration =
    Duration::from_secs(REQUEST_TIMEOUT.as_secs() * (REQUESTS_PER_CONNECTION as u64 + 1) + 5);
/// Time for `benchtool burst` to start and print, beyond its rounds.
const SLACK: Duration = Duration::from_secs(15);
/// The agent re-reads its config every 200 ms; this covers one reload.
const RELOAD: Duration = Duration::from_millis(500);

/// How much churn: see the module documentation.
#[derive(Debug, Clone)]
pub struct ChurnPlan {
    pub bursts: u32,
    pub burst_connections: u32,
    /// Pause after each burst before RSS is read.
    pub gap: Duration,
    /// Quiet time after the last burst, and after the soak.
    pub settle: Duration,
    pub soak: Duration,
    pub soak_connections: u32,
    /// Between the soak's rounds. Each connection leaves a TIME_WAIT
    /// socket in the client pod for a minute, and all of them share one
    /// destination (the proxy), so about 28 000 ephemeral ports allow
    /// some 470 new connections per second: the pause keeps the soak well
    /// below that.
    pub soak_pause: Duration,
    pub sample: Duration,
    pub reconfigure: Duration,
}

impl ChurnPlan {
    /// The full run (5 bursts of 1000, a 10-minute soak) or `--quick` (2
    /// bursts of 200, 15 s); `soak` overrides the soak's length.
    pub fn new(quick: bool, soak: Option<Duration>) -> ChurnPlan {
        let plan = match quick {
            false => ChurnPlan {
                bursts: 5,
                burst_connections: 1000,
                gap: Duration::from_secs(2),
                settle: Duration::from_secs(30),
                soak: Duration::from_secs(600),
                soak_connections: 100,
                soak_pause: Duration::from_millis(500),
                sample: Duration::from_secs(5),
                reconfigure: Duration::from_secs(3),
            },
            true => ChurnPlan {
                bursts: 2,
                burst_connections: 200,
                gap: Duration::from_secs(1),
                settle: Duration::from_secs(3),
                soak: Duration::from_secs(15),
                soak_connections: 50,
                soak_pause: Duration::from_millis(200),
                sample: Duration::from_secs(1),
                reconfigure: Duration::from_secs(2),
            },
        };
        ChurnPlan {
            soak: soak.unwrap_or(plan.soak),
            ..plan
        }
    }

    /// Steps for the progress bar: one per burst, one for the soak.
    pub fn steps(&self) -> u64 {
        u64::from(self.bursts) + 1
    }
}

/// Runs the plan on a fresh node.
pub fn measure(plan: &ChurnPlan, bar: &ProgressBar) -> anyhow::Result<Churn> {
    bar.set_message("churn: building the node");
    crate::proc::raise_fd_limit();
    let top = ChurnNode::build().context("churn topology")?;
    let result = run(&top, plan, bar);
    result.with_context(|| format!("agent log (tail):\n{}", tail(&top.agent.log(), 30)))
}

fn run(top: &ChurnNode, plan: &ChurnPlan, bar: &ProgressBar) -> anyhow::Result<Churn> {
    let pid = top.agent.pid().context("the agent is not running")?;
    let probe = Probe { pid };
    bar.set_message("churn: warm-up");
    top.burst(WARMUP_CONNECTIONS)?;
    std::thread::sleep(plan.gap);
    let (baseline, baseline_fds) = probe.read()?;
    let mut churn = Churn {
        mode: "node".into(),
        bursts: plan.bursts,
        burst_connections: plan.burst_connections,
        requests_per_connection: REQUESTS_PER_CONNECTION,
        baseline_rss_bytes: baseline,
        baseline_fds,
        peak_rss_bytes: baseline,
        gap_s: plan.gap.as_secs_f64(),
        settle_s: plan.settle.as_secs_f64(),
        ..Churn::default()
    };
    for i in 1..=plan.bursts {
        bar.set_message(format!(
            "churn: burst {i}/{} of {} connections",
            plan.bursts, plan.burst_connections
        ));
        let (report, peak) = sampling(pid, || top.burst(plan.burst_connections));
        let report = report?;
        churn.peak_rss_bytes = churn.peak_rss_bytes.max(peak);
        churn.burst_connections_opened += report.connections;
        churn.burst_completed += report.completed;
        churn.burst_errors += report.errors;
        add_kinds(&mut churn.burst_error_kinds, report.error_kinds);
        std::thread::sleep(plan.gap);
        let (rss, fds) = probe.read()?;
        churn.after_burst_rss_bytes.push(rss);
        churn.after_burst_fds.push(fds);
        bar.inc(1);
    }
    bar.set_message("churn: settling");
    std::thread::sleep(plan.settle);
    (churn.settled_rss_bytes, churn.settled_fds) = probe.read()?;
    churn.soak = soak(top, plan, bar, &probe)?;
    bar.inc(1);
    Ok(churn)
}

/// The soak: churn traffic in the background, config rewrites and RSS
/// samples in this thread, on a one-second tick.
fn soak(
    top: &ChurnNode,
    plan: &ChurnPlan,
    bar: &ProgressBar,
    probe: &Probe,
) -> anyhow::Result<Soak> {
    let tick = Duration::from_secs(1);
    let ticks = plan.soak.as_secs().max(1);
    let every = |d: Duration| d.as_secs().max(1);
    let before = top.reloads()?;
    let mut traffic = top.spawn_burst(plan)?;
    let start = Instant::now();
    let mut soak = Soak {
        duration_s: plan.soak.as_secs_f64(),
        connections_per_round: plan.soak_connections,
        pause_s: plan.soak_pause.as_secs_f64(),
        reconfigure_interval_s: plan.reconfigure.as_secs_f64(),
        samples: vec![probe.sample(0.0)?],
        ..Soak::default()
    };
    for t in 1..=ticks {
        let due = start + tick * u32::try_from(t).unwrap_or(u32::MAX);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if let Some(status) = traffic.try_wait()? {
            bail!("benchtool burst ended early ({status})");
        }
        if t.is_multiple_of(every(plan.reconfigure)) {
            soak.config_writes += 1;
            top.agent.write_config(&top.config(soak.config_writes))?;
        }
        if t.is_multiple_of(every(plan.sample)) || t == ticks {
            let sample = probe.sample(start.elapsed().as_secs_f64())?;
            soak.samples.push(sample);
            bar.set_message(format!(
                "churn: soak {t}/{ticks} s, agent RSS {:.1} MiB",
                sample.rss_bytes as f64 / f64::from(1 << 20)
            ));
        }
    }
    // No round starts after the soak; the last one may still be running.
    let report = parse_burst(traffic.output_timeout(ROUND_BUDGET + SLACK)?)?;
    soak.connections = report.connections;
    soak.completed = report.completed;
    soak.errors = report.errors;
    add_kinds(&mut soak.error_kinds, report.error_kinds);
    // The last version is read before the counts are taken.
    std::thread::sleep(RELOAD);
    let after = top.reloads()?;
    soak.config_reloads = after.0.saturating_sub(before.0);
    soak.config_rejected = after.1.saturating_sub(before.1);
    std::thread::sleep(plan.settle.saturating_sub(RELOAD));
    (soak.settled_rss_bytes, soak.settled_fds) = probe.read()?;
    soak.summarise();
    Ok(soak)
}

/// Reads the agent's resident memory and open descriptors (its sockets:
/// what it still holds tells retained memory from held connections).
struct Probe {
    pid: u32,
}

impl Probe {
    /// (VmRSS bytes, open descriptors).
    fn read(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.pid;
        let rss = rss_bytes(pid);
        ensure!(rss > 0, "the agent (pid {pid}) is gone");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing the agent's descriptors (pid {pid})"))?
            .count() as u64;
        Ok((rss, fds))
    }

    fn sample(&self, t_s: f64) -> anyhow::Result<RssSample> {
        let (rss_bytes, fds) = self.read()?;
        Ok(RssSample {
            t_s,
            rss_bytes,
            fds,
        })
    }
}

/// Runs `work` while another thread reads the RSS of `pid`; returns its
/// result and the highest RSS seen.
fn sampling<T>(pid: u32, work: impl FnOnce() -> T) -> (T, u64) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = rss_bytes(pid);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(PEAK_SAMPLE);
                peak = peak.max(rss_bytes(pid));
            }
            peak
        });
        let out = work();
        stop.store(true, Ordering::Relaxed);
        (out, sampler.join().unwrap_or(0))
    })
}

/// The simulated node; dropping it stops the agent, then the backends,
/// then removes the node.
struct ChurnNode {
    agent: Agent,
    _backends: Vec<Proc>,
    client: Pod,
    backend_pods: Vec<Pod>,
    spares: Vec<Pod>,
    node: SimNode,
}

impl ChurnNode {
    fn build() -> anyhow::Result<ChurnNode> {
        let mut node = SimNode::new("churn")?;
        let client = node.add_pod("client")?;
        let backend_pods = (0..BACKENDS)
            .map(|i| node.add_pod(&format!("b{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let spares = (0..SPARE_PODS)
            .map(|i| node.add_pod(&format!("s{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let backends = backend_pods
            .iter()
            .map(|pod| http_peers::serve(&node, pod, &pod.name))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let config = churn_config(0, &client, &backend_pods, &spares);
        let agent = Agent::start(&node, &config)?;
        Ok(ChurnNode {
            agent,
            _backends: backends,
            client,
            backend_pods,
            spares,
            node,
        })
    }

    fn config(&self, step: u64) -> String {
        churn_config(step, &self.client, &self.backend_pods, &self.spares)
    }

    /// Config reloads so far: (applied, rejected).
    fn reloads(&self) -> anyhow::Result<(u64, u64)> {
        let metrics = self.agent.metrics()?;
        let count = |result: &str| {
            metrics.sum(&format!(
                "dataplane_config_reloads_total{{result=\"{result}\""
            )) as u64
        };
        Ok((count("applied"), count("rejected")))
    }

    /// `benchtool burst` with `connections` per round over the traffic
    /// services: one round, or with `soak` = (duration, pause) rounds
    /// `pause` apart, none after `duration`.
    fn burst_command(
        &self,
        connections: u32,
        soak: Option<(Duration, Duration)>,
    ) -> anyhow::Result<Command> {
        let mut cmd = Command::new(benchtool()?);
        cmd.arg("burst");
        for k in 0..TRAFFIC_SERVICES {
            cmd.args(["--url", &format!("http://{}/", traffic_vip(k))]);
        }
        cmd.args([
            "--connections",
            &connections.to_string(),
            "--requests",
            &REQUESTS_PER_CONNECTION.to_string(),
            "--timeout",
            &REQUEST_TIMEOUT.as_secs().to_string(),
        ]);
        if let Some((duration, pause)) = soak {
            // The duration ends it; the rounds only bound it.
            let rounds = duration.as_secs().max(1) * 1000;
            cmd.args([
                "--rounds",
                &rounds.to_string(),
                "--duration",
                &duration.as_secs_f64().to_string(),
                "--pause",
                &pause.as_secs_f64().to_string(),
            ]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(cmd)
    }

    /// Runs one round in the client pod and waits for the report.
    fn burst(&self, connections: u32) -> anyhow::Result<BurstReport> {
        let cmd = self.burst_command(connections, None)?;
        let budget = ROUND_BUDGET + SLACK;
        let out = self.node.run_in_pod(&self.client, cmd, budget)?;
        let report = parse_burst(out)?;
        ensure!(
            report.completed > 0,
            "burst of {connections} connections: nothing completed: {report:?}"
        );
        Ok(report)
    }

    /// Starts the soak's rounds in the background.
    fn spawn_burst(&self, plan: &ChurnPlan) -> anyhow::Result<Proc> {
        let soak = Some((plan.soak, plan.soak_pause));
        let cmd = self.burst_command(plan.soak_connections, soak)?;
        self.node.spawn_in_pod(&self.client, cmd)
    }
}

/// What `benchtool burst` prints.
#[derive(Debug, Clone, Deserialize)]
struct BurstReport {
    connections: u64,
    completed: u64,
    errors: u64,
    #[serde(default)]
    error_kinds: BTreeMap<String, u64>,
}

fn add_kinds(total: &mut BTreeMap<String, u64>, more: BTreeMap<String, u64>) {
    for (kind, count) in more {
        *total.entry(kind).or_default() += count;
    }
}

fn parse_burst(out: Output) -> anyhow::Result<BurstReport> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("benchtool burst exited with {}: {stderr}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("benchtool burst printed nothing: {stderr}"))?;
    serde_json::from_str(line).with_context(|| format!("bad benchtool burst line {line:?}"))
}

/// VIP of traffic service `web-<k>`.
fn traffic_vip(k: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 20 + k), 80)
}

/// Version `step` of the mesh config (0: the initial one).
///
/// - `web-<k>`: HTTP with outlier detection, on every backend at step 0,
///   afterwards on all but one, a different one each step.
/// - `svc-<i>`: 40 to 120 services without traffic, a window over ids
///   that moves each step (so some are added and some removed), each with
///   one to three endpoints on addresses nobody dials.
/// - pods: the client always; four of the six spare pods, a different
///   four each step; and up to 15 pods that are not on this node (yet),
///   with new UIDs each step.
pub fn churn_config(step: u64, client: &Pod, backends: &[Pod], spares: &[Pod]) -> String {
    let mut yaml = String::from("services:\n");
    for k in 0..TRAFFIC_SERVICES {
        let left_out = (step > 0).then(|| (step + u64::from(k)) % backends.len().max(1) as u64);
        let endpoints: Vec<String> = backends
            .iter()
            .enumerate()
            .filter(|(i, _)| left_out != Some(*i as u64))
            .map(|(_, pod)| format!("{{address: {}:{}}}", pod.ip, http_peers::BACKEND_PORT))
            .collect();
        let _ = writeln!(
            yaml,
            "  - name: web-{k}\n    vip: {}\n    protocol: http\n    endpoints: [{}]\n    trafficPolicy: {{outlierDetection: {{}}}}",
            traffic_vip(k),
            endpoints.join(", ")
        );
    }
    let count = 40 + (step * 13) % 81;
    let first = (step * 17) % 200;
    for i in first..first + count {
        let protocol = if i % 2 == 0 { "http" } else { "tcp" };
        let endpoints: Vec<String> = (0..1 + (i + step) % 3)
            .map(|e| format!("{{address: 198.18.0.{}:8080}}", 200 + (i + step + e) % 50))
            .collect();
        let _ = writeln!(
            yaml,
            "  - name: svc-{i}\n    vip: 198.19.{}.{}:80\n    protocol: {protocol}\n    endpoints: [{}]",
            1 + i / 250,
            1 + i % 250,
            endpoints.join(", ")
        );
    }
    yaml.push_str("pods:\n");
    let _ = writeln!(
        yaml,
        "  - {{uid: {}, name: {}, ip: {}}}",
        client.uid, client.name, client.ip
    );
    for (j, pod) in spares.iter().enumerate() {
        if !(j as u64 + step).is_multiple_of(3) {
            let _ = writeln!(
                yaml,
                "  - {{uid: {}, name: {}, ip: {}}}",
                pod.uid, pod.name, pod.ip
            );
        }
    }
    for j in 0..(step * 5) % 16 {
        let _ = writeln!(
            yaml,
            "  - {{uid: 00000000-0000-4000-8000-{step:06x}{j:06x}, name: elsewhere-{j}}}"
        );
    }
    yaml
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, last: u8) -> Pod {
        Pod {
            name: name.into(),
            uid: format!("11111111-2222-4333-8444-{last:012}"),
            ip: Ipv4Addr::new(198, 18, 0, last),
            netns: String::new(),
            cgroup: Default::default(),
        }
    }

    fn config(step: u64) -> String {
        let backends: Vec<Pod> = (0..4).map(|i| pod(&format!("b{i}"), 11 + i)).collect();
        let spares: Vec<Pod> = (0..6).map(|i| pod(&format!("s{i}"), 15 + i)).collect();
        churn_config(step, &pod("client", 10), &backends, &spares)
    }

    fn services(yaml: &str) -> Vec<&str> {
        yaml.lines()
            .filter_map(|l| l.trim().strip_prefix("- name: "))
            .collect()
    }

    #[test]
    fn every_step_changes_services_endpoints_and_pods() {
        let (a, b) = (config(1), config(2));
        assert_ne!(a, b);
        let (sa, sb) = (services(&a), services(&b));
        assert!(sa.iter().any(|s| !sb.contains(s)), "nothing removed");
        assert!(sb.iter().any(|s| !sa.contains(s)), "nothing added");
        // The traffic services are always there, with three of the four
        // backends after the first version.
        for yaml in [&a, &b] {
            for k in 0..4 {
                assert!(yaml.contains(&format!("name: web-{k}\n")));
            }
        }
        let all = config(0);
        assert_eq!(all.matches("{address: 198.18.0.11:8080}").count(), 4);
        assert_eq!(a.matches("{address: 198.18.0.11:8080}").count(), 3);
        assert!(a.contains("pods:\n  - {uid: 11111111-2222-4333-8444-000000000010"));
        assert_ne!(
            a.matches("elsewhere-").count(),
            b.matches("elsewhere-").count()
        );
    }

    #[test]
    fn service_vips_and_names_are_unique() {
        for step in 0..50 {
            let yaml = config(step);
            let mut vips: Vec<&str> = yaml
                .lines()
                .filter_map(|l| l.trim().strip_prefix("vip: "))
                .collect();
            let count = vips.len();
            vips.sort_unstable();
            vips.dedup();
            assert_eq!(vips.len(), count, "step {step}");
            assert!((44..=124).contains(&count), "step {step}: {count} services");
        }
    }
}
