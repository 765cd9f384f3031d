//! Locality priority levels: spill as the caller's zone loses health, recovery, panic mode.

use std::time::Instant;

use super::{assert_close, cfg, counts, ep, loc, plain, shares};
use crate::balance::{Balancer, EndpointSpec, Pick, hash_key};

const PICKS: usize = 20_000;

/// Four endpoints in zone a (0..4) and four in zone b (4..8), same region; caller in zone a.
fn two_zones(algorithm: &str) -> Balancer {
    let eps: Vec<EndpointSpec> = (0..8)
        .map(|i| ep(&format!("e{i}:80"), 1, "eu", if i < 4 { "a" } else { "b" }))
        .collect();
    let yaml = format!(
        "algorithm: {algorithm}\nhash: {{sourceIp: true}}\n\
         locality: {{enabled: true, overprovisioningFactor: 140}}"
    );
    Balancer::new(&cfg(&yaml), &eps, &loc("eu", "a"))
}

/// Share of picks that stayed in zone a with the first `down` zone-a endpoints ejected.
fn zone_a_share(b: &Balancer, down: usize, seed: u64) -> f64 {
    let available: Vec<bool> = (0..8).map(|i| i >= down).collect();
    let req = Pick {
        available: &available,
        ..Pick::default()
    };
    let c = counts(b, &req, PICKS, seed);
    assert!(
        c[..down].iter().all(|&n| n == 0),
        "ejected endpoint picked: {c:?}"
    );
    shares(&c)[..4].iter().sum()
}

/// Envoy's table for a factor of 1.4: 100, 100 (75 * 1.4 > 100), 70, 35, 0 percent local.
const SPILL: [f64; 5] = [1.0, 1.0, 0.70, 0.35, 0.0];

#[test]
fn traffic_spills_progressively_as_the_local_zone_loses_health() {
    for algorithm in ["random", "roundRobin", "leastRequest", "peakEwma"] {
        let b = two_zones(algorithm);
        for (down, expected) in SPILL.iter().enumerate() {
            let what = format!("{algorithm} with {down} of 4 local endpoints down");
            assert_close(zone_a_share(&b, down, down as u64), *expected, 0.015, &what);
        }
    }
}

#[test]
fn traffic_comes_back_when_the_zone_is_healthy_again() {
    let b = two_zones("roundRobin");
    assert_eq!(zone_a_share(&b, 4, 1), 0.0);
    assert_close(zone_a_share(&b, 2, 2), 0.70, 0.015, "half recovered");
    assert_eq!(zone_a_share(&b, 0, 3), 1.0);
}

#[test]
fn consistent_hashing_spills_by_key_not_by_chance() {
    let b = two_zones("ringHash");
    let available = [false, false, true, true, true, true, true, true];
    let req = |k: u64| Pick {
        available: &available,
        exclude: &[],
        hash: Some(hash_key(&k.to_le_bytes())),
    };
    let mut rng = fastrand::Rng::with_seed(1);
    let now = Instant::now();
    let mut local = 0;
    for k in 0..PICKS as u64 {
        let first = b.pick(&req(k), &mut rng, now);
        assert_eq!(first, b.pick(&req(k), &mut rng, now), "key {k} is sticky");
        local += usize::from(first.is_some_and(|i| i < 4));
    }
    assert_close(local as f64 / PICKS as f64, 0.70, 0.015, "keys kept local");
}

#[test]
fn nearer_levels_are_preferred_in_order() {
    let eps = [
        ep("zone:80", 1, "eu", "a"),
        ep("region:80", 1, "eu", "b"),
        ep("remote:80", 1, "us", "a"),
        ep("unknown:80", 1, "", ""),
    ];
    let yaml = "algorithm: random\nlocality: {enabled: true}\npanicThreshold: 0";
    let b = Balancer::new(&cfg(yaml), &eps, &loc("eu", "a"));
    for expected in 0..4 {
        let available: Vec<bool> = (0..4).map(|i| i >= expected).collect();
        let req = Pick {
            available: &available,
            ..Pick::default()
        };
        assert_eq!(counts(&b, &req, 100, 1)[expected], 100, "level {expected}");
    }
}

