//! The periodic statistical detectors, as in Envoy's
//! `processSuccessRateEjections`: only healthy hosts with at least
//! `requestVolume` requests in the interval are considered, and nothing is
//! ejected unless at least `minimumHosts` such hosts exist.

use super::config::{FailurePercentageConfig, OutlierDetectionConfig, SuccessRateConfig};
use super::types::Reason;

/// Float noise allowance (in percentage points): with identical success
/// rates the computed mean can differ from each rate by ~1e-14, which with a
/// `stdevFactor` below 1 would eject every host. Envoy has no such guard.
const EPSILON: f64 = 1e-9;

/// One healthy host's interval counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    pub(crate) idx: usize,
    pub(crate) requests: u64,
    pub(crate) failures: u64,
}

impl Sample {
    /// Success rate in percent (Envoy reports 0..=100). `None` without
    /// requests: Envoy has no success rate for an idle host.
    fn success_rate(&self) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let ok = self.requests.saturating_sub(self.failures);
        Some(ok as f64 * 100.0 / self.requests as f64)
    }
}

/// A host the sweep wants ejected, with its success rate for ordering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Candidate {
    pub(crate) idx: usize,
    pub(crate) reason: Reason,
    success_rate: f64,
}

/// Success-rate candidates, then failure-percentage candidates, each worst
/// first. Envoy ejects in host-map order; worst first matters when
/// `maxEjectionPercent` lets only some of them go.
pub(crate) fn outliers(samples: &[Sample], cfg: &OutlierDetectionConfig) -> Vec<Candidate> {
    let mut out = Vec::new();
    if let Some(sr) = &cfg.success_rate {
        let start = out.len();
        success_rate_outliers(samples, sr, &mut out);
        sort_worst_first(&mut out[start..]);
    }
    if let Some(fp) = &cfg.failure_percentage {
        let start = out.len();
        failure_percentage_outliers(samples, fp, &mut out);
        sort_worst_first(&mut out[start..]);
    }
    out
}

fn sort_worst_first(c: &mut [Candidate]) {
    // Stable, so ties keep endpoint order and the result is deterministic.
    c.sort_by(|a, b| a.success_rate.total_cmp(&b.success_rate));
}

/// Hosts meeting `volume`, with their success rates.
fn valid(samples: &[Sample], volume: u64) -> impl Iterator<Item = (usize, f64)> + Clone + '_ {
    samples
        .iter()
        .filter(move |s| s.requests >= volume)
        .filter_map(|s| s.success_rate().map(|r| (s.idx, r)))
}

/// Envoy: eject hosts whose rate is below `mean - stdevFactor * stdev`
/// (population standard deviation over the valid hosts).
fn success_rate_outliers(samples: &[Sample], cfg: &SuccessRateConfig, out: &mut Vec<Candidate>) {
    let hosts = valid(samples, cfg.request_volume);
    let (n, sum) = hosts
        .clone()
        .fold((0usize, 0.0), |(n, s), (_, r)| (n + 1, s + r));
    if n == 0 || n < cfg.minimum_hosts as usize {
        return;
    }
    let mean = sum / n as f64;
    let variance = hosts.clone().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n as f64;
    let threshold = mean - cfg.stdev_factor * variance.sqrt();
    out.extend(
        hosts
            .filter(|&(_, r)| r < threshold - EPSILON)
            .map(|(idx, success_rate)| Candidate {
                idx,
                reason: Reason::SuccessRate,
                success_rate,
            }),
    );
}

/// Envoy: eject hosts whose failure percentage is `>= threshold`.
fn failure_percentage_outliers(
    samples: &[Sample],
    cfg: &FailurePercentageConfig,
    out: &mut Vec<Candidate>,
) {
    let hosts = valid(samples, cfg.request_volume);
    let n = hosts.clone().count();
    if n == 0 || n < cfg.minimum_hosts as usize {
        return;
    }
    out.extend(
        hosts
            .filter(|&(_, r)| 100.0 - r >= cfg.threshold)
            .map(|(idx, success_rate)| Candidate {
                idx,
                reason: Reason::FailurePercentage,
                success_rate,
            }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(idx: usize, requests: u64, failures: u64) -> Sample {
        Sample {
            idx,
            requests,
            failures,
        }
    }

    #[test]
    fn envoy_doc_example_threshold_is_52() {
        // Envoy's comment: rates {50,100,100,100,100} -> mean 90, stdev 20,
        // threshold 90 - 1.9*20 = 52: the 50% host is ejected.
        let s: Vec<_> = (0..5)
            .map(|i| sample(i, 100, if i == 0 { 50 } else { 0 }))
            .collect();
        let sr = SuccessRateConfig {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        };
        let mut out = Vec::new();
        success_rate_outliers(&s, &sr, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].idx, 0);
        // With factor 2.0 the threshold is exactly 50: not strictly below.
        out.clear();
        success_rate_outliers(
            &s,
            &SuccessRateConfig {
                stdev_factor: 2.0,
                ..sr
            },
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn identical_rates_never_eject_despite_float_noise() {
        // 3 x 90.909..%: the summed mean is 1 ulp above each rate, so with
        // factor 0 every host would be "below the threshold" without EPSILON.
        let s: Vec<_> = (0..3).map(|i| sample(i, 11, 1)).collect();
        let sr = SuccessRateConfig {
            minimum_hosts: 1,
            request_volume: 1,
            stdev_factor: 0.0,
        };
        let mut out = Vec::new();
        success_rate_outliers(&s, &sr, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn success_rate_candidates_are_sorted_worst_first() {
        let mut s: Vec<_> = (0..8).map(|i| sample(i, 100, 0)).collect();
        s[1].failures = 60;
        s[5].failures = 90;
        let cfg = OutlierDetectionConfig {
            success_rate: Some(SuccessRateConfig {
                stdev_factor: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let idx: Vec<_> = outliers(&s, &cfg).iter().map(|c| c.idx).collect();
        assert_eq!(idx, vec![5, 1]);
    }

    #[test]
    fn idle_hosts_are_not_valid_even_with_zero_volume() {
        let s = [sample(0, 0, 0), sample(1, 10, 10)];
        let fp = FailurePercentageConfig {
            threshold: 50.0,
            minimum_hosts: 2,
            request_volume: 0,
        };
        let mut out = Vec::new();
        failure_percentage_outliers(&s, &fp, &mut out);
        assert!(
            out.is_empty(),
            "only one host has data: below minimumHosts 2"
        );
    }

    #[test]
    fn candidates_are_sorted_worst_first() {
        let s = [sample(0, 100, 90), sample(1, 100, 100), sample(2, 100, 95)];
        let cfg = OutlierDetectionConfig {
            failure_percentage: Some(FailurePercentageConfig {
                threshold: 85.0,
                minimum_hosts: 3,
                request_volume: 100,
            }),
            ..Default::default()
        };
        let idx: Vec<_> = outliers(&s, &cfg).iter().map(|c| c.idx).collect();
        assert_eq!(idx, vec![1, 2, 0]);
    }
}
