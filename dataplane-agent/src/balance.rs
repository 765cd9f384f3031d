//! Endpoint selection for one version of a service's endpoint set.
//!
//! A [`Balancer`] is built once per (config, endpoint list, caller locality) and shared by every
//! task of the node proxy that sends to the service. Per request the integrator calls
//! [`Balancer::pick`] with the outlier-detection state, the hosts this request already tried and
//! (for ring hash / Maglev) the request's hash; it brackets each request with
//! [`Balancer::on_start`] / [`Balancer::on_end`] so least request and peak EWMA see the load.
//!
//! Selection is two-staged, as in Envoy: first a locality priority level is chosen by the
//! priority load (Envoy's priority levels, see `locality.rs`), then an endpoint inside it by the configured algorithm.

use std::time::{Duration, Instant};

pub mod config;
mod hash;
mod level;
mod locality;
mod maglev;
mod p2c;
mod ring;
#[cfg(test)]
mod tests;
mod wrr;

pub use config::{
    Algorithm, HashConfig, HashSource, LoadBalancerConfig, LocalityConfig, PeakEwmaConfig,
};
pub use hash::hash_key;

use level::Level;
use locality::{LevelHealth, MAX_LEVELS, Plan};
use p2c::Load;

/// Where an endpoint (or the calling node) runs. An empty string means unknown.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Locality {
    pub region: String,
    pub zone: String,
}

/// One endpoint of the service, as given to [`Balancer::new`]. Its index in that slice is the
/// endpoint's identity for `pick`, `available`, `exclude`, `on_start` and `on_end`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointSpec {
    /// Stable identity hashed by ring hash and Maglev (e.g. `"10.1.2.3:8080"`, what Envoy
    /// hashes). Consistent hashing only stays consistent across endpoint-set changes if this
    /// does not depend on the endpoint's position in the list; it must be unique within the
    /// service. Empty means "use the list position". Other algorithms ignore it.
    pub address: String,
    /// Relative weight. 0 is treated as 1, as Envoy treats an unset `load_balancing_weight`:
    /// Kubernetes endpoints carry no weight, and a zero would silently black-hole an endpoint.
    /// (Draining is expressed by removing the endpoint, not by weight.)
    pub weight: u32,
    pub locality: Locality,
}

/// The per-request inputs of [`Balancer::pick`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Pick<'a> {
    /// Per endpoint: not ejected by outlier detection. Missing entries (a shorter slice) count
    /// as available, the state of an endpoint outlier detection has no opinion about.
    pub available: &'a [bool],
    /// Endpoints this request already tried (retries). They are avoided while any other usable
    /// endpoint exists, in the chosen locality level or, failing that, in the nearest other
    /// level; only then is an excluded endpoint returned, since retrying the same host beats
    /// failing the request.
    pub exclude: &'a [usize],
    /// Request hash for ring hash / Maglev (see [`hash_key`]); `None` means weighted random.
    pub hash: Option<u64>,
}

/// Load balancer for one version of a service's endpoint set. `Send + Sync`; every method
/// takes `&self`.
///
/// The outstanding counts and latency estimates live in this value: a balancer rebuilt for a
/// new endpoint set starts from zero, so a request must report `on_end` to the balancer it was
/// picked from (hold an `Arc` to it), not to its successor.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    choices: usize,
    /// Effective weights (>= 1), by endpoint index.
    weights: Vec<u64>,
    /// Non-empty levels in priority order (a single one when locality is not in use).
    levels: Vec<Level>,
    load: Load,
    overprovisioning: f64,
    panic_threshold: f64,
}

impl Balancer {
    /// Builds the balancer. Never fails: out-of-range settings in a config built without
    /// deserialization are clamped to the validated ranges.
    pub fn new(cfg: &LoadBalancerConfig, endpoints: &[EndpointSpec], caller: &Locality) -> Self {
        let endpoints = &endpoints[..endpoints.len().min(u32::MAX as usize)];
        let weights: Vec<u64> = endpoints
            .iter()
            .map(|e| u64::from(e.weight.max(1)))
            .collect();
        let use_locality = cfg.locality.enabled && !caller.region.is_empty();
        let level_of = |e: &EndpointSpec| {
            if use_locality {
                locality::priority(&e.locality, caller)
            } else {
                0
            }
        };
        let levels = (0..MAX_LEVELS as u8)
            .filter_map(|l| {
                let members: Vec<u32> = (0..endpoints.len() as u32)
                    .filter(|&i| level_of(&endpoints[i as usize]) == l)
                    .collect();
                Level::new(cfg, members, endpoints, &weights)
            })
            .collect();
        let factor = cfg.locality.overprovisioning_factor;
        Balancer {
            algorithm: cfg.algorithm,
            choices: cfg.choice_count.clamp(2, config::MAX_CHOICE_COUNT) as usize,
            load: Load::new(
                endpoints.len(),
                (cfg.algorithm == Algorithm::PeakEwma).then_some(&cfg.peak_ewma),
            ),
            weights,
            levels,
            overprovisioning: if factor.is_finite() && factor > 0.0 {
                factor
            } else {
                140.0
            },
            panic_threshold: clamp_percent(cfg.panic_threshold),
        }
    }