#[test]
fn without_locality_or_caller_locality_all_endpoints_share_one_level() {
    let eps: Vec<EndpointSpec> = (0..4)
        .map(|i| ep(&format!("e{i}:80"), 1, "eu", if i < 2 { "a" } else { "b" }))
        .collect();
    for (yaml, caller) in [
        ("algorithm: random", loc("eu", "a")),
        ("algorithm: random\nlocality: {enabled: true}", loc("", "")),
    ] {
        let b = Balancer::new(&cfg(yaml), &eps, &caller);
        let s = shares(&counts(&b, &Pick::default(), PICKS, 4));
        assert_close(s[2] + s[3], 0.5, 0.02, yaml);
    }
}

#[test]
fn panic_mode_balances_over_all_endpoints_below_the_threshold() {
    let b = super::balancer("algorithm: roundRobin\npanicThreshold: 50", &plain(10));
    // 4 of 10 available: 40% < 50% (and 40 * 1.4 = 56 < 100): ejection is ignored.
    let available: Vec<bool> = (0..10).map(|i| i < 4).collect();
    let req = Pick {
        available: &available,
        ..Pick::default()
    };
    assert_eq!(counts(&b, &req, 1000, 1), [100; 10]);
    // 5 of 10 is not below 50%: only available endpoints.
    let available: Vec<bool> = (0..10).map(|i| i < 5).collect();
    let req = Pick {
        available: &available,
        ..Pick::default()
    };
    assert_eq!(counts(&b, &req, 1000, 1)[5..], [0; 5]);
}

#[test]
fn panic_needs_the_overprovisioned_total_below_100_like_envoy() {
    let b = super::balancer("algorithm: roundRobin\npanicThreshold: 80", &plain(20));
    let down = |n: usize| -> Vec<bool> { (0..20).map(|i| i >= n).collect() };
    // 75% available < 80%, but 75 * 1.4 = 105 >= 100: no panic.
    let a = down(5);
    let c = counts(
        &b,
        &Pick {
            available: &a,
            ..Pick::default()
        },
        1500,
        1,
    );
    assert_eq!(c[..5], [0; 5]);
    // 60% available: 84 < 100 and 60 < 80: panic.
    let a = down(8);
    let c = counts(
        &b,
        &Pick {
            available: &a,
            ..Pick::default()
        },
        2000,
        1,
    );
    assert_eq!(c[..8], [100; 8]);
}

#[test]
fn zero_threshold_disables_panic() {
    let b = super::balancer("algorithm: random\npanicThreshold: 0", &plain(4));
    let none = [false; 4];
    let mut rng = fastrand::Rng::with_seed(1);
    let req = Pick {
        available: &none,
        ..Pick::default()
    };
    assert_eq!(b.pick(&req, &mut rng, Instant::now()), None);
    let one = [false, false, true, false];
    assert_eq!(
        counts(
            &b,
            &Pick {
                available: &one,
                ..Pick::default()
            },
            100,
            1
        )[2],
        100
    );
    // With the default threshold, all-ejected is panic: something is still returned.
    let b = super::balancer("algorithm: random", &plain(4));
    assert!(b.pick(&req, &mut rng, Instant::now()).is_some());
}

#[test]
fn total_panic_across_zones_spreads_by_weight() {
    let b = two_zones("random");
    // Zone a all ejected, zone b 1 of 4: every level panics; load follows total weight.
    let available = [false, false, false, false, true, false, false, false];
    let req = Pick {
        available: &available,
        ..Pick::default()
    };
    let s = shares(&counts(&b, &req, PICKS, 2));
    assert_close(s[..4].iter().sum(), 0.5, 0.02, "zone a in total panic");
    assert_close(s[0], 0.125, 0.01, "ejected endpoints used");
}
