//! Peak EWMA: latency preference, peak reaction, decay, default RTT, queue depth.

use std::time::{Duration, Instant};

use super::{balancer, plain};
use crate::balance::{Balancer, Pick};

const MS: Duration = Duration::from_millis(1);

fn ewma() -> Balancer {
    balancer(
        "algorithm: peakEwma\npeakEwma: {decay: 10s, defaultRtt: 30ms}",
        &plain(2),
    )
}

/// Picks at `now`, counting per endpoint; with two endpoints both are always compared.
fn picks_at(b: &Balancer, now: Instant) -> [usize; 2] {
    let mut rng = fastrand::Rng::with_seed(3);
    let mut out = [0; 2];
    for _ in 0..200 {
        if let Some(i) = b.pick(&Pick::default(), &mut rng, now) {
            out[i] += 1;
        }
    }
    out
}

fn sample(b: &Balancer, idx: usize, rtt: Duration, at: Instant) {
    b.on_start(idx);
    b.on_end(idx, Some(rtt), at);
}

#[test]
fn prefers_the_faster_endpoint() {
    let b = ewma();
    let t0 = Instant::now();
    sample(&b, 0, 80 * MS, t0);
    sample(&b, 1, 10 * MS, t0);
    assert_eq!(picks_at(&b, t0), [0, 200]);
}

#[test]
fn unknown_endpoints_get_the_default_rtt() {
    let b = ewma();
    let t0 = Instant::now();
    // 0 measured slower than the 30ms default: the unknown endpoint is tried.
    sample(&b, 0, 50 * MS, t0);
    assert_eq!(picks_at(&b, t0), [0, 200]);
    // Measured faster than the default: the known endpoint keeps the traffic.
    let b = ewma();
    sample(&b, 0, 10 * MS, t0);
    assert_eq!(picks_at(&b, t0), [200, 0]);
}

#[test]
fn latency_spike_is_avoided_at_once_then_decays_back() {
    let b = ewma();
    let t0 = Instant::now();
    for s in 0..5 {
        let at = t0 + Duration::from_secs(s);
        sample(&b, 0, 10 * MS, at);
        sample(&b, 1, 12 * MS, at);
    }
    let spike = t0 + Duration::from_secs(5);
    assert_eq!(
        picks_at(&b, spike),
        [200, 0],
        "the faster one before the spike"
    );
    sample(&b, 0, 500 * MS, spike);
    assert_eq!(
        picks_at(&b, spike),
        [0, 200],
        "a single slow response is a new peak"
    );
    // Normal latency again: the peak blends away with the 10s time constant.
    // Excess over 10ms: 490ms * e^(-s/10), below the 2ms gap to endpoint 1 after ~55s.
    for s in 1..=70 {
        let at = spike + Duration::from_secs(s);
        sample(&b, 0, 10 * MS, at);
        sample(&b, 1, 12 * MS, at);
        let expect_back = s >= 60;
        let p = picks_at(&b, at);
        if s == 10 {
            assert_eq!(p, [0, 200], "still avoided one time constant later");
        }
        if expect_back {
            assert_eq!(p, [200, 0], "recovered after {s}s");
        }
    }
}

#[test]
fn an_idle_slow_endpoint_decays_toward_zero_and_is_probed_again() {
    let b = ewma();
    let t0 = Instant::now();
    sample(&b, 0, 10 * MS, t0);
    sample(&b, 1, 400 * MS, t0);
    // Endpoint 1 gets no traffic, hence no samples; 0 keeps reporting 10ms.
    for s in 1..=60 {
        let at = t0 + Duration::from_secs(s);
        sample(&b, 0, 10 * MS, at);
        let p = picks_at(&b, at);
        if s <= 30 {
            assert_eq!(p, [200, 0], "at {s}s");
        }
        if s >= 40 {
            // 400ms * e^-4 = 7.3ms < 10ms
            assert_eq!(p, [0, 200], "probed again at {s}s");
        }
    }
}

#[test]
fn queue_depth_multiplies_the_cost() {
    let b = ewma();
    let t0 = Instant::now();
    sample(&b, 0, 10 * MS, t0);
    sample(&b, 1, 25 * MS, t0);
    assert_eq!(picks_at(&b, t0), [200, 0]);
    // 10ms * (2 + 1) = 30 > 25ms * 1
    b.on_start(0);
    b.on_start(0);
    assert_eq!(picks_at(&b, t0), [0, 200]);
}
