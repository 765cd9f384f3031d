//! Bounded map from calling pod id to its limiter, evicting the least recently used pod.
//!
//! A slab of nodes threaded on an intrusive doubly linked list (most recent at the head) plus a
//! hash index: lookup, touch, insert and evict are all O(1), and a lookup of a known pod does not
//! allocate (`HashMap<Arc<str>, _>` is queried with `&str`). Inserting a new pod allocates its
//! id once. Memory is bounded by `capacity` entries and grows only as pods appear.
//!
//! Invariant (what makes the slice indexing below panic-free): every slot stored in `index`,
//! `head`, `tail` or a node's links is either `NIL` or `< nodes.len()`, and nodes are never
//! removed, only reused on eviction.
//!
//! Evicting a pod forgets its limiter: if it comes back it starts with a full bucket. That is
//! the price of bounded memory; pod ids come from the proxy's peer identity, not from headers,
//! so a caller cannot mint ids to reset its own limit.

use std::collections::HashMap;
use std::sync::Arc;

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Node<V> {
    key: Arc<str>,
    value: V,
    prev: u32,
    next: u32,
}

#[derive(Debug)]
pub(crate) struct PodLru<V> {
    index: HashMap<Arc<str>, u32>,
    nodes: Vec<Node<V>>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next eviction victim.
    tail: u32,
    capacity: usize,
}

impl<V> PodLru<V> {
    /// `capacity` is clamped to `1..u32::MAX` (node indices are u32, `u32::MAX` means none).
    pub(crate) fn new(capacity: u32) -> PodLru<V> {
        PodLru {
            index: HashMap::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.clamp(1, NIL - 1) as usize,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The value for `key`, marked most recently used; created with `make` if absent, evicting
    /// the least recently used entry when full.
    pub(crate) fn get_or_insert_with(&mut self, key: &str, make: impl FnOnce() -> V) -> &mut V {
        let slot = match self.index.get(key) {
            Some(&slot) => {
                self.unlink(slot);
                slot
            }
            None => self.insert(key, make()),
        };
        self.push_front(slot);
        &mut self.nodes[slot as usize].value
    }

    /// Stores a new entry (unlinked) and returns its slot.
    fn insert(&mut self, key: &str, value: V) -> u32 {
        let key: Arc<str> = Arc::from(key);
        let slot = if self.nodes.len() < self.capacity {
            self.nodes.push(Node {
                key: Arc::clone(&key),
                value,
                prev: NIL,
                next: NIL,
            });
            (self.nodes.len() - 1) as u32
        } else {
            let victim = self.tail;
            self.unlink(victim);
            let node = &mut self.nodes[victim as usize];
            self.index.remove(&node.key);
            node.key = Arc::clone(&key);
            node.value = value;
            victim
        };
        self.index.insert(key, slot);
        slot
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let node = &self.nodes[slot as usize];
            (node.prev, node.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, slot: u32) {
        let old_head = self.head;
        {
            let node = &mut self.nodes[slot as usize];
            node.prev = NIL;
            node.next = old_head;
        }
        match old_head {
            NIL => self.tail = slot,
            h => self.nodes[h as usize].prev = slot,
        }
        self.head = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_keeps_len_bounded() {
        let mut lru = PodLru::new(2);
        *lru.get_or_insert_with("a", || 1) += 10;
        lru.get_or_insert_with("b", || 2);
        // Touch a: b becomes the least recently used.
        assert_eq!(*lru.get_or_insert_with("a", || 0), 11);
        lru.get_or_insert_with("c", || 3);
        assert_eq!(lru.len(), 2);
        assert_eq!(*lru.get_or_insert_with("a", || 0), 11, "a survived");
        assert_eq!(
            *lru.get_or_insert_with("b", || 20),
            20,
            "b was evicted, recreated"
        );
        assert_eq!(
            *lru.get_or_insert_with("a", || 0),
            11,
            "c was evicted by b, not a"
        );
        assert_eq!(*lru.get_or_insert_with("c", || 30), 30);
    }

    #[test]
    fn capacity_one_and_long_churn_keep_links_consistent() {
        let mut lru = PodLru::new(1);
        for i in 0..100u32 {
            let key = format!("pod-{}", i % 7);
            lru.get_or_insert_with(&key, || i);
            assert_eq!(lru.len(), 1);
        }
        let mut lru = PodLru::new(3);
        for i in 0..1000u32 {
            let key = format!("pod-{}", (i * 7919) % 11);
            lru.get_or_insert_with(&key, || i);
        }
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.index.len(), 3);
        // Walk the list from the head: exactly 3 nodes, consistent back links.
        let (mut seen, mut at, mut prev) = (0, lru.head, NIL);
        while at != NIL {
            assert_eq!(lru.nodes[at as usize].prev, prev);
            prev = at;
            at = lru.nodes[at as usize].next;
            seen += 1;
        }
        assert_eq!((seen, prev), (3, lru.tail));
    }
}
