//! Ring hash and Maglev: stickiness, weights, minimal disruption, unusable endpoints.

use std::time::Instant;

use super::{assert_close, balancer, ep, plain};
use crate::balance::{Balancer, EndpointSpec, Pick, hash_key};

const RING: &str = "algorithm: ringHash\nhash: {header: x-user}";
const MAGLEV: &str = "algorithm: maglev\nhash: {header: x-user}";
const KEYS: u64 = 20_000;

/// Address chosen for each of `KEYS` user keys.
fn owners(b: &Balancer, eps: &[EndpointSpec], available: &[bool]) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(1);
    (0..KEYS)
        .map(|k| {
            let req = Pick {
                available,
                exclude: &[],
                hash: Some(hash_key(format!("user-{k}").as_bytes())),
            };
            let i = b.pick(&req, &mut rng, Instant::now()).unwrap();
            eps[i].address.clone()
        })
        .collect()
}

fn moved(a: &[String], b: &[String]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

fn share(owners: &[String], address: &str) -> f64 {
    owners.iter().filter(|o| *o == address).count() as f64 / owners.len() as f64
}

fn same_key_same_endpoint(yaml: &str) {
    let eps = plain(8);
    let a = owners(&balancer(yaml, &eps), &eps, &[]);
    // A balancer built elsewhere, with the endpoints listed in another order, agrees.
    let mut reversed = eps.clone();
    reversed.reverse();
    let b = owners(&balancer(yaml, &reversed), &reversed, &[]);
    assert_eq!(moved(&a, &b), 0.0, "endpoint order changed the mapping");
    for e in &eps {
        assert_close(share(&a, &e.address), 1.0 / 8.0, 0.06, &e.address);
    }
}

fn weights_are_respected(yaml: &str, tolerance: f64) {
    let eps = vec![ep("a:80", 1, "", ""), ep("b:80", 3, "", "")];
    let o = owners(&balancer(yaml, &eps), &eps, &[]);
    assert_close(share(&o, "b:80"), 0.75, tolerance, "weight 3 of 4");
}

/// Removing one of ten endpoints moves its keys (~1/10) and at most `extra` of the others.
fn removal_is_minimally_disruptive(yaml: &str, extra: f64) -> f64 {
    let eps = plain(10);
    let before = owners(&balancer(yaml, &eps), &eps, &[]);
    let mut fewer = eps.clone();
    let removed = fewer.remove(3).address;
    let after = owners(&balancer(yaml, &fewer), &fewer, &[]);
    let orphans = share(&before, &removed);
    let m = moved(&before, &after);
    assert!(m >= orphans, "every key of the removed endpoint moves");
    assert!(m <= orphans + extra, "moved {m}, orphaned {orphans}");
    assert_close(m, 0.1, 0.05 + extra, "about 1/N moves");
    m
}

/// An unavailable endpoint's keys go elsewhere, nobody else's move, and they come back.
fn unavailable_endpoint_keeps_others_sticky(yaml: &str) {
    let eps = plain(6);
    let b = balancer(yaml, &eps);
    let all = owners(&b, &eps, &[]);
    let ejected = [true, true, false, true, true, true];
    let during = owners(&b, &eps, &ejected);
    assert!(!during.contains(&eps[2].address));
    for (x, y) in all.iter().zip(&during) {
        if *x != eps[2].address {
            assert_eq!(x, y, "a key not on the ejected endpoint moved");
        }
    }
    assert_eq!(
        moved(&owners(&b, &eps, &ejected), &during),
        0.0,
        "deterministic"
    );
    assert_eq!(
        moved(&owners(&b, &eps, &[]), &all),
        0.0,
        "keys return on recovery"
    );
}

#[test]
fn ring_hash_same_key_same_endpoint() {
    same_key_same_endpoint(RING);
}

#[test]
fn maglev_same_key_same_endpoint() {
    same_key_same_endpoint(MAGLEV);
}

#[test]
fn ring_hash_respects_weights() {
    weights_are_respected(&format!("{RING}\nringSize: 16384"), 0.03);
}

#[test]
fn maglev_respects_weights() {
    weights_are_respected(MAGLEV, 0.015);
}

#[test]
fn ring_hash_removal_moves_only_the_removed_endpoints_keys() {
    // Power-of-two points per weight: survivors keep every point, so nothing else moves.
    assert_eq!(removal_is_minimally_disruptive(RING, 0.0), {
        let eps = plain(10);
        share(&owners(&balancer(RING, &eps), &eps, &[]), &eps[3].address)
    });
}

#[test]
fn maglev_removal_is_minimally_disruptive() {
    // The paper's Maglev moves a few percent beyond the removed endpoint's own keys.
    removal_is_minimally_disruptive(MAGLEV, 0.05);
}

#[test]
fn ring_hash_unavailable_endpoint_keeps_others_sticky() {
    unavailable_endpoint_keeps_others_sticky(RING);
}

#[test]
fn maglev_unavailable_endpoint_keeps_others_sticky() {
    unavailable_endpoint_keeps_others_sticky(MAGLEV);
}

#[test]
fn maglev_spreads_an_unavailable_endpoints_keys() {
    // Rehashing hands the orphaned keys to many endpoints, unlike a ring successor.
    let eps = plain(6);
    let b = balancer(MAGLEV, &eps);
    let all = owners(&b, &eps, &[]);
    let during = owners(&b, &eps, &[false, true, true, true, true, true]);
    let mut heirs: Vec<&String> = all
        .iter()
        .zip(&during)
        .filter(|(x, _)| **x == eps[0].address)
        .map(|(_, y)| y)
        .collect();
    heirs.sort();
    heirs.dedup();
    assert_eq!(heirs.len(), 5);
}

#[test]
fn without_a_hash_consistent_algorithms_fall_back_to_random() {
    for yaml in [RING, MAGLEV] {
        let b = balancer(yaml, &plain(4));
        let c = super::counts(&b, &Pick::default(), 8000, 3);
        for n in c {
            assert_close(n as f64 / 8000.0, 0.25, 0.03, yaml);
        }
    }
}

#[test]
fn endpoints_without_addresses_still_spread() {
    // Identical (empty) identities would put every endpoint on the same points.
    let eps: Vec<EndpointSpec> = (0..4).map(|_| ep("", 1, "", "")).collect();
    for yaml in [RING, MAGLEV] {
        let b = balancer(yaml, &eps);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut seen = [0usize; 4];
        for k in 0..4000u64 {
            let req = Pick {
                hash: Some(k),
                ..Pick::default()
            };
            if let Some(i) = b.pick(&req, &mut rng, Instant::now()) {
                seen[i] += 1;
            }
        }
        for n in seen {
            assert_close(n as f64 / 4000.0, 0.25, 0.07, yaml);
        }
    }
}
