//! Weighted round robin over one priority level.
//!
//! The schedule is computed once, at build time, with earliest-deadline-first stride
//! scheduling (Envoy's `EdfScheduler` idea, with deadlines at the middle of each stride so the
//! heavy endpoints interleave like nginx's smooth WRR instead of bursting). Picking is then one
//! atomic `fetch_add` plus a short scan: no lock on the hot path.
//!
//! Unusable positions (ejected or excluded endpoints) are skipped and the shared cursor jumps
//! past them, so each usable endpoint keeps exactly its own share instead of inheriting the
//! turns of the endpoint in front of it (what a naive "take the next one" would do).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bound on the schedule length. Weights are first divided by their GCD; only when the
/// reduced sum is still larger are they scaled down (each endpoint keeps at least one slot), so
/// precision is ~1/65536 of the level's total weight. Memory: 4 bytes per slot.
const MAX_SCHEDULE: u64 = 1 << 16;
/// Cursor value meaning "not started yet": the first pick starts at a random position so that
/// node proxies rebuilt at the same moment do not all send their first request to endpoint 0.
const UNSET: u64 = u64::MAX;

#[derive(Debug)]
pub(super) struct Wrr {
    schedule: Vec<u32>,
    cursor: AtomicU64,
}

impl Wrr {
    /// `members` are endpoint indices, `weights` their (>= 1) weights, same order.
    pub fn new(members: &[u32], weights: &[u64]) -> Wrr {
        let reduced = reduce(weights);
        Wrr {
            schedule: edf(members, &reduced),
            cursor: AtomicU64::new(UNSET),
        }
    }

    /// Next usable endpoint in schedule order; `None` if no member is usable.
    pub fn pick(&self, rng: &mut fastrand::Rng, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len() as u64;
        if len == 0 {
            return None;
        }
        if self.cursor.load(Relaxed) == UNSET {
            // Losing this race is fine: someone else picked the random start.
            let _ = self
                .cursor
                .compare_exchange(UNSET, rng.u64(0..len), Relaxed, Relaxed);
        }
        let start = self.cursor.fetch_add(1, Relaxed);
        for step in 0..len {
            let pos = start.wrapping_add(step);
            let idx = self.schedule[(pos % len) as usize] as usize;
            if usable(idx) {
                if step > 0 {
                    // Consume the skipped slots too; concurrent pickers may overlap, which only
                    // costs a duplicate turn, never a lost endpoint.
                    self.cursor.fetch_max(pos.wrapping_add(1), Relaxed);
                }
                return Some(idx);
            }
        }
        None
    }
}

/// Divides by the GCD, then scales down proportionally if the sum exceeds `MAX_SCHEDULE`.
fn reduce(weights: &[u64]) -> Vec<u64> {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let mut out: Vec<u64> = weights.iter().map(|&w| (w / g).max(1)).collect();
    let sum: u64 = out.iter().fold(0, |s, &w| s.saturating_add(w));
    if sum > MAX_SCHEDULE {
        for w in &mut out {
            let scaled = u128::from(*w) * u128::from(MAX_SCHEDULE) / u128::from(sum);
            *w = u64::try_from(scaled).unwrap_or(MAX_SCHEDULE).max(1);
        }
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Slot `k` (0-based) of member `i` has deadline `(2k + 1) / (2 w_i)`; slots are emitted in
/// deadline order, ties broken by member position, so equal weights cycle in member order.
#[derive(PartialEq, Eq)]
struct Slot {
    /// 2k + 1
    num: u64,
    /// 2 w
    den: u64,
    pos: usize,
}

impl Ord for Slot {
    fn cmp(&self, o: &Self) -> Ordering {
        let a = u128::from(self.num) * u128::from(o.den);
        let b = u128::from(o.num) * u128::from(self.den);
        a.cmp(&b).then(self.pos.cmp(&o.pos))
    }
}

impl PartialOrd for Slot {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

fn edf(members: &[u32], weights: &[u64]) -> Vec<u32> {
    let total = weights.iter().fold(0u64, |s, &w| s.saturating_add(w));
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut heap: BinaryHeap<Reverse<Slot>> = weights
        .iter()
        .enumerate()
        .map(|(pos, &w)| {
            Reverse(Slot {
                num: 1,
                den: w.saturating_mul(2),
                pos,
            })
        })
        .collect();
    let mut left: Vec<u64> = weights.to_vec();
    while let Some(Reverse(slot)) = heap.pop() {
        let (Some(&m), Some(l)) = (members.get(slot.pos), left.get_mut(slot.pos)) else {
            continue;
        };
        out.push(m);
        *l = l.saturating_sub(1);
        if *l > 0 {
            heap.push(Reverse(Slot {
                num: slot.num.saturating_add(2),
                ..slot
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_weights_cycle_in_member_order() {
        let w = Wrr::new(&[4, 7, 9], &[3, 3, 3]);
        assert_eq!(w.schedule, [4, 7, 9]);
    }

    #[test]
    fn heavy_endpoint_is_interleaved_not_bursted() {
        let w = Wrr::new(&[0, 1, 2], &[5, 1, 1]);
        assert_eq!(w.schedule, [0, 0, 0, 1, 2, 0, 0]);
    }

    #[test]
    fn huge_weights_are_bounded() {
        let w = Wrr::new(&[0, 1], &[u64::from(u32::MAX), 1]);
        assert!(w.schedule.len() as u64 <= MAX_SCHEDULE + 2);
        assert!(w.schedule.contains(&1));
    }

    #[test]
    fn skipped_slots_are_consumed() {
        // 0 unusable: 1 and 2 alternate exactly rather than 1 getting 0's turns.
        let w = Wrr::new(&[0, 1, 2], &[1, 1, 1]);
        let mut rng = fastrand::Rng::with_seed(1);
        let picks: Vec<_> = (0..6)
            .filter_map(|_| w.pick(&mut rng, |i| i != 0))
            .collect();
        let ones = picks.iter().filter(|&&i| i == 1).count();
        assert_eq!(ones, 3, "{picks:?}");
        assert_eq!(w.pick(&mut rng, |_| false), None);
    }
}
