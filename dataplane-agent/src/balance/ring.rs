//! Ketama-style consistent hashing ring over one priority level (Envoy `RING_HASH`).
//!
//! Each endpoint owns `weight * 2^e` points (at least one), placed at
//! `mix64(address_hash + j * GOLDEN)`; a key belongs to the first point at or after
//! `mix64(key)`, wrapping around (Envoy's lookup rule).
//!
//! Deliberate difference from Envoy: Envoy scales points by the *normalized* weight
//! (`weight / total`), so removing one endpoint changes every other endpoint's point count and
//! moves keys between survivors. Here the points per unit of weight are a power of two,
//! the smallest with `total * 2^e >= ringSize`, so adding or removing an endpoint changes no
//! other endpoint's points (and moves only the keys it owned) unless the total weight crosses a
//! power of two; then point sets double or halve, and since a point's position depends only on
//! its address and ordinal, the smaller set is a subset of the larger one. Ring size stays
//! within `[ringSize, 2 * ringSize + endpoints)`. Every endpoint keeps at least one point, even
//! with extreme weight ratios (Envoy may drop it from the ring).

use super::config::MAX_RING_SIZE;
use super::hash::{GOLDEN, mix64};

#[derive(Debug)]
pub(super) struct Ring {
    /// Sorted point positions.
    points: Vec<u64>,
    /// `owners[k]` is the endpoint index owning `points[k]`.
    owners: Vec<u32>,
}

impl Ring {
    /// `members`, `weights` (>= 1) and `address_hashes` are parallel slices.
    pub fn new(members: &[u32], weights: &[u64], address_hashes: &[u64], min_size: u64) -> Ring {
        let total = weights.iter().fold(0u64, |s, &w| s.saturating_add(w));
        let e = exponent(total, min_size.clamp(1, MAX_RING_SIZE));
        let mut entries: Vec<(u64, u64, u32)> = Vec::new();
        for ((&m, &w), &h) in members.iter().zip(weights).zip(address_hashes) {
            for j in 0..points_for(w, e) {
                entries.push((mix64(h.wrapping_add(j.wrapping_mul(GOLDEN))), h, m));
            }
        }
        // Ties between colliding points are broken by address, not by endpoint order, so two
        // proxies given the endpoints in a different order still agree.
        entries.sort_unstable();
        Ring {
            points: entries.iter().map(|e| e.0).collect(),
            owners: entries.iter().map(|e| e.2).collect(),
        }
    }

    /// Owner of `hash`, or the first usable owner walking clockwise from it (the keys of an
    /// unusable endpoint go to its ring successors, as when Envoy rebuilds without it).
    pub fn pick(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.points.len();
        let key = mix64(hash);
        let start = self.points.partition_point(|&p| p < key);
        (0..len)
            .map(|k| self.owners[(start + k) % len] as usize)
            .find(|&i| usable(i))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.points.len()
    }
}

/// Smallest `e` in [-63, 63] with `total * 2^e >= min_size` (integer arithmetic only, so
/// every proxy computes the same ring).
fn exponent(total: u64, min_size: u64) -> i32 {
    let scaled = |e: i32| -> u64 {
        if e >= 0 {
            total
                .checked_shl(e as u32)
                .map_or(u64::MAX, |v| if v >> e == total { v } else { u64::MAX })
        } else {
            total >> e.unsigned_abs()
        }
    };
    let mut e = 0;
    while e < 63 && scaled(e) < min_size {
        e += 1;
    }
    while e > -63 && scaled(e - 1) >= min_size {
        e -= 1;
    }
    e
}

/// `round(weight * 2^e)`, at least 1.
fn points_for(weight: u64, e: i32) -> u64 {
    let n = if e >= 0 {
        weight.saturating_mul(1u64 << e)
    } else {
        let s = e.unsigned_abs();
        (weight >> s) + ((weight >> (s - 1)) & 1)
    };
    n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_size_is_at_least_min_and_bounded() {
        assert_eq!(exponent(10, 1024), 7);
        assert_eq!(exponent(1 << 40, 1024), -30);
        assert_eq!(exponent(0, 1024), 63);
        let r = Ring::new(&[0, 1, 2], &[1, 1, 1], &[1, 2, 3], 1024);
        assert_eq!(r.len(), 3 * 512);
    }

    #[test]
    fn points_follow_weights_and_never_vanish() {
        assert_eq!(points_for(3, 2), 12);
        assert_eq!(points_for(3, -1), 2);
        assert_eq!(points_for(1, -30), 1);
        assert_eq!(points_for(u64::MAX, 3), u64::MAX);
    }

    #[test]
    fn unusable_owner_hands_keys_to_successor() {
        let r = Ring::new(&[0, 1], &[1, 1], &[11, 22], 8);
        for h in 0..100u64 {
            let first = r.pick(h, |_| true).unwrap();
            assert_eq!(r.pick(h, |i| i != first), Some(1 - first));
        }
        assert_eq!(r.pick(5, |_| false), None);
    }

    #[test]
    fn empty_ring_picks_nothing() {
        let r = Ring::new(&[], &[], &[], 1024);
        assert_eq!(r.pick(1, |_| true), None);
    }
}
