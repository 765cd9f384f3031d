//! `/clusters`: every service and endpoint as the proxy sees them right
//! now, so an operator can tell in one look why a request failed: which
//! endpoint is ejected and for how long, which is half-open with how many
//! probes, how busy each is, and how close each circuit breaker is to its
//! limit. Also what `dataplane-agent status` prints.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config;
use crate::health::HostState;
use crate::resilience::Limit;
use crate::state::{Service, ServiceTable};

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Clusters {
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceStatus {
    /// `namespace/name`.
    pub service: String,
    pub vip: String,
    pub protocol: String,
    /// Whether outlier detection is on (otherwise every endpoint is
    /// `healthy`).
    pub outlier_detection: bool,
    /// In use / maximum, per circuit breaker limit.
    pub circuit_breakers: Vec<BreakerStatus>,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BreakerStatus {
    /// `max_connections`, `max_pending_requests`, `max_requests`,
    /// `max_retries`.
    pub limit: String,
    pub in_use: u32,
    pub max: u32,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointStatus {
    pub address: String,
    pub weight: u32,
    pub region: String,
    pub zone: String,
    /// `healthy`, `ejected` or `half_open`.
    pub health: String,
    /// Ejected: milliseconds until it is let back in (half-open).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ejected_for_ms: Option<u64>,
    /// Ejected: how many times in a row (each ejection lasts longer).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ejections: Option<u32>,
    /// Half-open: probe requests in flight and successes so far.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub probes_in_flight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub probe_successes: Option<u32>,
    /// Requests (HTTP) or connections (TCP) in flight to it.
    pub active: u64,
}

impl Clusters {
    pub fn of(table: &ServiceTable, now: Instant) -> Self {
        let mut services: Vec<ServiceStatus> = table
            .entries()
            .map(|(config, state)| service_status(config, state.map(|s| &**s), now))
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        Self { services }
    }
}

/// One service as its runtime `state` shows it, or, for a service no
/// connection has used yet (its state is built on first use, and not for
/// a status: a large cluster has thousands), as it would start: every
/// endpoint healthy and idle, every breaker empty.
fn service_status(
    config: &config::Service,
    state: Option<&Service>,
    now: Instant,
) -> ServiceStatus {
    let outlier = state.and_then(Service::outlier);
    let endpoints = config
        .endpoints
        .iter()
        .enumerate()
        .map(|(idx, ep)| {
            let health = outlier
                .as_ref()
                .map_or(HostState::Healthy, |o| o.state(idx));
            let mut status = EndpointStatus {
                address: ep.address.to_string(),
                weight: ep.weight,
                region: ep.region.clone(),
                zone: ep.zone.clone(),
                health: "healthy".into(),
                ejected_for_ms: None,
                ejections: None,
                probes_in_flight: None,
                probe_successes: None,
                active: state.map_or(0, |s| s.balancer.outstanding(idx)),
            };
            match health {
                HostState::Healthy => {}
                HostState::Ejected { until, times } => {
                    status.health = "ejected".into();
                    let left = until.saturating_duration_since(now).as_millis();
                    status.ejected_for_ms = Some(u64::try_from(left).unwrap_or(u64::MAX));
                    status.ejections = Some(times);
                }
                HostState::HalfOpen {
                    probes_in_flight,
                    successes,
                } => {
                    status.health = "half_open".into();
                    status.probes_in_flight = Some(probes_in_flight);
                    status.probe_successes = Some(successes);
                }
            }
            status
        })
        .collect();
    let pool = &config.traffic_policy.connection_pool;
    let circuit_breakers = Limit::ALL
        .iter()
        .map(|&limit| BreakerStatus {
            limit: limit.as_str().to_string(),
            in_use: state.map_or(0, |s| s.breaker.in_use(limit)),
            max: state.map_or(pool.max(limit), |s| s.breaker.max(limit)),
        })
        .collect();
    ServiceStatus {
        service: format!("{}/{}", config.namespace, config.name),
        vip: config.vip.to_string(),
        protocol: serde_json::to_value(config.protocol)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        outlier_detection: config.traffic_policy.outlier_detection.is_some(),
        circuit_breakers,
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MeshConfig;
    use crate::state::NodeContext;

    /// An unused service is shown from its config, as a fresh runtime
    /// state would show it, and showing it builds no state.
    #[test]
    fn an_unused_service_shows_as_a_fresh_one_without_being_built() {
        let yaml = "services:\n  - name: s\n    vip: 198.19.0.1:80\n    \
                    endpoints: [{address: 10.0.0.1:80, zone: a}, {address: 10.0.0.2:80, weight: 3}]\n    \
                    trafficPolicy: {connectionPool: {maxRequests: 7}}\n";
        let config = MeshConfig::parse(yaml, std::path::Path::new("t.yaml")).unwrap();
        let table = ServiceTable::build(&config, None, &NodeContext::default());
        let now = Instant::now();
        let shown = Clusters::of(&table, now);
        assert_eq!(table.services().count(), 0, "no runtime state built");
        let fresh = Service::new(&config.services[0], &NodeContext::default(), None);
        assert_eq!(
            shown.services,
            [service_status(&config.services[0], Some(&fresh), now)]
        );
    }
}
