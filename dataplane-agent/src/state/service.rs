//! One service's runtime state.

use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::balance::{Balancer, EndpointSpec, Locality, Pick};
use crate::config;
use crate::health::{Outcome, OutlierDetector};
use crate::metrics::EndpointLabels;
use crate::proxy::http::upstream::{Clients, Connector};
use crate::ratelimit::RateLimiter;
use crate::resilience::{CircuitBreaker, RetryBudget};

use super::NodeContext;

/// One endpoint as the proxy uses it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// Metric labels, built once rather than per request.
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
    pub balancer: Balancer,
    /// `None` when outlier detection is off.
    outlier: Option<Mutex<OutlierDetector>>,
    pub budget: Arc<RetryBudget>,
    pub breaker: Arc<CircuitBreaker>,
    pub limiter: Option<RateLimiter>,
    pub clients: Clients,
}

impl Service {
    pub fn new(cfg: &config::Service, node: &NodeContext, old: Option<&Service>) -> Self {
        let id = format!("{}/{}", cfg.namespace, cfg.name);
        let policy = &cfg.traffic_policy;
        let endpoints: Vec<Endpoint> = cfg
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
        let specs: Vec<EndpointSpec> = cfg
            .endpoints
            .iter()
            .map(|ep| EndpointSpec {
                address: ep.address.to_string(),
                weight: ep.weight,
                locality: Locality {
                    region: ep.region.clone(),
                    zone: ep.zone.clone(),
                },
            })
            .collect();
        let breaker = match old {
            // Keeps the permits of requests in flight counted.
            Some(old) => {
                old.breaker.update(&policy.connection_pool);
                Arc::clone(&old.breaker)
            }
            None => Arc::new(CircuitBreaker::new(&policy.connection_pool)),
        };
        let budget = match old {
            Some(old) if old.policy().retries.budget == policy.retries.budget => {
                Arc::clone(&old.budget)
            }
            _ => Arc::new(RetryBudget::new(&policy.retries.budget)),
        };
        let outlier = policy
            .outlier_detection
            .clone()
            .map(|cfg| Mutex::new(carry_over_health(cfg, &endpoints, old)));
        let connector = Connector {
            mark: node.mark,
            connect_timeout: policy.timeouts.connect,
            breaker: Arc::clone(&breaker),
        };
        // The config was validated when parsed; a limiter that still cannot
        // be built is logged and left out rather than failing the reload.
        let limiter = policy.rate_limit.as_ref().and_then(|cfg| {
            RateLimiter::new(cfg)
                .inspect_err(|err| tracing::error!(service = %id, %err, "rate limit not applied"))
                .ok()
        });
        Self {
            limiter,
            balancer: Balancer::new(&policy.load_balancer, &specs, &node.locality),
            id,
            config: cfg.clone(),
            endpoints,
            outlier,
            budget,
            breaker,
            clients: Clients::new(connector, policy.timeouts.idle),
        }
    }

    pub fn policy(&self) -> &config::TrafficPolicy {
        &self.config.traffic_policy
    }

    /// The outlier detector, if enabled. A poisoned lock (a panic while it
    /// was held) still holds consistent-enough counters to go on with.
    pub fn outlier(&self) -> Option<MutexGuard<'_, OutlierDetector>> {
        self.outlier
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Chooses an endpoint not in `exclude` (when possible) among those
    /// outlier detection lets through. `available` is scratch space.
    pub fn pick(
        &self,
        exclude: &[usize],
        hash: Option<u64>,
        available: &mut Vec<bool>,
    ) -> Option<usize> {
        let now = Instant::now();
        available.clear();
        available.resize(self.endpoints.len(), true);
        if let Some(outlier) = self.outlier() {
            outlier.fill_available(available, now);
        }
        let pick = Pick {
            available,
            exclude,
            hash,
        };
        self.balancer.pick(&pick, &mut fastrand::Rng::new(), now)
    }
}

impl Service {
    /// Tells outlier detection how a request or connection to
    /// `endpoints[index]` went, reporting any state change it causes.
    pub fn record_outcome(&self, proxy: &crate::proxy::Proxy, index: usize, outcome: Outcome) {
        let event = self
            .outlier()
            .and_then(|mut outlier| outlier.record(index, outcome, Instant::now()));
        if let Some(event) = event {
            proxy.metrics.outlier_event(self, &event);
        }
    }

    /// Lets a half-open endpoint count this request as one of its probes.
    pub fn admit(&self, index: usize) {
        if let Some(mut outlier) = self.outlier() {
            let _ = outlier.admit(index, Instant::now());
        }
    }
}

/// A new detector for the new endpoint list, keeping the health of
/// endpoints that were already there.
fn carry_over_health(
    cfg: crate::health::OutlierDetectionConfig,
    endpoints: &[Endpoint],
    old: Option<&Service>,
) -> OutlierDetector {
    let now = Instant::now();
    let Some(old_detector) = old.and_then(Service::outlier) else {
        return OutlierDetector::new(cfg, endpoints.len(), now);
    };
    let mut detector = old_detector.clone();
    drop(old_detector);
    let old = old.map(|o| &o.endpoints[..]).unwrap_or_default();
    let keep: Vec<Option<usize>> = endpoints
        .iter()
        .map(|ep| old.iter().position(|o| o.addr == ep.addr))
        .collect();
    detector.set_config(cfg);
    detector.set_endpoints(&keep, now);
    detector
}
