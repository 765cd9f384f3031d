//! One service's runtime state.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::balance::{Balancer, EndpointSpec, Locality, Pick};
use crate::config;
use crate::health::{Admission, Event, Outcome, OutlierDetector};
use crate::metrics::{EndpointLabels, ServiceCounters, ServiceLabels};
use crate::ratelimit::RateLimiter;
use crate::resilience::{CircuitBreaker, RetryBudget};
use crate::upstream::{EndpointPool, PoolSettings};

use super::NodeContext;

/// One endpoint as the proxy uses it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// Metric labels, built once rather than per request.
    pub labels: EndpointLabels,
    /// Upstream HTTP connections to this endpoint.
    pub pool: Arc<EndpointPool>,
}

/// One service as the proxy uses it.
#[derive(Debug)]
pub struct Service {
    /// `namespace/name`, for logs and metrics.
    pub id: String,
    pub labels: ServiceLabels,
    /// Counters resolved on first use by this version of the service.
    pub counters: ServiceCounters,
    /// The config this runtime state was built from.
    pub config: Arc<config::Service>,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    /// `None` when outlier detection is off.
    outlier: Option<Mutex<OutlierDetector>>,
    /// No endpoint ejected or half-open, as of the detector's last change:
    /// then every endpoint is available and admitted, and a pick reads
    /// this instead of taking the detector's lock and asking it about
    /// each endpoint (the common case, on every request). Written under
    /// the lock whenever a host's state may have changed.
    all_healthy: AtomicBool,
    pub budget: Arc<RetryBudget>,
    pub breaker: Arc<CircuitBreaker>,
    pub limiter: Option<Arc<RateLimiter>>,
}

/// An endpoint chosen for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chosen {
    pub index: usize,
    /// The endpoint is half-open and this attempt is one of its probes:
    /// its outcome must be recorded.
    pub probe: bool,
}

impl Service {
    /// Builds the state for `cfg`. From `old` (the previous version of the
    /// same VIP) it keeps what must survive a reload: breaker occupancy,
    /// retry budget, rate-limit buckets and connection pools when their
    /// settings did not change, and the health of remaining endpoints.
    pub fn new(cfg: &Arc<config::Service>, node: &NodeContext, old: Option<&Service>) -> Self {
        let id = format!("{}/{}", cfg.namespace, cfg.name);
        let policy = &cfg.traffic_policy;
        let breaker = match old {
            Some(old) => {
                old.breaker.update(&policy.connection_pool);
                Arc::clone(&old.breaker)
            }
            None => Arc::new(CircuitBreaker::new(&policy.connection_pool)),
        };
        // Compared structurally: what did not change carries over, so a
        // timeout change keeps the budget, the rate-limit buckets and every
        // pool whose own settings are the same.
        let budget = match old.filter(|o| o.policy().retries.budget == policy.retries.budget) {
            Some(old) => Arc::clone(&old.budget),
            None => Arc::new(RetryBudget::new(&policy.retries.budget)),
        };
        let limiter = match old.filter(|o| o.policy().rate_limit == policy.rate_limit) {
            Some(old) => old.limiter.clone(),
            None => build_limiter(&id, policy),
        };
        let endpoints: Vec<Endpoint> = cfg
            .endpoints
            .iter()
            .map(|ep| endpoint(&id, ep.address, node, &breaker, policy, old))
            .collect();
        let outlier = policy
            .outlier_detection
            .clone()
            .map(|cfg| carry_over_health(cfg, &endpoints, old));
        let all_healthy = AtomicBool::new(
            outlier
                .as_ref()
                .is_none_or(|detector| detector.ejections_active() == 0),
        );
        let outlier = outlier.map(Mutex::new);
        Self {
            balancer: Balancer::new(&policy.load_balancer, &endpoint_specs(cfg), &node.locality),
            labels: ServiceLabels {
                service: id.clone(),
            },
            id,
            counters: ServiceCounters::default(),
            config: Arc::clone(cfg),
            endpoints,
            outlier,
            all_healthy,
            budget,
            breaker,
            limiter,
        }
    }

    pub fn policy(&self) -> &config::TrafficPolicy {
        &self.config.traffic_policy
    }

