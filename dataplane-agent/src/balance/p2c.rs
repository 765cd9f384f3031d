//! Weighted random, least request and peak EWMA: "power of d choices" over per-endpoint load.
//!
//! Least request follows Envoy's P2C (`choice_count`, default 2) but draws *distinct* candidates
//! weighted by endpoint weight and compares `outstanding / weight`, so weights matter both in who
//! is sampled and in how much load an endpoint is expected to carry.
//!
//! Peak EWMA follows linkerd2-proxy / tower's `PeakEwma` (itself from Finagle):
//! `cost = rtt_estimate * (outstanding + 1)`. A sample above the current estimate replaces it at
//! once (the "peak"), so a latency spike is avoided immediately; smaller samples are blended in
//! with weight `1 - e^(-elapsed/decay)`; and the estimate decays toward 0 while no response
//! arrives, so a once-slow endpoint is eventually probed again.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::config::{MAX_CHOICE_COUNT, PeakEwmaConfig};

const MAX_CHOICES: usize = MAX_CHOICE_COUNT as usize;

/// Mutable per-endpoint load state shared by all tasks using a `Balancer`.
#[derive(Debug)]
pub(super) struct Load {
    outstanding: Vec<AtomicU64>,
    /// Empty unless the algorithm is peak EWMA: the state is only paid for when used.
    ewma: Vec<Mutex<Ewma>>,
    decay_ns: f64,
}

#[derive(Debug, Clone, Copy)]
struct Ewma {
    rtt_ns: f64,
    /// Time of the last sample; `None` while `rtt_ns` is still the configured default.
    stamp: Option<Instant>,
}

impl Ewma {
    /// Estimate at `now`, decayed toward 0 since the last sample.
    fn at(&self, now: Instant, decay_ns: f64) -> f64 {
        match self.stamp {
            None => self.rtt_ns,
            Some(s) => self.rtt_ns * weight_of_past(now.saturating_duration_since(s), decay_ns),
        }
    }

    fn observe(&mut self, rtt_ns: f64, now: Instant, decay_ns: f64) {
        let Some(stamp) = self.stamp else {
            // The first real measurement beats any configured guess.
            self.rtt_ns = rtt_ns;
            self.stamp = Some(now);
            return;
        };
        let past = weight_of_past(now.saturating_duration_since(stamp), decay_ns);
        let current = self.rtt_ns * past;
        self.rtt_ns = if rtt_ns > current {
            rtt_ns
        } else {
            current + rtt_ns * (1.0 - past)
        };
        // Concurrent tasks may report slightly out of order: time never goes backwards here.
        self.stamp = Some(stamp.max(now));
    }
}

fn weight_of_past(elapsed: Duration, decay_ns: f64) -> f64 {
    (-(elapsed.as_nanos() as f64) / decay_ns).exp()
}

impl Load {
    pub fn new(endpoints: usize, peak_ewma: Option<&PeakEwmaConfig>) -> Load {
        let ewma = peak_ewma.map_or(0, |_| endpoints);
        let default_rtt = peak_ewma.map_or(0.0, |c| c.default_rtt.as_nanos() as f64);
        let initial = Ewma {
            rtt_ns: default_rtt,
            stamp: None,
        };
        Load {
            outstanding: (0..endpoints).map(|_| AtomicU64::new(0)).collect(),
            ewma: (0..ewma).map(|_| Mutex::new(initial)).collect(),
            decay_ns: peak_ewma.map_or(1.0, |c| c.decay.as_nanos().max(1) as f64),
        }
    }

    pub fn start(&self, idx: usize) {
        if let Some(o) = self.outstanding.get(idx) {
            o.fetch_add(1, Relaxed);
        }
    }

    /// Ends a request; an unmatched end saturates at 0 instead of wrapping.
    pub fn end(&self, idx: usize, rtt: Option<Duration>, now: Instant) {
        if let Some(o) = self.outstanding.get(idx) {
            let _ = o.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(1)));
        }
        if let (Some(rtt), Some(e)) = (rtt, self.ewma.get(idx)) {
            let mut e = e.lock().unwrap_or_else(PoisonError::into_inner);
            e.observe(rtt.as_nanos() as f64, now, self.decay_ns);
        }
    }

    pub fn outstanding(&self, idx: usize) -> u64 {
        self.outstanding.get(idx).map_or(0, |o| o.load(Relaxed))
    }

    /// Current latency estimate in nanoseconds (0 when peak EWMA is not in use).
    pub fn rtt_ns(&self, idx: usize, now: Instant) -> f64 {
        self.ewma.get(idx).map_or(0.0, |e| {
            let e = e.lock().unwrap_or_else(PoisonError::into_inner);
            e.at(now, self.decay_ns)
        })
    }

    /// Least-request cost: outstanding requests per unit of weight.
    pub fn least_request_cost(&self, idx: usize, weight: u64) -> f64 {
        self.outstanding(idx) as f64 / weight.max(1) as f64
    }

    /// Peak-EWMA cost: expected time to drain this endpoint's queue, per unit of weight.
    pub fn peak_ewma_cost(&self, idx: usize, weight: u64, now: Instant) -> f64 {
        let queue = self.outstanding(idx).saturating_add(1) as f64;
        self.rtt_ns(idx, now) * queue / weight.max(1) as f64
    }
}

/// Draws up to `choices` distinct usable members, each with probability proportional to its
/// weight (sampling without replacement), and returns the one with the lowest `cost`; ties go to
/// the earlier draw, which is itself random. `choices == 1` is plain weighted random.
pub(super) fn best_of(
    members: &[u32],
    weights: &[u64],
    choices: usize,
    rng: &mut fastrand::Rng,
    usable: impl Fn(usize) -> bool,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let weight = |i: usize| weights.get(i).copied().unwrap_or(1);
    let mut remaining = members
        .iter()
        .map(|&m| m as usize)
        .filter(|&m| usable(m))
        .fold(0u64, |s, m| s.saturating_add(weight(m)));
    let mut drawn = [usize::MAX; MAX_CHOICES];
    let mut best: Option<(usize, f64)> = None;
    for n in 0..choices.clamp(1, MAX_CHOICES) {
        if remaining == 0 {
            break;
        }
        let mut r = rng.u64(0..remaining);
        let fresh = |m: usize| usable(m) && !drawn[..n].contains(&m);
        let pick = members
            .iter()
            .map(|&m| m as usize)
            .filter(|&m| fresh(m))
            .find(|&m| {
                let w = weight(m);
                r < w || {
                    r -= w;
                    false
                }
            });
        let Some(i) = pick else { break };
        drawn[n] = i;
        remaining = remaining.saturating_sub(weight(i));
        let c = cost(i);
        if best.is_none_or(|(_, b)| c < b) {
            best = Some((i, c));
        }
    }
    best.map(|(i, _)| i)
}
