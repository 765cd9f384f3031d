//! Discovery from the Kubernetes API at scale: the agent, run as
//! deployed on a simulated node, reads a stand-in API server holding many
//! Services (one EndpointSlice each) and this node's pods. Measured: the
//! time to the first whole state, the agent's memory once settled, its
//! CPU while endpoint changes arrive at a steady rate, and, meanwhile, the
//! time from a new Service at the API to the first request answered
//! through its VIP (in the eBPF service map and in the proxy).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use super::report::DiscoveryScale;
use super::sched;
use crate::agent::Agent;
use crate::http_peers;
use crate::kubeapi::KubeApiInNetns;
use crate::scenario::backend_addr;
use crate::simnode::SimNode;

/// The sizes of one run.
struct Plan {
    services: u32,
    endpoints_per_service: u32,
    pods: u32,
    rate: u32,
    churn: Duration,
    samples: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                services: 300,
                endpoints_per_service: 10,
                pods: 20,
                rate: 200,
                churn: Duration::from_secs(3),
                samples: 3,
            }
        } else {
            Plan {
                services: 10_000,
                endpoints_per_service: 10,
                pods: 250,
                rate: 1_000,
                churn: Duration::from_secs(10),
                samples: 30,
            }
        }
    }
}

/// The VIP of service `i` (198.19.1.1 on; 198.19.0.x is the scenarios').
fn vip(i: u32) -> String {
    format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250)
}

/// Service `i`'s slice: its endpoints, the `flip`-th one not ready (a
/// change per call with another `flip`).
fn slice(i: u32, per_service: u32, flip: u32) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-x\n  namespace: load\n  \
         labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nendpoints:\n"
    );
    for e in 0..per_service {
        let _ = writeln!(
            yaml,
            "- addresses: [10.{}.{}.{}]\n  conditions: {{ready: {}}}",
            100 + i / 65536,
            i / 256 % 256,
            (i % 256 + e) % 256,
            e != flip % per_service || flip == u32::MAX
        );
    }
    yaml.push_str("ports:\n- name: http\n  port: 8080\n  protocol: TCP\n");
    yaml
}

