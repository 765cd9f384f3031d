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
use std::sync::Arc;

use crate::balance::Locality;
use crate::config::MeshConfig;

pub use picker::Picker;
pub use service::{Chosen, Endpoint, Service};

/// All services, keyed by the VIP:port clients connect to, and the
/// enrolled pods by address (to know who is calling).
#[derive(Debug, Default)]
pub struct ServiceTable {
    by_vip: HashMap<SocketAddrV4, Arc<Service>>,
    pods_by_ip: HashMap<std::net::IpAddr, CallerPod>,
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
                let service = match old {
                    Some(old) if old.config == *svc => Arc::clone(old),
                    _ => Arc::new(Service::new(svc, node, old.map(|o| &**o))),
                };
                (svc.vip, service)
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
        Self { by_vip, pods_by_ip }
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

    pub fn get(&self, vip: &SocketAddrV4) -> Option<&Arc<Service>> {
        self.by_vip.get(vip)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_vip.values()
    }
}

/// Shared, atomically replaceable service table.
pub type SharedServices = Arc<arc_swap::ArcSwap<ServiceTable>>;
