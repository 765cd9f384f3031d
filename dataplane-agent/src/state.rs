//! The proxy's view of the mesh: services by VIP:port, each with its
//! endpoints, its policy state and its upstream connection pools.
//!
//! Built from the config (later from discovery) and swapped atomically:
//! the hot path reads it without locks, a change applies to new
//! connections and requests, and connections in flight keep the version
//! they started with. A service whose config did not change is kept as it
//! is; a changed one carries over what should survive a reload (endpoint
//! health, breaker occupancy, retry budget).

mod picker;
mod service;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, OnceLock};

use crate::balance::Locality;
use crate::config::MeshConfig;

pub use picker::Picker;
pub use service::{Chosen, Endpoint, Service};

/// All services, keyed by the VIP:port clients connect to, and the
/// enrolled pods by address (to know who is calling).
#[derive(Debug, Default)]
pub struct ServiceTable {
    by_vip: HashMap<SocketAddrV4, Arc<Entry>>,
    pods_by_ip: HashMap<std::net::IpAddr, CallerPod>,
    node: NodeContext,
}

/// One service of the table: its config, and its runtime state once a
/// connection or request has needed it.
///
/// The state (balancer, outlier detector, breaker, budget, a connection
/// pool per endpoint) costs kilobytes per service, while a node's pods
/// call a small part of a large cluster's services: built on first use,
/// it costs nothing for the rest. An entry is shared by successive tables
/// while its config stays the same, so the state built through one table
/// is the state of the next.
#[derive(Debug)]
struct Entry {
    config: Arc<crate::config::Service>,
    state: OnceLock<Arc<Service>>,
}

/// An enrolled pod as the proxy knows its callers.
#[derive(Debug)]
struct CallerPod {
    uid: String,
    tenant: Option<String>,
}

/// Node-wide inputs of every service's runtime state.
#[derive(Debug, Clone, Default)]
pub struct NodeContext {
    /// `SO_MARK` of upstream sockets.
    pub mark: u32,
    /// The node's (and so every caller's) locality.
    pub locality: Locality,
}

impl ServiceTable {
    /// Builds the table for `cfg`, reusing or carrying over state from
    /// `previous`.
    pub fn build(cfg: &MeshConfig, previous: Option<&ServiceTable>, node: &NodeContext) -> Self {
        let by_vip = cfg
            .services
            .iter()
            .map(|svc| {
                let old = previous.and_then(|table| table.by_vip.get(&svc.vip));
                let entry = match old {
                    // The same shared config (most of a large discovered
                    // state from one change to the next), or an equal copy
                    // (a file reload, the first listing after a snapshot)
                    // whose state is in use; an unused entry takes the new
                    // copy so that the old one is not held twice (checked
                    // first: the comparison is the costly part).
                    Some(old)
                        if Arc::ptr_eq(&old.config, svc)
                            || (old.state.get().is_some() && *old.config == **svc) =>
                    {
                        Arc::clone(old)
                    }
                    // A changed service in use gets its new state now,
                    // carrying over the old one's; one never used stays
                    // lazy. (A connection on the old table that first uses
                    // the service while this runs starts the new state
                    // fresh: no carry-over for that one.)
                    _ => {
                        let state = OnceLock::new();
                        if let Some(old) = old.and_then(|old| old.state.get()) {
                            let _ = state.set(Arc::new(Service::new(svc, node, Some(old))));
                        }
                        Arc::new(Entry {
                            config: Arc::clone(svc),
                            state,
                        })
                    }
                };
                (svc.vip, entry)
            })
            .collect();
        let pods_by_ip = cfg
            .pods
            .iter()
            .filter_map(|pod| {
                let caller = CallerPod {
                    uid: pod.uid.clone(),
                    tenant: pod.tenant.clone().filter(|t| !t.is_empty()),
                };
                Some((std::net::IpAddr::V4(pod.ip?), caller))
            })
            .collect();
        Self {
            by_vip,
            pods_by_ip,
            node: node.clone(),
        }
    }

    /// The UID of the enrolled pod at `ip`, if the config gave its address.
    pub fn pod_at(&self, ip: std::net::IpAddr) -> Option<&str> {
        self.pods_by_ip.get(&ip).map(|p| p.uid.as_str())
    }

    /// The enrolled pod at `ip`, as far as tenants go: `None` for a caller
    /// the proxy does not know (no address yet), `Some(None)` for a pod
    /// without a tenant.
    pub fn tenant_at(&self, ip: std::net::IpAddr) -> Option<Option<&str>> {
        self.pods_by_ip.get(&ip).map(|p| p.tenant.as_deref())
    }

    /// The service at `vip`, its runtime state built if this is its first
    /// use.
    pub fn get(&self, vip: &SocketAddrV4) -> Option<&Arc<Service>> {
        let entry = self.by_vip.get(vip)?;
        Some(
            entry
                .state
                .get_or_init(|| Arc::new(Service::new(&entry.config, &self.node, None))),
        )
    }

    /// The services in use (whose runtime state exists).
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_vip.values().filter_map(|entry| entry.state.get())
    }

    /// Every service's config.
    pub fn configs(&self) -> impl Iterator<Item = &Arc<crate::config::Service>> {
        self.by_vip.values().map(|entry| &entry.config)
    }

    /// Every service: its config, and its runtime state if it was used.
    pub fn entries(
        &self,
    ) -> impl Iterator<Item = (&Arc<crate::config::Service>, Option<&Arc<Service>>)> {
        self.by_vip
            .values()
            .map(|entry| (&entry.config, entry.state.get()))
    }
}

/// Shared, atomically replaceable service table.
pub type SharedServices = Arc<arc_swap::ArcSwap<ServiceTable>>;
