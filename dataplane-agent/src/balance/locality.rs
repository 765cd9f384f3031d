//! Locality priority levels and Envoy's priority load / panic computation.
//!
//! See Envoy's "Priority levels" and "Panic threshold" architecture docs and
//! `LoadBalancerBase::recalculatePerPriorityState`. We follow them with two deliberate
//! simplifications: loads are `f64` percentages rather than Envoy's rounded integers, and there
//! is no "degraded" host state (outlier detection here only ejects).

/// Same region and zone as the caller.
pub(super) const SAME_ZONE: u8 = 0;
/// Same region, another (or unknown) zone.
pub(super) const SAME_REGION: u8 = 1;
/// Another known region.
pub(super) const OTHER_REGION: u8 = 2;
/// Endpoint region unknown: could be anywhere, so it is trusted least.
pub(super) const UNKNOWN: u8 = 3;
/// Number of distinct priority levels.
pub(super) const MAX_LEVELS: usize = 4;

use super::Locality;

/// Priority of an endpoint seen from `caller`. The caller must have a known region (otherwise
/// locality is not used at all and every endpoint shares one level).
pub(super) fn priority(ep: &Locality, caller: &Locality) -> u8 {
    if ep.region.is_empty() {
        UNKNOWN
    } else if ep.region != caller.region {
        OTHER_REGION
    } else if !ep.zone.is_empty() && ep.zone == caller.zone {
        SAME_ZONE
    } else {
        SAME_REGION
    }
}

/// Weights of one level as seen by one pick.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LevelHealth {
    /// Sum of all endpoint weights of the level.
    pub total: u64,
    /// Sum of the weights of endpoints not ejected by outlier detection.
    pub available: u64,
}

/// Where traffic goes: per level, its share in percent and whether it is in panic
/// (balance over all of its endpoints, ejected ones included).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Plan {
    pub load: [f64; MAX_LEVELS],
    pub panic: [bool; MAX_LEVELS],
    pub levels: usize,
}

impl Plan {
    /// Computes the plan for `health` (levels in priority order, at most `MAX_LEVELS`).
    ///
    /// Envoy semantics:
    /// * `health_i = min(100, available_i / total_i * 100 * factor / 100)`;
    /// * `normalized = min(100, sum(health_i))`;
    /// * `load_i = min(remaining, health_i * 100 / normalized)` in priority order, so P0 takes
    ///   everything while it is healthy enough and the rest spills downwards; when the sum is
    ///   below 100 the loads are scaled up to sum to 100;
    /// * a level is in panic only if `normalized < 100` **and** its own (non-overprovisioned)
    ///   health is below `panic_threshold`: spare capacity in other levels wins over panic;
    /// * if every level is in panic, load follows each level's total weight (Envoy uses host
    ///   counts) and all endpoints are used.
    ///
    /// Returns `None` when no level can take traffic (everything ejected, panic disabled).
    pub fn new(health: &[LevelHealth], factor: f64, panic_threshold: f64) -> Option<Plan> {
        let mut plan = Plan {
            levels: health.len().min(MAX_LEVELS),
            ..Plan::default()
        };
        let health = &health[..plan.levels];
        let mut over = [0.0f64; MAX_LEVELS];
        let mut raw = [0.0f64; MAX_LEVELS];
        for (i, h) in health.iter().enumerate() {
            raw[i] = percent(h.available, h.total);
            over[i] = (raw[i] * factor / 100.0).min(100.0);
        }
        let normalized = over.iter().sum::<f64>().min(100.0);
        if normalized < 100.0 && panic_threshold > 0.0 {
            for ((p, h), r) in plan.panic.iter_mut().zip(health).zip(raw) {
                *p = h.total > 0 && r < panic_threshold;
            }
        }
        let all_panic = plan.panic[..plan.levels].iter().all(|&p| p) && plan.levels > 0;
        if all_panic {
            let total: u64 = health.iter().map(|h| h.total).fold(0, u64::saturating_add);
            for (i, h) in health.iter().enumerate() {
                plan.load[i] = percent(h.total, total);
            }
        } else if normalized > 0.0 {
            let mut remaining = 100.0f64;
            for (load, o) in plan.load.iter_mut().zip(over) {
                *load = (o * 100.0 / normalized).min(remaining);
                remaining = (remaining - *load).max(0.0);
            }
        }
        // A panicking level without load is never chosen by load; clearing its flag keeps a
        // cross-level retry from landing on its ejected endpoints.
        for (p, load) in plan.panic.iter_mut().zip(plan.load) {
            *p &= load > 0.0;
        }
        plan.load.iter().any(|&l| l > 0.0).then_some(plan)
    }

