//! Behaviour tests of the public API. Every test is deterministic: seeded `fastrand::Rng`,
//! time as offsets from one `Instant`.

use std::time::Instant;

use super::{Balancer, EndpointSpec, LoadBalancerConfig, Locality, Pick};

mod algorithms;
mod consistent;
mod edge;
mod locality;
mod parsing;
mod peak_ewma;
mod retries;

pub(super) fn loc(region: &str, zone: &str) -> Locality {
    Locality {
        region: region.into(),
        zone: zone.into(),
    }
}

pub(super) fn ep(address: &str, weight: u32, region: &str, zone: &str) -> EndpointSpec {
    EndpointSpec {
        address: address.into(),
        weight,
        locality: loc(region, zone),
    }
}

/// `n` endpoints of weight 1 with addresses `10.0.0.<i>:80`, no locality.
pub(super) fn plain(n: usize) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| ep(&format!("10.0.0.{i}:80"), 1, "", ""))
        .collect()
}

pub(super) fn cfg(yaml: &str) -> LoadBalancerConfig {
    match serde_yaml_ng::from_str(yaml) {
        Ok(c) => c,
        Err(e) => panic!("bad test config {yaml:?}: {e}"),
    }
}

pub(super) fn balancer(yaml: &str, endpoints: &[EndpointSpec]) -> Balancer {
    Balancer::new(&cfg(yaml), endpoints, &Locality::default())
}

/// How many of `picks` picks went to each endpoint (`None`s are not counted).
pub(super) fn counts(b: &Balancer, req: &Pick<'_>, picks: usize, seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let now = Instant::now();
    let mut out = vec![0; b.len()];
    for _ in 0..picks {
        if let Some(i) = b.pick(req, &mut rng, now) {
            out[i] += 1;
        }
    }
    out
}

/// Fractions of `counts`, for tolerance checks.
pub(super) fn shares(counts: &[usize]) -> Vec<f64> {
    let total: usize = counts.iter().sum();
    counts
        .iter()
        .map(|&c| c as f64 / total.max(1) as f64)
        .collect()
}

pub(super) fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tolerance,
        "{what}: got {actual:.4}, expected {expected:.4} +- {tolerance}"
    );
}
