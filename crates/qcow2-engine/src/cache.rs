//! A least-recently-used cache of metadata slices (L2 table slices), keyed by host offset.
//!
//! Keys are host byte offsets of the cached slice, so that L2 tables shared between several L1 entries
//! (possible after internal snapshots) are cached once. The cache lives under the image's metadata mutex,
//! so it needs no locking of its own. Lookups and insertions are O(1): a hash map from key to a slot in a
//! slab, and a doubly linked recency list threaded through the slab.

use std::collections::HashMap;

/// Marks the end of the recency list.
const NIL: usize = usize::MAX;

struct Node<V> {
    key: u64,
    value: V,
    /// Towards the most recently used end.
    prev: usize,
    /// Towards the least recently used end.
    next: usize,
}

/// An LRU cache with a fixed number of entries.
pub(crate) struct LruCache<V> {
    map: HashMap<u64, usize>,
    nodes: Vec<Node<V>>,
    /// Most recently used slot, or `NIL`.
    head: usize,
    /// Least recently used slot, or `NIL`.
    tail: usize,
    capacity: usize,
    hits: u64,
    misses: u64,
}

impl<V> LruCache<V> {
    /// A cache holding at most `capacity` entries (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        LruCache {
            map: HashMap::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    /// The maximum number of entries.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Looks `key` up without changing recency or statistics.
    pub(crate) fn peek(&self, key: u64) -> Option<&V> {
        self.map.get(&key).map(|&slot| &self.nodes[slot].value)
    }

    /// (hits, misses) counted by [`LruCache::get`].
    pub(crate) fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Looks `key` up and marks it most recently used.
    pub(crate) fn get(&mut self, key: u64) -> Option<&V> {
        match self.map.get(&key).copied() {
            Some(slot) => {
                self.hits += 1;
                self.unlink(slot);
                self.push_front(slot);
                Some(&self.nodes[slot].value)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Looks `key` up for modification and marks it most recently used (no statistics).
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        let slot = self.map.get(&key).copied()?;
        self.unlink(slot);
        self.push_front(slot);
        Some(&mut self.nodes[slot].value)
    }

    /// The entry the next insertion of a new key would evict, when the cache is full.
    pub(crate) fn victim(&self) -> Option<&V> {
        if self.nodes.len() >= self.capacity && self.tail != NIL {
            Some(&self.nodes[self.tail].value)
        } else {
            None
        }
    }

    /// Every entry with its key, in no particular order (for write-back).
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut V)> {
        self.nodes.iter_mut().map(|n| (n.key, &mut n.value))
    }

    /// Inserts (or replaces) `key`, evicting the least recently used entry when full. Returns the value
    /// as stored.
    pub(crate) fn insert(&mut self, key: u64, value: V) -> &V {
        if let Some(slot) = self.map.get(&key).copied() {
            self.nodes[slot].value = value;
            self.unlink(slot);
            self.push_front(slot);
            return &self.nodes[slot].value;
        }
        let slot = if self.nodes.len() < self.capacity {
            self.nodes.push(Node {
                key,
                value,
                prev: NIL,
                next: NIL,
            });
            self.nodes.len() - 1
        } else {
            // Full, so the list is non-empty and `tail` is a valid slot.
            let slot = self.tail;
            self.unlink(slot);
            let old_key = self.nodes[slot].key;
            self.map.remove(&old_key);
            self.nodes[slot].key = key;
            self.nodes[slot].value = value;
            slot
        };
        self.map.insert(key, slot);
        self.push_front(slot);
        &self.nodes[slot].value
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.nodes[slot].prev, self.nodes[slot].next);
        if prev == NIL {
            if self.head == slot {
                self.head = next;
            }
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            if self.tail == slot {
                self.tail = prev;
            }
        } else {
            self.nodes[next].prev = prev;
        }
        self.nodes[slot].prev = NIL;
        self.nodes[slot].next = NIL;
    }

    fn push_front(&mut self, slot: usize) {
        self.nodes[slot].prev = NIL;
        self.nodes[slot].next = self.head;
        if self.head != NIL {
            self.nodes[self.head].prev = slot;
        }
        self.head = slot;
        if self.tail == NIL {
            self.tail = slot;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = LruCache::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        assert_eq!(c.get(1), Some(&"a")); // 1 is now most recent
        c.insert(3, "c"); // evicts 2
        assert_eq!(c.get(2), None);
        assert_eq!(c.get(1), Some(&"a"));
        assert_eq!(c.get(3), Some(&"c"));
        assert_eq!(c.len(), 2);
        c.insert(4, "d"); // evicts 1
        assert_eq!(c.get(1), None);
        assert_eq!(c.stats(), (3, 2));
    }

    #[test]
    fn capacity_one_and_replace() {
        let mut c = LruCache::new(0);
        assert_eq!(c.capacity(), 1);
        c.insert(7, 1);
        c.insert(7, 2);
        assert_eq!(c.get(7), Some(&2));
        c.insert(8, 3);
        assert_eq!(c.get(7), None);
        assert_eq!(c.get(8), Some(&3));
    }

    #[test]
    fn many_keys_stay_consistent() {
        let mut c = LruCache::new(16);
        for i in 0..1000u64 {
            c.insert(i % 37, i);
            if i % 3 == 0 {
                let _ = c.get((i * 7) % 37);
            }
            assert!(c.len() <= 16);
        }
        // The 16 most recent insertions of distinct keys must be present... at least the last one.
        assert_eq!(c.get(999 % 37), Some(&999));
    }
}
