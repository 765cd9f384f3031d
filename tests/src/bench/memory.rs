//! Proxy memory against the number of pods on the node: one node proxy
//! for all of them, or one sidecar per pod (idle pods included), each
//! holding the same 100-service config (HAProxy's too: a frontend and a
//! backend per service). Read as PSS, so pages the processes share (the
//! binary's) count once, and for node mode with the eBPF maps beside it.

use std::time::Duration;

use indicatif::ProgressBar;

use super::report::MemoryPoint;
use super::sched::{bpf_map_bytes, pss_bytes, rss_bytes};
use super::topology::{Mode, haproxy_sidecar, mesh_config};
use crate::agent::Agent;
use crate::sidecar::Sidecar;
use crate::{Pod, Proc, SimNode};

/// Services in every config, as in a small cluster.
const SERVICES: u32 = 100;
/// Time for the proxies to settle before their memory is read.
const SETTLE: Duration = Duration::from_secs(1);

/// Memory at each pod count in `counts` (ascending) for `mode`.
pub fn measure(mode: Mode, counts: &[u32], bar: &ProgressBar) -> anyhow::Result<Vec<MemoryPoint>> {
    let mut node = SimNode::new(&format!("m{}", &mode.name()[..3]))?;
    let server = node.add_pod("server")?;
    let mut pods: Vec<Pod> = Vec::new();
    let mut proxies = Proxies::default();
    let mut points = Vec::new();
    for &count in counts {
        bar.set_message(format!("memory: {} with {count} pods", mode.name()));
        while pods.len() < count as usize {
            let pod = node.add_pod(&format!("p{}", pods.len()))?;
            proxies.add(mode, &node, &pod, &server)?;
            pods.push(pod);
        }
        let enrolled: Vec<&Pod> = pods.iter().collect();
        let config = mesh_config(&server, &enrolled, SERVICES - 2);
        proxies.node_proxy(mode, &node, &config)?;
        std::thread::sleep(SETTLE);
        let pids = proxies.pids();
        points.push(MemoryPoint {
            mode: mode.name().into(),
            pods: count,
            proxies: pids.len() as u32,
            proxy_rss_bytes: pids.iter().map(|&pid| rss_bytes(pid)).sum(),
            proxy_pss_bytes: pids.iter().map(|&pid| pss_bytes(pid)).sum(),
            bpf_map_bytes: proxies
                .agent
                .as_ref()
                .and_then(Agent::pid)
                .map_or(0, bpf_map_bytes),
        });
        bar.inc(1);
    }
    Ok(points)
}

/// The proxies of the memory topology.
#[derive(Default)]
struct Proxies {
    agent: Option<Agent>,
    sidecars: Vec<Sidecar>,
    haproxies: Vec<Proc>,
}

impl Proxies {
    /// A sidecar for a new pod (sidecar modes only).
    fn add(&mut self, mode: Mode, node: &SimNode, pod: &Pod, server: &Pod) -> anyhow::Result<()> {
        match mode {
            Mode::Sidecar => {
                let config = mesh_config(server, &[pod], SERVICES - 2);
                self.sidecars
                    .push(Sidecar::start(node, pod, &config, &[8080])?);
            }
            Mode::Haproxy => {
                self.haproxies
                    .push(haproxy_sidecar(node, pod, server, SERVICES - 2)?);
            }
            Mode::Direct | Mode::Node | Mode::NodeFast => {}
        }
        Ok(())
    }

    /// Node mode: (re)starts or reconfigures the one node proxy.
    fn node_proxy(&mut self, mode: Mode, node: &SimNode, config: &str) -> anyhow::Result<()> {
        if mode != Mode::Node {
            return Ok(());
        }
        match &self.agent {
            Some(agent) => {
                let applied = || -> anyhow::Result<f64> {
                    Ok(agent
                        .metrics()?
                        .sum("dataplane_config_reloads_total{result=\"applied\""))
                };
                let before = applied()?;
                agent.write_config(config)?;
                // Memory is read only once the larger pod list is in force.
                crate::eventually("the node proxy reloaded", Duration::from_secs(10), || {
                    anyhow::ensure!(applied()? > before, "not reloaded yet");
                    Ok(())
                })?;
            }
            None => self.agent = Some(Agent::start_as_deployed(node, config, &[])?),
        }
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.agent.iter().filter_map(Agent::pid).collect();
        pids.extend(self.sidecars.iter().filter_map(Sidecar::pid));
        pids.extend(self.haproxies.iter().map(Proc::pid));
        pids
    }
}
