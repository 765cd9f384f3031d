//! Round robin, random and least request: distribution, weights, availability.

use std::time::Instant;

use super::{assert_close, balancer, counts, ep, plain, shares};
use crate::balance::Pick;

fn weighted(weights: &[u32]) -> Vec<crate::balance::EndpointSpec> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| ep(&format!("10.0.1.{i}:80"), w, "", ""))
        .collect()
}

#[test]
fn round_robin_with_equal_weights_cycles_in_order() {
    let b = balancer("algorithm: roundRobin", &plain(4));
    let mut rng = fastrand::Rng::with_seed(7);
    let now = Instant::now();
    let picks: Vec<usize> = (0..12)
        .filter_map(|_| b.pick(&Pick::default(), &mut rng, now))
        .collect();
    assert_eq!(picks.len(), 12);
    for w in picks.windows(2) {
        assert_eq!(w[1], (w[0] + 1) % 4, "{picks:?}");
    }
}

#[test]
fn round_robin_weights_are_exact_over_a_cycle() {
    let b = balancer("algorithm: roundRobin", &weighted(&[1, 2, 3]));
    assert_eq!(counts(&b, &Pick::default(), 600, 1), [100, 200, 300]);
    // Weight 0 counts as 1.
    let b = balancer("algorithm: roundRobin", &weighted(&[0, 1]));
    assert_eq!(counts(&b, &Pick::default(), 100, 1), [50, 50]);
}

#[test]
fn round_robin_shares_an_ejected_endpoints_turns_evenly() {
    let b = balancer("algorithm: roundRobin", &plain(4));
    let available = [true, false, true, true];
    let req = Pick {
        available: &available,
        ..Pick::default()
    };
    assert_eq!(counts(&b, &req, 300, 3), [100, 0, 100, 100]);
}

#[test]
fn random_follows_weights() {
    let b = balancer("algorithm: random", &weighted(&[1, 3, 0]));
    let s = shares(&counts(&b, &Pick::default(), 50_000, 11));
    assert_close(s[0], 0.2, 0.01, "weight 1");
    assert_close(s[1], 0.6, 0.01, "weight 3");
    assert_close(s[2], 0.2, 0.01, "weight 0 as 1");
}

#[test]
fn random_skips_unavailable() {
    let b = balancer("algorithm: random", &plain(3));
    let available = [false, true, true];
    let req = Pick {
        available: &available,
        ..Pick::default()
    };
    let c = counts(&b, &req, 10_000, 5);
    assert_eq!(c[0], 0);
    assert_close(shares(&c)[1], 0.5, 0.02, "survivor");
}

#[test]
fn least_request_prefers_the_less_loaded() {
    let b = balancer("algorithm: leastRequest", &plain(2));
    for _ in 0..5 {
        b.on_start(0);
    }
    // Two distinct candidates out of two: the idle endpoint always wins.
    assert_eq!(counts(&b, &Pick::default(), 1000, 2), [0, 1000]);
    for _ in 0..5 {
        b.on_end(0, None, Instant::now());
    }
    let s = shares(&counts(&b, &Pick::default(), 10_000, 2));
    assert_close(s[0], 0.5, 0.02, "ties are random");
}

#[test]
fn least_request_with_p2c_avoids_the_hot_endpoint_among_many() {
    let b = balancer("algorithm: leastRequest", &plain(10));
    for _ in 0..3 {
        b.on_start(4);
    }
    let s = shares(&counts(&b, &Pick::default(), 20_000, 9));
    // Endpoint 4 only wins when it is drawn twice, which distinct sampling forbids.
    assert_eq!(s[4], 0.0);
    assert_close(s[0], 1.0 / 9.0, 0.015, "others share evenly");
}

#[test]
fn least_request_adjusts_load_by_weight() {
    let b = balancer("algorithm: leastRequest", &weighted(&[4, 1]));
    // 4 outstanding on weight 4 (1 per unit) beats 2 outstanding on weight 1 (2 per unit).
    for _ in 0..4 {
        b.on_start(0);
    }
    b.on_start(1);
    b.on_start(1);
    assert_eq!(counts(&b, &Pick::default(), 500, 4), [500, 0]);
}

#[test]
fn least_request_samples_by_weight_when_idle() {
    let b = balancer(
        "algorithm: leastRequest\nchoiceCount: 2",
        &weighted(&[1, 1, 6]),
    );
    // Idle: every cost is 0, so the first weighted draw wins.
    let s = shares(&counts(&b, &Pick::default(), 40_000, 8));
    assert_close(s[2], 0.75, 0.01, "heavy endpoint");
}

#[test]
fn outstanding_counts_track_start_and_end_and_saturate() {
    let b = balancer("algorithm: leastRequest", &plain(2));
    let now = Instant::now();
    b.on_start(1);
    b.on_start(1);
    assert_eq!(b.outstanding(1), 2);
    b.on_end(1, None, now);
    b.on_end(1, None, now);
    b.on_end(1, None, now);
    assert_eq!(b.outstanding(1), 0);
    b.on_start(99);
    b.on_end(99, None, now);
    assert_eq!(b.outstanding(99), 0);
}