fn cluster(plan: &Plan, node: &SimNode, real_pods: &[&crate::Pod]) -> String {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: load\n  labels: {mesh.sidecarless.dev/enrolled: \"true\"}\n",
    );
    for i in 0..plan.services {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: load}}\n\
             spec: {{clusterIP: {}, ports: [{{name: http, port: 80, protocol: TCP}}]}}\n---\n{}",
            vip(i),
            slice(i, plan.endpoints_per_service, u32::MAX)
        );
    }
    for i in 0..plan.pods {
        let (name, uid) = match real_pods.get(i as usize) {
            Some(pod) => (pod.name.clone(), pod.uid.clone()),
            None => (format!("p{i}"), format!("00000000-0000-4000-8000-{i:012}")),
        };
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: load, uid: {uid}}}\n\
             spec: {{nodeName: {}, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running}}\n",
            node.id()
        );
    }
    yaml
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn measure(quick: bool) -> anyhow::Result<DiscoveryScale> {
    let plan = Plan::new(quick);
    let mut node = SimNode::new("scale")?;
    let client = node.add_pod("client")?;
    let web = node.add_pod("web")?;
    let _server = http_peers::serve(&node, &web, "web")?;
    let api = KubeApiInNetns::start(node.netns(), &cluster(&plan, &node, &[&client, &web]))
        .context("the stand-in API server")?;
    let dir = Agent::work_dir_of(&node);
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = api.write_kubeconfig(&dir)?;

    let started = Instant::now();
    let agent = Agent::start_as_deployed(
        &node,
        "services: []\n",
        &[
            "--kubernetes",
            &format!("--kubeconfig={}", kubeconfig.display()),
            &format!("--node-name={}", node.id()),
        ],
    )?;
    let deadline = started + Duration::from_secs(300);
    while agent.metric("dataplane_kubernetes_services") < f64::from(plan.services) {
        ensure!(
            Instant::now() < deadline,
            "the agent never read every Service"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sync_s = started.elapsed().as_secs_f64();
    let pid = agent.pid().context("the agent's pid")?;
    std::thread::sleep(Duration::from_secs(5));
    let (rss_bytes, pss_bytes) = (sched::rss_bytes(pid), sched::pss_bytes(pid));
    let heap_allocated_bytes = agent.metric("dataplane_heap_allocated_bytes") as u64;

    // Endpoint changes at a steady rate, from another thread; the agent's
    // CPU over exactly that window.
    let (effective_ms, (changes, churn_s, cpu_ns)) = std::thread::scope(|s| {
        let (api, plan) = (&api, &plan);
        let churn = s.spawn(move || {
            let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate));
            let started = Instant::now();
            let cpu_before = sched::proxy_cpu_ns(&[pid]);
            let mut next = started;
            let mut k: u32 = 0;
            while started.elapsed() < plan.churn {
                let i = k % plan.services;
                let _ = api.apply_yaml(&slice(i, plan.endpoints_per_service, k / plan.services));
                k += 1;
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let cpu = sched::proxy_cpu_ns(&[pid]).saturating_sub(cpu_before);
            (u64::from(k), started.elapsed().as_secs_f64(), cpu)
        });
        let samples = new_services(plan, &node, &client, &web, api);
        let churned = churn
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"));
        Ok::<_, anyhow::Error>((samples?, churned?))
    })?;
    let mut sorted = effective_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(DiscoveryScale {
        services: plan.services,
        endpoints: plan.services * plan.endpoints_per_service,
        pods: plan.pods,
        sync_s,
        rss_bytes,
        pss_bytes,
        heap_allocated_bytes,
        changes,
        churn_s,
        churn_cpu_cores: cpu_ns as f64 / 1e9 / churn_s,
        effective_p50_ms: percentile(&sorted, 50.0),
        effective_p99_ms: percentile(&sorted, 99.0),
        effective_ms,
    })
}

/// How long a new Service may take to be served.
const DEADLINE: Duration = Duration::from_secs(60);

/// New Services, one after the other: for each, the time from its
/// creation at the API to the first request the client pod gets answered
/// through its VIP (ms), polled every 20 ms at most (each attempt a new
/// connection bounded by 20 ms).
fn new_services(
    plan: &Plan,
    node: &SimNode,
    client: &crate::Pod,
    web: &crate::Pod,
    api: &KubeApiInNetns,
) -> anyhow::Result<Vec<f64>> {
    {
        let mut samples = Vec::new();
        for n in 0..plan.samples {
            let backend = backend_addr(web);
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: new{n}, namespace: load}}\n\
                 spec: {{clusterIP: 198.19.250.{}, ports: [{{name: http, port: 80, protocol: TCP}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: new{n}-x\n  namespace: load\n  \
                 labels: {{kubernetes.io/service-name: new{n}}}\naddressType: IPv4\nendpoints:\n\
                 - addresses: [{}]\nports:\n- name: http\n  port: {}\n  protocol: TCP\n",
                n + 1,
                backend.ip(),
                backend.port()
            );
            // The prober runs before the Service exists: its start-up is
            // not in the figure, and it polls every ~20 ms at most.
            let url = format!("http://198.19.250.{}/", n + 1);
            let prober = http_peers::UntilOk::start(node, client, &url, DEADLINE)?;
            let t0 = std::time::SystemTime::now();
            api.apply_yaml(&yaml)?;
            let answered = prober
                .answered_at(DEADLINE)
                .with_context(|| format!("new Service {n} never served"))?;
            let took = answered.duration_since(t0).unwrap_or_default();
            samples.push(took.as_secs_f64() * 1000.0);
        }
        Ok(samples)
    }
}
