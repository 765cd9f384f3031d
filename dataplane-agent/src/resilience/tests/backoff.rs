use std::time::Duration;

use super::yaml;
use crate::resilience::backoff::{Backoff, Jitter};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn no_jitter(base: u64, max: u64) -> Backoff {
    Backoff {
        base_interval: ms(base),
        max_interval: ms(max),
        jitter: Jitter::None,
    }
}

#[test]
fn empty_mapping_gives_envoy_defaults() {
    let b: Backoff = yaml("{}").unwrap();
    assert_eq!(b, Backoff::default());
    assert_eq!((b.base_interval, b.max_interval), (ms(25), ms(250)));
    assert_eq!(b.jitter, Jitter::Full);
}

#[test]
fn max_interval_defaults_to_ten_times_base() {
    let b: Backoff = yaml("baseInterval: 100ms").unwrap();
    assert_eq!(b.max_interval, ms(1000));
}

#[test]
fn parses_explicit_fields() {
    let b: Backoff = yaml("{baseInterval: 10ms, maxInterval: 1s, jitter: none}").unwrap();
    assert_eq!(b, no_jitter(10, 1000));
}

#[test]
fn rejects_zero_base_interval() {
    let err = yaml::<Backoff>("baseInterval: 0s").unwrap_err();
    assert!(err.starts_with("baseInterval: must be > 0"), "{err}");
}

#[test]
fn rejects_max_below_base() {
    let err = yaml::<Backoff>("{baseInterval: 100ms, maxInterval: 50ms}").unwrap_err();
    assert!(
        err.starts_with("maxInterval: must be >= baseInterval"),
        "{err}"
    );
}

#[test]
fn rejects_unknown_fields_and_jitter_modes() {
    assert!(yaml::<Backoff>("multiplier: 2").is_err());
    assert!(yaml::<Backoff>("jitter: half").is_err());
}

#[test]
fn ceiling_doubles_then_caps_at_max() {
    let b = no_jitter(25, 250);
    let mut rng = fastrand::Rng::with_seed(1);
    let delays: Vec<u64> = (0..7)
        .map(|n| b.delay(n, &mut rng).as_millis() as u64)
        .collect();
    assert_eq!(delays, [25, 50, 100, 200, 250, 250, 250]);
}

#[test]
fn huge_attempts_and_intervals_do_not_overflow() {
    let b = no_jitter(25, 250);
    let mut rng = fastrand::Rng::with_seed(1);
    for attempt in [31, 32, 33, 63, 64, 1000, u32::MAX] {
        assert_eq!(b.delay(attempt, &mut rng), ms(250), "attempt {attempt}");
    }
    let huge = Backoff {
        base_interval: Duration::MAX,
        max_interval: Duration::MAX,
        jitter: Jitter::Full,
    };
    assert_eq!(huge.ceiling(u32::MAX), Duration::MAX);
    let d = huge.delay(5, &mut rng);
    assert!(d <= Duration::from_nanos(u64::MAX));
}

#[test]
fn full_jitter_stays_below_ceiling_and_spreads() {
    let b = Backoff::default();
    let mut rng = fastrand::Rng::with_seed(7);
    for attempt in 0..6 {
        let ceiling = b.ceiling(attempt);
        let samples: Vec<Duration> = (0..200).map(|_| b.delay(attempt, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d < ceiling), "attempt {attempt}");
        // Full jitter: spread over the whole range, not clustered near the ceiling.
        assert!(
            samples.iter().any(|d| *d < ceiling / 4),
            "attempt {attempt}"
        );
        assert!(
            samples.iter().any(|d| *d > ceiling * 3 / 4),
            "attempt {attempt}"
        );
    }
}

#[test]
fn full_jitter_is_deterministic_for_a_seed() {
    let b = Backoff::default();
    let draw = |seed| {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..5).map(|n| b.delay(n, &mut rng)).collect::<Vec<_>>()
    };
    assert_eq!(draw(3), draw(3));
    assert_ne!(draw(3), draw(4));
}

#[test]
fn zero_interval_from_code_yields_zero_without_panicking() {
    let b = Backoff {
        base_interval: Duration::ZERO,
        max_interval: Duration::ZERO,
        jitter: Jitter::Full,
    };
    let mut rng = fastrand::Rng::with_seed(1);
    assert_eq!(b.delay(0, &mut rng), Duration::ZERO);
}

#[test]
fn serializes_back_to_the_same_config() {
    let b = no_jitter(10, 1000);
    let text = serde_yaml_ng::to_string(&b).unwrap();
    assert!(text.contains("baseInterval: 10ms"), "{text}");
    assert_eq!(yaml::<Backoff>(&text).unwrap(), b);
}
