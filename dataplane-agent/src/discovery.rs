//! Discovery sources and how their states combine into the config in
//! force.
//!
//! The config file is the base: always there, read first, and the winner
//! of any conflict. Each other source (the service registry, the
//! Kubernetes API) feeds a [`Discovered`]: plain data, converted from its
//! wire types at its own edge, so that the proxy and the capture tables
//! know nothing of etcd or Kubernetes. [`merge`] lays them over the file in
//! the order they were attached.

pub mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::warn;

use crate::config::{MeshConfig, Pod, Service};

/// What one source knows now.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Discovered {
    pub services: Vec<Arc<Service>>,
    /// Pods of this node to enroll.
    pub pods: Vec<Pod>,
    /// Every pod of this node the source knows, enrolled or not: for one
    /// it does not know yet (the CNI plugin asks about a pod the moment
    /// its sandbox is created), `enrolled_namespaces` decides.
    pub known_pods: BTreeSet<String>,
    /// Namespaces whose pods are enrolled unless they opt out.
    pub enrolled_namespaces: BTreeSet<String>,
    /// Each namespace's tenant, for pods not known yet.
    pub namespace_tenants: BTreeMap<String, String>,
    /// Whether this is a whole state (every kind listed at least once,
    /// now or before a snapshot of it was written): enough to decide by,
    /// as the CNI socket does.
    pub complete: bool,
    /// Whether this agent itself has listed it. A state read back from a
    /// snapshot is whole but old: what was created since may exist, and
    /// nothing may be removed from the kernel tables for its absence
    /// until this is true. Never written to a snapshot.
    #[serde(skip)]
    pub listed: bool,
}

/// A discovery source as the runtime sees it: its state, and a wake-up
/// when that changes. Each source keeps serving its last state while its
/// backend is unreachable; a source that stopped never wakes up again.
pub trait Source: Send {
    /// For logs.
    fn name(&self) -> &'static str;
    /// What the source knows now; marks it seen.
    fn current(&mut self) -> Arc<Discovered>;
    /// Resolves when the state changed since it was last seen.
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Whether the source has listed its backend itself yet (see
    /// [`Discovered::listed`]): until every source has, the kernel tables
    /// are only added to.
    fn listed(&self) -> bool {
        true
    }
}

/// A source that publishes its state in a watch channel.
pub struct Feed {
    name: &'static str,
    rx: watch::Receiver<Arc<Discovered>>,
}

impl Feed {
    pub fn new(name: &'static str, rx: watch::Receiver<Arc<Discovered>>) -> Self {
        Self { name, rx }
    }
}

impl Source for Feed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn current(&mut self) -> Arc<Discovered> {
        Arc::clone(&self.rx.borrow_and_update())
    }

    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        changed(&mut self.rx)
    }

    fn listed(&self) -> bool {
        self.rx.borrow().listed
    }
}

/// [`Source::changed`] for a source publishing in a watch channel: a
/// channel whose sender is gone never wakes the runtime again.
pub fn changed<T: Send + Sync>(
    rx: &mut watch::Receiver<T>,
) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

/// The config in force: the file's, then each source's services whose VIP
/// is still free (a conflict is logged and the earlier one wins; the
/// file's own services read back from the registry, as `--publish` writes
/// them, are no conflict), and each source's pods not already listed.
pub fn merge(file: &MeshConfig, sources: &[(&str, Arc<Discovered>)]) -> MeshConfig {
    let mut taken: HashSet<_> = file.services.iter().map(|s| s.vip).collect();
    let own: HashSet<_> = file
        .services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str(), s.vip))
        .collect();
    let mut pods: HashSet<String> = file.pods.iter().map(|p| p.uid.clone()).collect();
    let mut merged = file.clone();
    for (source, discovered) in sources {
        for service in &discovered.services {
            if !own.is_empty()
                && own.contains(&(
                    service.namespace.as_str(),
                    service.name.as_str(),
                    service.vip,
                ))
            {
                continue;
            }
            if !taken.insert(service.vip) {
                warn!(
                    source,
                    service = %format!("{}/{}", service.namespace, service.name),
                    vip = %service.vip,
                    "service left out: the config file or an earlier source uses its VIP"
                );
                continue;
            }
            merged.services.push(Arc::clone(service));
        }
        for pod in &discovered.pods {
            if pods.insert(pod.uid.clone()) {
                merged.pods.push(pod.clone());
            }
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> MeshConfig {
        MeshConfig::parse(yaml, std::path::Path::new("t")).unwrap()
    }

    fn discovered(yaml: &str) -> Arc<Discovered> {
        let config = parse(yaml);
        Arc::new(Discovered {
            services: config.services,
            pods: config.pods,
            ..Discovered::default()
        })
    }

    #[test]
    fn the_file_wins_a_vip_and_its_own_published_services_are_no_conflict() {
        let file = parse("services:\n  - {name: a, vip: 198.19.0.1:80}\n");
        // A source's services are checked one by one, not as one file.
        let mut registry = parse("services:\n  - {name: a, vip: 198.19.0.1:80}\n").services;
        registry.extend(
            parse(
                "services:\n  - {name: x, namespace: t, vip: 198.19.0.1:80}\n  - {name: b, namespace: t, vip: 198.19.0.2:80}\n",
            )
            .services,
        );
        let registry = Arc::new(Discovered {
            services: registry,
            ..Discovered::default()
        });
        let merged = merge(&file, &[("registry", registry)]);
        let names: Vec<_> = merged.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn an_earlier_source_wins_a_vip_and_pods_are_listed_once() {
        let file = parse("pods: [{uid: p1}]\n");
        let registry = discovered("services: [{name: r, vip: 10.96.0.5:80}]\n");
        let kubernetes = discovered(
            "services:\n\
             - {name: k, vip: 10.96.0.5:80}\n\
             - {name: k2, vip: 10.96.0.6:80}\n\
             pods: [{uid: p1, name: dup}, {uid: p2}]\n",
        );
        let merged = merge(&file, &[("registry", registry), ("kubernetes", kubernetes)]);
        let names: Vec<_> = merged.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["r", "k2"]);
        let pods: Vec<_> = merged
            .pods
            .iter()
            .map(|p| (p.uid.as_str(), p.name.clone()))
            .collect();
        assert_eq!(pods, [("p1", None), ("p2", None)]);
    }
}