    /// Chooses the endpoint for a request or connection attempt; `None` when there is no
    /// endpoint, or all are ejected and panic mode is disabled (or not reached).
    ///
    /// Cost: O(endpoints) per call to weigh the levels against `available` (plus the
    /// algorithm's own work), and no allocation.
    pub fn pick(&self, req: &Pick<'_>, rng: &mut fastrand::Rng, now: Instant) -> Option<usize> {
        let available = |i: usize| req.available.get(i).copied().unwrap_or(true);
        let mut health = [LevelHealth::default(); MAX_LEVELS];
        for (h, level) in health.iter_mut().zip(&self.levels) {
            *h = level.health(&self.weights, available);
        }
        let plan = Plan::new(
            &health[..self.levels.len()],
            self.overprovisioning,
            self.panic_threshold,
        )?;
        // Consistent hashing must also choose the level consistently (Envoy uses the hash for
        // `choosePriority` too); everything else uses the random number.
        let u = match (self.algorithm.is_hash(), req.hash) {
            (true, Some(h)) => hash::unit(hash::mix64(h ^ hash::GOLDEN)),
            _ => rng.f64(),
        };
        let chosen = plan.choose(u);
        let usable = |l: usize, i: usize| plan.panic[l] || available(i);
        let fresh = |l: usize, i: usize| usable(l, i) && !req.exclude.contains(&i);
        if req.exclude.is_empty() {
            return self.pick_in(chosen, req.hash, rng, now, |i| usable(chosen, i));
        }
        let others = (0..self.levels.len()).filter(|&l| l != chosen);
        // The cheap `any` check keeps a level whose usable endpoints are all excluded from
        // costing a full ring walk or Maglev table scan.
        std::iter::once(chosen)
            .chain(others)
            .filter(|&l| self.levels.get(l).is_some_and(|lv| lv.any(|i| fresh(l, i))))
            .find_map(|l| self.pick_in(l, req.hash, rng, now, |i| fresh(l, i)))
            .or_else(|| self.pick_in(chosen, req.hash, rng, now, |i| usable(chosen, i)))
    }

    /// Balances inside level `l` over the endpoints accepted by `ok`.
    fn pick_in(
        &self,
        l: usize,
        hash: Option<u64>,
        rng: &mut fastrand::Rng,
        now: Instant,
        ok: impl Fn(usize) -> bool + Copy,
    ) -> Option<usize> {
        let level = self.levels.get(l)?;
        let w = |i: usize| self.weights.get(i).copied().unwrap_or(1);
        match self.algorithm {
            Algorithm::RoundRobin => level.round_robin(rng, ok),
            Algorithm::Random => level.best_of(&self.weights, 1, rng, ok, |_| 0.0),
            Algorithm::LeastRequest => level.best_of(&self.weights, self.choices, rng, ok, |i| {
                self.load.least_request_cost(i, w(i))
            }),
            Algorithm::PeakEwma => level.best_of(&self.weights, self.choices, rng, ok, |i| {
                self.load.peak_ewma_cost(i, w(i), now)
            }),
            Algorithm::RingHash | Algorithm::Maglev => match hash {
                Some(h) => level.consistent(h, ok),
                None => None,
            }
            .or_else(|| level.best_of(&self.weights, 1, rng, ok, |_| 0.0)),
        }
    }

    /// A request (or connection) to endpoint `idx` starts. Out-of-range indices are ignored.
    pub fn on_start(&self, idx: usize) {
        self.load.start(idx);
    }

    /// The request to `idx` ended; `rtt` feeds peak EWMA (pass `None` for requests whose
    /// latency says nothing about the endpoint, e.g. cancelled ones).
    pub fn on_end(&self, idx: usize, rtt: Option<Duration>, now: Instant) {
        self.load.end(idx, rtt, now);
    }

    /// Requests currently outstanding on `idx` (for metrics and tests).
    pub fn outstanding(&self, idx: usize) -> u64 {
        self.load.outstanding(idx)
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// True when built with no endpoint (every pick returns `None`).
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }
}

fn clamp_percent(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) }
}
