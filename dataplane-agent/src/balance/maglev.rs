//! Maglev lookup table over one priority level (Eisenbud et al., NSDI 2016; Envoy `MAGLEV`).
//!
//! Each endpoint has a permutation of the `M` slots (`offset` and `skip` from two hashes of its
//! address; `M` prime so every skip visits every slot) and endpoints take turns claiming their
//! next free preferred slot. Weights follow Envoy's weighted Maglev: an endpoint with weight `w`
//! takes a turn in round `r` only once `r * w >= turns_taken * max_weight`, so its share of the
//! table is proportional to `w`. Rounds are driven by a heap of due rounds, which visits each
//! endpoint only when it is due: O(M log n) even with extreme weight ratios.
//!
//! Lookup is `table[mix64(hash) % M]`. If that endpoint is unusable we *rehash*
//! (`mix64` of the previous probe) a bounded number of times, then scan the table linearly:
//! deterministic, and the keys of an unusable endpoint spread over the others by weight
//! instead of all landing on one neighbour.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::hash::{GOLDEN, mix64};

/// Rehash probes before the linear scan: with half of the weight unusable, 16 probes all miss
/// with probability 2^-16.
const PROBES: usize = 16;

#[derive(Debug)]
pub(super) struct Maglev {
    table: Vec<u32>,
}

struct Turn {
    /// Next permutation position of this endpoint.
    pos: u64,
    skip: u64,
    turns: u64,
}

impl Maglev {
    /// `size` must be prime (validated by the config; a non-prime still terminates).
    pub fn new(members: &[u32], weights: &[u64], address_hashes: &[u64], size: u64) -> Maglev {
        let m = size;
        let usable = members.len().min(weights.len()).min(address_hashes.len());
        if m == 0 || usable == 0 {
            return Maglev { table: Vec::new() };
        }
        let max_w = weights.iter().copied().max().unwrap_or(1).max(1);
        // Turn order is by address, not by list position, so every proxy builds the same table
        // whatever order its endpoint list arrives in.
        let mut order: Vec<usize> = (0..usable).collect();
        order.sort_by_key(|&i| (address_hashes[i], members[i]));
        let mut turns: Vec<Turn> = order
            .iter()
            .map(|&i| address_hashes[i])
            .map(|h| Turn {
                pos: h % m,
                skip: mix64(h ^ GOLDEN) % (m - 1).max(1) + 1,
                turns: 0,
            })
            .collect();
        let mut table = vec![u32::MAX; usize::try_from(m).unwrap_or(0)];
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> =
            (0..usable).map(|i| Reverse((0, i))).collect();
        let mut filled = 0u64;
        while filled < m {
            let Some(Reverse((_, i))) = heap.pop() else {
                break;
            };
            let t = &mut turns[i];
            let slot = claim(&mut table, t.pos, t.skip);
            table[slot] = members[order[i]];
            t.pos = (slot as u64 + t.skip) % m;
            t.turns += 1;
            filled += 1;
            let w = weights[order[i]].max(1);
            // Due in the first round r with r * w >= turns * max_w.
            let due = t.turns.saturating_mul(max_w).div_ceil(w);
            heap.push(Reverse((due, i)));
        }
        Maglev { table }
    }

    /// Deterministic choice for `hash`; see the module doc for the fallback order.
    pub fn pick(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let m = self.table.len() as u64;
        if m == 0 {
            return None;
        }
        let mut h = mix64(hash);
        for _ in 0..PROBES {
            let e = self.table[(h % m) as usize] as usize;
            if usable(e) {
                return Some(e);
            }
            h = mix64(h.wrapping_add(GOLDEN));
        }
        let start = h % m;
        (0..m)
            .map(|k| self.table[((start + k) % m) as usize] as usize)
            .find(|&e| usable(e))
    }

    #[cfg(test)]
    pub fn slots(&self) -> &[u32] {
        &self.table
    }
}

/// First free slot along the permutation from `pos`. With a prime table the permutation visits
/// every slot within `m` steps; the linear fallback only guards a non-prime size.
fn claim(table: &mut [u32], pos: u64, skip: u64) -> usize {
    let m = table.len() as u64;
    let mut p = pos;
    for _ in 0..m {
        if table[p as usize] == u32::MAX {
            return p as usize;
        }
        p = (p + skip) % m;
    }
    (0..m)
        .map(|k| ((pos + k) % m) as usize)
        .find(|&s| table[s] == u32::MAX)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(t: &Maglev, e: u32) -> f64 {
        t.slots().iter().filter(|&&s| s == e).count() as f64 / t.slots().len() as f64
    }

    #[test]
    fn every_slot_is_filled_in_proportion_to_weight() {
        let t = Maglev::new(
            &[0, 1, 2],
            &[1, 1, 2],
            &[mix64(1), mix64(2), mix64(3)],
            65537,
        );
        assert!(t.slots().iter().all(|&s| s < 3));
        assert!((share(&t, 0) - 0.25).abs() < 0.01);
        assert!((share(&t, 2) - 0.5).abs() < 0.01);
    }

    #[test]
    fn extreme_weights_and_non_prime_sizes_terminate() {
        let t = Maglev::new(&[0, 1], &[u64::from(u32::MAX), 1], &[7, 9], 101);
        assert!(share(&t, 0) > 0.98);
        let t = Maglev::new(&[0, 1, 2], &[1, 1, 1], &[4, 6, 8], 100);
        assert!(t.slots().iter().all(|&s| s < 3));
        assert_eq!(Maglev::new(&[0], &[1], &[1], 0).pick(1, |_| true), None);
    }

    #[test]
    fn fallback_is_deterministic_and_avoids_unusable() {
        let t = Maglev::new(&[0, 1, 2], &[1, 1, 1], &[mix64(1), mix64(2), mix64(3)], 13);
        for h in 0..200 {
            let a = t.pick(h, |i| i != 1);
            assert_ne!(a, Some(1));
            assert_eq!(a, t.pick(h, |i| i != 1));
        }
        assert_eq!(t.pick(3, |_| false), None);
    }
}
