//! The proxy's view of the mesh: services by VIP:port, with the endpoints
//! and settings it needs per connection. Built from the config (later from
//! discovery) and swapped atomically, so the hot path reads it without
//! locks and a change applies to new connections only.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use crate::balance::RoundRobin;
use crate::config::MeshConfig;

/// One service as the proxy uses it.
#[derive(Debug)]
pub struct Service {
    /// `namespace/name`, for logs and metrics.
    pub id: String,
    pub connect_timeout: Duration,
    pub endpoints: Vec<SocketAddrV4>,
    pub balancer: RoundRobin,
}

/// All services, keyed by the VIP:port clients connect to.
#[derive(Debug, Default)]
pub struct ServiceTable {
    by_vip: HashMap<SocketAddrV4, Arc<Service>>,
}

impl ServiceTable {
    pub fn from_config(cfg: &MeshConfig) -> Self {
        let by_vip = cfg
            .services
            .iter()
            .map(|svc| {
                let service = Service {
                    id: format!("{}/{}", svc.namespace, svc.name),
                    connect_timeout: svc.connect_timeout,
                    endpoints: svc.endpoints.iter().map(|ep| ep.address).collect(),
                    balancer: RoundRobin::default(),
                };
                (svc.vip, Arc::new(service))
            })
            .collect();
        Self { by_vip }
    }

    pub fn get(&self, vip: &SocketAddrV4) -> Option<&Arc<Service>> {
        self.by_vip.get(vip)
    }
}

/// Shared, atomically replaceable service table.
pub type SharedServices = Arc<arc_swap::ArcSwap<ServiceTable>>;