    /// The outlier detector, if enabled. A poisoned lock (a panic while it
    /// was held) still holds consistent-enough counters to go on with.
    ///
    /// Changes go through [`Service::record_outcome`], [`Service::pick`],
    /// [`Service::release_probe`] and [`Service::tick_outlier`], which
    /// keep `all_healthy` true to the detector.
    pub(crate) fn outlier(&self) -> Option<MutexGuard<'_, OutlierDetector>> {
        self.outlier
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Chooses an endpoint outlier detection lets through, not in `tried`
    /// when possible, and admits it (taking a probe slot of a half-open
    /// endpoint) under the same lock, so that concurrent requests cannot
    /// exceed a half-open endpoint's probes. `available` is scratch space.
    pub fn pick(
        &self,
        tried: &[usize],
        hash: Option<u64>,
        available: &mut Vec<bool>,
        rng: &mut fastrand::Rng,
    ) -> Option<Chosen> {
        let now = Instant::now();
        // Every endpoint healthy (or no detection): all available (an
        // empty slice says so), and a healthy endpoint is always admitted.
        let locked = if self.all_healthy.load(Ordering::Acquire) {
            None
        } else {
            self.outlier()
        };
        let Some(mut outlier) = locked else {
            let pick = Pick {
                available: &[],
                exclude: tried,
                hash,
            };
            let index = self.balancer.pick(&pick, rng, now)?;
            return Some(Chosen {
                index,
                probe: false,
            });
        };
        available.clear();
        available.resize(self.endpoints.len(), true);
        outlier.fill_available(available, now);
        let pick = Pick {
            available,
            exclude: tried,
            hash,
        };
        let index = self.balancer.pick(&pick, rng, now)?;
        let admission = outlier.admit(index, now);
        // Admitting applies due clock transitions (an ejection ending).
        self.note_health(&outlier);
        match admission {
            Admission::Yes => Some(Chosen {
                index,
                probe: false,
            }),
            Admission::Probe => Some(Chosen { index, probe: true }),
            // Ejected or out of probe slots: the balancer only returns such
            // an endpoint in panic mode, where it is used anyway.
            Admission::No => Some(Chosen {
                index,
                probe: false,
            }),
        }
    }

    /// Tells outlier detection how a request or connection to
    /// `endpoints[index]` went; returns the state change it caused, for the
    /// caller to report.
    #[must_use = "report the event (metrics, log)"]
    pub fn record_outcome(&self, index: usize, outcome: Outcome) -> Option<Event> {
        let mut outlier = self.outlier()?;
        let event = outlier.record(index, outcome, Instant::now());
        // An outcome without an event leaves healthy hosts healthy.
        if event.is_some() || !self.all_healthy.load(Ordering::Acquire) {
            self.note_health(&outlier);
        }
        event
    }

    /// Ends due ejections and runs due interval checks; returns what
    /// changed, for the caller to report.
    pub fn tick_outlier(&self, now: Instant) -> Vec<Event> {
        let Some(mut outlier) = self.outlier() else {
            return Vec::new();
        };
        let events = outlier.tick(now);
        if !events.is_empty() || !self.all_healthy.load(Ordering::Acquire) {
            self.note_health(&outlier);
        }
        events
    }

    /// Keeps `all_healthy` true to `outlier` (called with its lock held,
    /// so writes are ordered as the detector's changes are).
    fn note_health(&self, outlier: &OutlierDetector) {
        self.all_healthy
            .store(outlier.ejections_active() == 0, Ordering::Release);
    }

    /// Gives back the probe slot of a half-open endpoint whose request
    /// ended with no verdict on the endpoint (the client went away).
    pub fn release_probe(&self, index: usize) {
        if let Some(mut outlier) = self.outlier() {
            outlier.release_probe(index);
            self.note_health(&outlier);
        }
    }

    /// The address of `endpoints[index]`, for reports.
    pub fn endpoint_addr(&self, index: usize) -> Option<SocketAddrV4> {
        self.endpoints.get(index).map(|ep| ep.addr)
    }
}

fn endpoint(
    service: &str,
    addr: SocketAddrV4,
    node: &NodeContext,
    breaker: &Arc<CircuitBreaker>,
    policy: &config::TrafficPolicy,
    old: Option<&Service>,
) -> Endpoint {
    let settings = PoolSettings {
        endpoint: addr,
        mark: node.mark,
        connect_timeout: policy.timeouts.connect,
        idle_timeout: policy.timeouts.idle,
    };
    // Reused across versions while its settings are the same, so that
    // idle connections are not orphaned (they hold maxConnections slots).
    let pool = old
        .and_then(|old| old.endpoints.iter().find(|ep| ep.addr == addr))
        .map(|ep| &ep.pool)
        .filter(|pool| *pool.settings() == settings)
        .map(Arc::clone)
        .unwrap_or_else(|| EndpointPool::new(settings, Arc::clone(breaker)));
    Endpoint {
        addr,
        labels: EndpointLabels {
            service: service.to_string(),
            endpoint: addr.to_string(),
        },
        pool,
    }
}

fn endpoint_specs(cfg: &config::Service) -> Vec<EndpointSpec> {
    cfg.endpoints
        .iter()
        .map(|ep| EndpointSpec {
            address: ep.address.to_string(),
            weight: ep.weight,
            locality: Locality {
                region: ep.region.clone(),
                zone: ep.zone.clone(),
            },
        })
        .collect()
}

/// The config was validated when parsed; a limiter that still cannot be
/// built is logged and left out rather than failing the reload.
fn build_limiter(id: &str, policy: &config::TrafficPolicy) -> Option<Arc<RateLimiter>> {
    let cfg = policy.rate_limit.as_ref()?;
    RateLimiter::new(cfg)
        .inspect_err(|err| tracing::error!(service = %id, %err, "rate limit not applied"))
        .ok()
        .map(Arc::new)
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
