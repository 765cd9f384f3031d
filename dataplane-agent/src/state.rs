//! The proxy's view of the mesh: services by VIP:port, each with its
//! endpoints, its policy state and its upstream connection pools.
//!
//! Built from the config (later from discovery) and swapped atomically:
//! the hot path reads it without locks, a change applies to new
//! connections and requests, and connections in flight keep the version
//! they started with. A service whose config did not change keeps its
//! runtime state (pools, balancer position, health) across a reload.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use crate::balance::RoundRobin;
use crate::config::{self, MeshConfig};
use crate::metrics::EndpointLabels;
use crate::proxy::http::upstream::{Clients, Connector};

/// One endpoint as the proxy uses it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// Metric labels, built once rather than per connection.
    pub labels: EndpointLabels,
}

/// One service as the proxy uses it.
#[derive(Debug)]
pub struct Service {
    /// `namespace/name`, for logs and metrics.
    pub id: String,
    /// The config this runtime state was built from.
    pub config: config::Service,
    pub endpoints: Vec<Endpoint>,
    pub balancer: RoundRobin,
    pub clients: Clients,
}

impl Service {
    fn new(cfg: &config::Service, mark: u32) -> Self {
        let id = format!("{}/{}", cfg.namespace, cfg.name);
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|ep| Endpoint {
                addr: ep.address,
                labels: EndpointLabels {
                    service: id.clone(),
                    endpoint: ep.address.to_string(),
                },
            })
            .collect();
        let connector = Connector {
            mark,
            connect_timeout: cfg.traffic_policy.timeouts.connect,
        };
        Self {
            id,
            config: cfg.clone(),
            endpoints,
            balancer: RoundRobin::default(),
            clients: Clients::new(connector),
        }
    }

    pub fn policy(&self) -> &config::TrafficPolicy {
        &self.config.traffic_policy
    }
}

/// All services, keyed by the VIP:port clients connect to.
#[derive(Debug, Default)]
pub struct ServiceTable {
    by_vip: HashMap<SocketAddrV4, Arc<Service>>,
}

impl ServiceTable {
    /// Builds the table for `cfg`, reusing from `previous` every service
    /// whose config is unchanged.
    pub fn build(cfg: &MeshConfig, previous: Option<&ServiceTable>, mark: u32) -> Self {
        let by_vip = cfg
            .services
            .iter()
            .map(|svc| {
                let kept = previous
                    .and_then(|table| table.by_vip.get(&svc.vip))
                    .filter(|old| old.config == *svc);
                let service = match kept {
                    Some(old) => Arc::clone(old),
                    None => Arc::new(Service::new(svc, mark)),
                };
                (svc.vip, service)
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
