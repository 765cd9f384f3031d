//! One locality priority level: its endpoints and the algorithm's prebuilt index over them.
//!
//! Each level gets its own schedule / ring / table, like Envoy's per-priority load balancers,
//! so choosing inside a level never walks into another level's endpoints.

use super::config::{self, Algorithm, LoadBalancerConfig};
use super::hash::GOLDEN;
use super::locality::LevelHealth;
use super::maglev::Maglev;
use super::ring::Ring;
use super::wrr::Wrr;
use super::{EndpointSpec, hash_key, p2c};

/// Table size used when a programmatically built config carries an invalid one.
const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

#[derive(Debug)]
pub(super) struct Level {
    /// Endpoint indices, ascending.
    members: Vec<u32>,
    total_weight: u64,
    index: Index,
}

#[derive(Debug)]
enum Index {
    /// Random, least request and peak EWMA need nothing prebuilt.
    None,
    RoundRobin(Wrr),
    Ring(Ring),
    Maglev(Maglev),
}

impl Level {
    /// `None` for a level without endpoints: empty levels are dropped, so they take no load.
    pub fn new(
        cfg: &LoadBalancerConfig,
        members: Vec<u32>,
        endpoints: &[EndpointSpec],
        weights: &[u64],
    ) -> Option<Level> {
        if members.is_empty() {
            return None;
        }
        let member_weights: Vec<u64> = members
            .iter()
            .map(|&m| weights.get(m as usize).copied().unwrap_or(1))
            .collect();
        let address_hashes = || -> Vec<u64> {
            members
                .iter()
                .map(|&m| identity(m, endpoints.get(m as usize)))
                .collect()
        };
        let index = match cfg.algorithm {
            Algorithm::RoundRobin => Index::RoundRobin(Wrr::new(&members, &member_weights)),
            Algorithm::Random | Algorithm::LeastRequest | Algorithm::PeakEwma => Index::None,
            Algorithm::RingHash => Index::Ring(Ring::new(
                &members,
                &member_weights,
                &address_hashes(),
                cfg.ring_size,
            )),
            Algorithm::Maglev => Index::Maglev(Maglev::new(
                &members,
                &member_weights,
                &address_hashes(),
                maglev_size(cfg.maglev_table_size),
            )),
        };
        Some(Level {
            total_weight: member_weights.iter().fold(0, |s, &w| s.saturating_add(w)),
            members,
            index,
        })
    }

    /// Total and available weight of the level for this pick.
    pub fn health(&self, weights: &[u64], available: impl Fn(usize) -> bool) -> LevelHealth {
        let available = self
            .members
            .iter()
            .map(|&m| m as usize)
            .filter(|&m| available(m))
            .fold(0u64, |s, m| {
                s.saturating_add(weights.get(m).copied().unwrap_or(1))
            });
        LevelHealth {
            total: self.total_weight,
            available,
        }
    }

    /// Whether any member passes `ok`.
    pub fn any(&self, ok: impl Fn(usize) -> bool) -> bool {
        self.members.iter().any(|&m| ok(m as usize))
    }

    pub fn round_robin(
        &self,
        rng: &mut fastrand::Rng,
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match &self.index {
            Index::RoundRobin(w) => w.pick(rng, ok),
            _ => None,
        }
    }

    /// Consistent-hash choice; `None` if the level has no ring / table or nothing usable.
    pub fn consistent(&self, hash: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.index {
            Index::Ring(r) => r.pick(hash, ok),
            Index::Maglev(m) => m.pick(hash, ok),
            _ => None,
        }
    }

    /// See [`p2c::best_of`].
    pub fn best_of(
        &self,
        weights: &[u64],
        choices: usize,
        rng: &mut fastrand::Rng,
        ok: impl Fn(usize) -> bool,
        cost: impl Fn(usize) -> f64,
    ) -> Option<usize> {
        p2c::best_of(&self.members, weights, choices, rng, ok, cost)
    }
}

fn maglev_size(size: u64) -> u64 {
    if size <= config::MAX_MAGLEV_TABLE_SIZE && config::is_prime(size) {
        size
    } else {
        DEFAULT_MAGLEV_TABLE_SIZE
    }
}

/// Hash of an endpoint's stable identity. Without an address, fall back to its list position:
/// still well spread (identical hashes would stack every endpoint on the same ring points), but
/// consistent only while the list order is.
fn identity(index: u32, endpoint: Option<&EndpointSpec>) -> u64 {
    match endpoint {
        Some(e) if !e.address.is_empty() => hash_key(e.address.as_bytes()),
        _ => hash_key(&index.to_le_bytes()) ^ GOLDEN,
    }
}
