//! `exclude`: retries go to another host when one exists, else to an already-tried one.

use std::time::Instant;

use super::{balancer, cfg, counts, ep, loc, plain};
use crate::balance::{Balancer, Pick};

const ALL: [&str; 6] = [
    "algorithm: roundRobin",
    "algorithm: random",
    "algorithm: leastRequest",
    "algorithm: peakEwma",
    "algorithm: ringHash\nhash: {header: x}",
    "algorithm: maglev\nhash: {header: x}",
];

#[test]
fn excluded_endpoints_are_avoided_by_every_algorithm() {
    for yaml in ALL {
        let b = balancer(yaml, &plain(3));
        for hash in [None, Some(42)] {
            let req = Pick {
                exclude: &[0, 2],
                hash,
                ..Pick::default()
            };
            assert_eq!(counts(&b, &req, 200, 1), [0, 200, 0], "{yaml} {hash:?}");
        }
    }
}

#[test]
fn a_retry_reuses_a_tried_host_rather_than_failing() {
    for yaml in ALL {
        let b = balancer(yaml, &plain(2));
        let available = [true, false];
        let req = Pick {
            available: &available,
            exclude: &[0],
            hash: Some(7),
        };
        // 1 is ejected (50% is not below the panic threshold), 0 was tried: retry 0.
        assert_eq!(counts(&b, &req, 50, 1), [50, 0], "{yaml}");
    }
}

#[test]
fn consistent_hash_retry_is_deterministic_and_returns_to_the_owner() {
    for yaml in &ALL[4..] {
        let b = balancer(yaml, &plain(5));
        let mut rng = fastrand::Rng::with_seed(1);
        let now = Instant::now();
        let first = Pick {
            hash: Some(99),
            ..Pick::default()
        };
        let owner = b.pick(&first, &mut rng, now).unwrap();
        let exclude = [owner];
        let retry = Pick {
            exclude: &exclude,
            ..first
        };
        let second = b.pick(&retry, &mut rng, now).unwrap();
        assert_ne!(second, owner);
        assert_eq!(b.pick(&retry, &mut rng, now), Some(second));
        assert_eq!(b.pick(&first, &mut rng, now), Some(owner));
    }
}

#[test]
fn a_retry_leaves_the_zone_when_every_local_host_was_tried() {
    let eps = [
        ep("a1:80", 1, "eu", "a"),
        ep("b1:80", 1, "eu", "b"),
        ep("b2:80", 1, "eu", "b"),
    ];
    for yaml in ALL {
        let yaml = format!("{yaml}\nlocality: {{enabled: true}}");
        let b = Balancer::new(&cfg(&yaml), &eps, &loc("eu", "a"));
        assert_eq!(counts(&b, &Pick::default(), 20, 1), [20, 0, 0], "{yaml}");
        let req = Pick {
            exclude: &[0],
            hash: Some(3),
            ..Pick::default()
        };
        assert_eq!(counts(&b, &req, 20, 1)[0], 0, "{yaml}");
    }
}

#[test]
fn round_robin_retry_goes_to_the_next_host() {
    let b = balancer("algorithm: roundRobin", &plain(4));
    let mut rng = fastrand::Rng::with_seed(5);
    let now = Instant::now();
    let first = b.pick(&Pick::default(), &mut rng, now).unwrap();
    let exclude = [first];
    let req = Pick {
        exclude: &exclude,
        ..Pick::default()
    };
    let second = b.pick(&req, &mut rng, now).unwrap();
    assert_eq!(second, (first + 1) % 4);
}