    /// The level whose cumulative load range contains `u` in [0, 1).
    pub fn choose(&self, u: f64) -> usize {
        let target = u * 100.0;
        let mut acc = 0.0;
        let mut last = 0;
        for i in 0..self.levels {
            if self.load[i] <= 0.0 {
                continue;
            }
            acc += self.load[i];
            last = i;
            if target < acc {
                return i;
            }
        }
        // Rounding left `acc` a hair below 100: the last loaded level takes the remainder.
        last
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lh(total: u64, available: u64) -> LevelHealth {
        LevelHealth { total, available }
    }

    fn loads(h: &[LevelHealth], factor: f64, panic: f64) -> Vec<f64> {
        let p = Plan::new(h, factor, panic).map(|p| p.load[..p.levels].to_vec());
        p.unwrap_or_default()
            .iter()
            .map(|l| (l * 100.0).round() / 100.0)
            .collect()
    }

    #[test]
    fn envoy_priority_load_examples() {
        // From Envoy's priority-levels doc, overprovisioning factor 1.4.
        assert_eq!(loads(&[lh(10, 10), lh(10, 10)], 140.0, 0.0), [100.0, 0.0]);
        assert_eq!(loads(&[lh(100, 72), lh(10, 10)], 140.0, 0.0), [100.0, 0.0]);
        assert_eq!(loads(&[lh(100, 71), lh(10, 10)], 140.0, 0.0), [99.4, 0.6]);
        assert_eq!(loads(&[lh(100, 50), lh(10, 10)], 140.0, 0.0), [70.0, 30.0]);
        assert_eq!(loads(&[lh(100, 25), lh(100, 0)], 140.0, 0.0), [100.0, 0.0]);
        // Normalized: 20% and 10% healthy -> 28 + 14 = 42 -> scaled to 100.
        assert_eq!(loads(&[lh(10, 2), lh(10, 1)], 140.0, 0.0), [66.67, 33.33]);
    }

    #[test]
    fn nothing_available_without_panic_is_none() {
        assert!(Plan::new(&[lh(4, 0), lh(4, 0)], 140.0, 0.0).is_none());
        assert!(Plan::new(&[], 140.0, 50.0).is_none());
    }

    #[test]
    fn spare_capacity_elsewhere_prevents_panic() {
        let p = Plan::new(&[lh(4, 1), lh(4, 4)], 140.0, 50.0).unwrap();
        assert_eq!(p.panic[..2], [false, false]);
    }

    #[test]
    fn total_panic_spreads_by_weight() {
        let p = Plan::new(&[lh(4, 0), lh(12, 1)], 140.0, 50.0).unwrap();
        assert_eq!(p.panic[..2], [true, true]);
        assert_eq!(p.load[..2], [25.0, 75.0]);
    }

    #[test]
    fn partial_panic_only_in_the_unhealthy_loaded_level() {
        // P0 60% (84 after factor), P1 30% (42): normalized 100 -> no panic at all.
        let p = Plan::new(&[lh(10, 6), lh(10, 3)], 140.0, 50.0).unwrap();
        assert_eq!(p.panic[..2], [false, false]);
        // Factor 100: 60 + 30 = 90 < 100, P1 (30% < 50%) panics, P0 does not.
        let p = Plan::new(&[lh(10, 6), lh(10, 3)], 100.0, 50.0).unwrap();
        assert_eq!(p.panic[..2], [false, true]);
    }

    #[test]
    fn choose_follows_cumulative_load() {
        let p = Plan::new(&[lh(100, 50), lh(10, 10)], 140.0, 0.0).unwrap();
        assert_eq!(p.choose(0.0), 0);
        assert_eq!(p.choose(0.69), 0);
        assert_eq!(p.choose(0.71), 1);
        assert_eq!(p.choose(0.999_999), 1);
        let p = Plan::new(&[lh(4, 0), lh(4, 4)], 140.0, 0.0).unwrap();
        assert_eq!(p.choose(0.0), 1);
    }

    #[test]
    fn priority_classification() {
        let loc = |r: &str, z: &str| Locality {
            region: r.into(),
            zone: z.into(),
        };
        let caller = loc("eu", "a");
        assert_eq!(priority(&loc("eu", "a"), &caller), SAME_ZONE);
        assert_eq!(priority(&loc("eu", "b"), &caller), SAME_REGION);
        assert_eq!(priority(&loc("eu", ""), &caller), SAME_REGION);
        assert_eq!(priority(&loc("us", "a"), &caller), OTHER_REGION);
        assert_eq!(priority(&loc("", "a"), &caller), UNKNOWN);
        // A caller with no zone has no same-zone endpoint.
        assert_eq!(priority(&loc("eu", ""), &loc("eu", "")), SAME_REGION);
    }
}
