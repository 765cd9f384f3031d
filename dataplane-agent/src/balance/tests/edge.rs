//! Inputs that must not panic or misbehave: no endpoints, bad indices, extreme values.

use std::time::{Duration, Instant};

use super::{balancer, cfg, counts, ep, loc, plain};
use crate::balance::{Algorithm, Balancer, LoadBalancerConfig, Pick};

const ALL: [&str; 6] = [
    "algorithm: roundRobin",
    "algorithm: random",
    "algorithm: leastRequest",
    "algorithm: peakEwma",
    "algorithm: ringHash\nhash: {header: x}",
    "algorithm: maglev\nhash: {header: x}",
];

#[test]
fn balancer_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Balancer>();
}

#[test]
fn zero_endpoints_pick_nothing() {
    for yaml in ALL {
        let b = balancer(yaml, &[]);
        assert!(b.is_empty());
        let mut rng = fastrand::Rng::with_seed(1);
        let req = Pick {
            hash: Some(1),
            exclude: &[0],
            ..Pick::default()
        };
        assert_eq!(b.pick(&req, &mut rng, Instant::now()), None, "{yaml}");
        b.on_start(0);
        b.on_end(0, Some(Duration::from_secs(1)), Instant::now());
    }
}

#[test]
fn all_ejected_without_panic_picks_nothing() {
    for yaml in ALL {
        let b = balancer(&format!("{yaml}\npanicThreshold: 0"), &plain(3));
        let mut rng = fastrand::Rng::with_seed(1);
        let available = [false; 3];
        let req = Pick {
            available: &available,
            exclude: &[1],
            hash: Some(5),
        };
        assert_eq!(b.pick(&req, &mut rng, Instant::now()), None, "{yaml}");
    }
}

#[test]
fn short_available_slice_means_available_and_bad_indices_are_ignored() {
    let b = balancer("algorithm: roundRobin", &plain(4));
    let available = [false, false];
    let req = Pick {
        available: &available,
        exclude: &[usize::MAX, 17],
        hash: None,
    };
    assert_eq!(counts(&b, &req, 100, 1), [0, 0, 50, 50]);
}

#[test]
fn extreme_weights_do_not_overflow() {
    let eps = [
        ep("a:80", u32::MAX, "eu", "a"),
        ep("b:80", u32::MAX, "eu", "a"),
        ep("c:80", 1, "eu", "a"),
    ];
    for yaml in ALL {
        let b = Balancer::new(&cfg(yaml), &eps, &loc("eu", "a"));
        for _ in 0..1000 {
            b.on_start(0);
        }
        let c = counts(
            &b,
            &Pick {
                hash: Some(9),
                ..Pick::default()
            },
            300,
            1,
        );
        assert_eq!(c.iter().sum::<usize>(), 300, "{yaml}");
    }
}

#[test]
fn invalid_programmatic_config_is_clamped_not_fatal() {
    let bad = LoadBalancerConfig {
        algorithm: Algorithm::Maglev,
        choice_count: 0,
        ring_size: 0,
        maglev_table_size: 100,
        panic_threshold: f64::NAN,
        ..LoadBalancerConfig::default()
    };
    let mut cfg = bad.clone();
    cfg.locality.enabled = true;
    cfg.locality.overprovisioning_factor = f64::NAN;
    for algorithm in [
        Algorithm::Maglev,
        Algorithm::RingHash,
        Algorithm::LeastRequest,
    ] {
        cfg.algorithm = algorithm;
        let b = Balancer::new(&cfg, &plain(3), &loc("eu", "a"));
        let c = counts(
            &b,
            &Pick {
                hash: Some(1),
                ..Pick::default()
            },
            30,
            1,
        );
        assert_eq!(c.iter().sum::<usize>(), 30, "{algorithm:?}");
    }
}

#[test]
fn many_endpoints_and_choices() {
    let b = balancer("algorithm: leastRequest\nchoiceCount: 16", &plain(3));
    b.on_start(0);
    b.on_start(1);
    // More choices than endpoints: every endpoint is compared, the idle one wins.
    assert_eq!(counts(&b, &Pick::default(), 100, 1), [0, 0, 100]);
}
