//! In-flight allocations and busy host clusters: the analogue of QEMU's `QCowL2Meta` list with its
//! `CoQueue dependent_requests`, plus the host-cluster tracking QEMU lacks.
//!
//! An allocating request registers the guest clusters it is filling ([`Tracker::register`]) while it
//! holds the metadata mutex, then drops the mutex for its COW and data I/O. A request that overlaps it
//! (at guest-cluster granularity, as QEMU's `handle_dependencies`) either stops short of it or waits on
//! its event and restarts its lookup ([`Tracker::conflict`]). The listener is created while the tracker's
//! own lock is held, and the registration is removed and its waiters notified under that same lock (in
//! [`AllocGuard`]'s `Drop`), so no wake-up is lost; `Drop` also runs on error paths and when a request
//! future is cancelled, so waiters never hang.
//!
//! Fast-path I/O (a write into a NORMAL COPIED cluster, done without the mutex) marks its host clusters
//! busy ([`Tracker::mark_busy`]) until it completes. Deferred refcount decrements skip busy clusters,
//! so a host cluster is never freed, reused or punched while I/O on it is still running (the race that
//! QEMU still has between a discard and an in-place write).
//!
//! The tracker's lock is a `std::sync::Mutex` held for a few instructions and never across an await.
//! Lock order: the metadata mutex (when held) before the tracker lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use event_listener::{Event, EventListener};

/// One registered allocation.
struct Entry {
    id: u64,
    /// First guest cluster index.
    first: u64,
    /// One past the last guest cluster index.
    end: u64,
    /// Notified when the allocation is done (linked or abandoned).
    done: Arc<Event>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    allocs: Vec<Entry>,
    /// Host cluster offset -> number of fast-path I/Os running on it.
    busy: HashMap<u64, u32>,
}

/// In-flight allocations and busy host clusters of one read-write layer.
#[derive(Default)]
pub(crate) struct Tracker {
    inner: Mutex<Inner>,
}

/// What a request must do about in-flight allocations overlapping its guest clusters.
pub(crate) enum Conflict {
    /// Nothing overlaps.
    None,
    /// An allocation covers the first cluster: wait for it, then look up again.
    Wait(EventListener),
    /// The first overlapping allocation starts at this guest cluster index: stop before it.
    StopAt(u64),
}

impl Tracker {
    /// The tracker's state. A poisoned lock only means a panic elsewhere while it was held; the data
    /// (a list and a map updated in single steps) is still consistent, so carry on.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the guest clusters `[first, end)` against the in-flight allocations.
    pub(crate) fn conflict(&self, first: u64, end: u64) -> Conflict {
        let inner = self.lock();
        let mut stop: Option<u64> = None;
        for a in &inner.allocs {
            if a.first < end && first < a.end {
                if a.first <= first {
                    return Conflict::Wait(a.done.listen());
                }
                stop = Some(stop.map_or(a.first, |s| s.min(a.first)));
            }
        }
        match stop {
            Some(s) => Conflict::StopAt(s),
            None => Conflict::None,
        }
    }

    /// Registers an allocation of the guest clusters `[first, end)`. The caller must hold the metadata
    /// mutex and have checked [`Tracker::conflict`] under it.
    pub(crate) fn register(self: &Arc<Self>, first: u64, end: u64) -> AllocGuard {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id = inner.next_id.wrapping_add(1);
        inner.allocs.push(Entry {
            id,
            first,
            end,
            done: Arc::new(Event::new()),
        });
        AllocGuard {
            tracker: Arc::clone(self),
            id,
        }
    }

    /// Marks the `n` host clusters starting at `host` (cluster-aligned, `cs` bytes each) busy until the
    /// guard is dropped.
    pub(crate) fn mark_busy(self: &Arc<Self>, host: u64, n: u64, cs: u64) -> BusyGuard {
        let mut inner = self.lock();
        let clusters: Vec<u64> = (0..n).map(|i| host + i * cs).collect();
        for &c in &clusters {
            *inner.busy.entry(c).or_insert(0) += 1;
        }
        BusyGuard {
            tracker: Arc::clone(self),
            clusters,
        }
    }

    /// Whether fast-path I/O is running on the host cluster at `cluster` (cluster-aligned).
    pub(crate) fn is_busy(&self, cluster: u64) -> bool {
        self.lock().busy.contains_key(&cluster)
    }

    /// Number of registered allocations (for tests and assertions).
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.lock().allocs.len()
    }
}

/// Removes its allocation from the tracker and wakes every waiter when dropped.
pub(crate) struct AllocGuard {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for AllocGuard {
    fn drop(&mut self) {
        let mut inner = self.tracker.lock();
        if let Some(i) = inner.allocs.iter().position(|a| a.id == self.id) {
            let e = inner.allocs.swap_remove(i);
            e.done.notify(usize::MAX);
        }
    }
}

/// Unmarks its busy host clusters when dropped.
pub(crate) struct BusyGuard {
    tracker: Arc<Tracker>,
    clusters: Vec<u64>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut inner = self.tracker.lock();
        for c in &self.clusters {
            if let Some(n) = inner.busy.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    inner.busy.remove(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_at_cluster_granularity() {
        let t = Arc::new(Tracker::default());
        let g = t.register(4, 6);
        assert!(matches!(t.conflict(0, 4), Conflict::None));
        assert!(matches!(t.conflict(2, 8), Conflict::StopAt(4)));
        assert!(matches!(t.conflict(5, 9), Conflict::Wait(_)));
        drop(g);
        assert_eq!(t.in_flight(), 0);
        assert!(matches!(t.conflict(5, 9), Conflict::None));
    }

    #[test]
    fn waiters_are_woken_when_the_guard_drops() {
        let t = Arc::new(Tracker::default());
        let g = t.register(0, 1);
        let Conflict::Wait(l) = t.conflict(0, 1) else {
            panic!("expected to wait")
        };
        drop(g);
        // The listener was registered before the notification, so it completes at once.
        futures::executor::block_on(l);
    }

    #[test]
    fn busy_counts_nest() {
        let t = Arc::new(Tracker::default());
        let a = t.mark_busy(65536, 2, 65536);
        let b = t.mark_busy(65536, 1, 65536);
        assert!(t.is_busy(65536) && t.is_busy(131072));
        drop(a);
        assert!(t.is_busy(65536) && !t.is_busy(131072));
        drop(b);
        assert!(!t.is_busy(65536));
    }
}
