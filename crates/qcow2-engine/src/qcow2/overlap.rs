//! Overlap checks: the map of host ranges holding metadata, consulted before every host write.
//!
//! QEMU's `qcow2_pre_write_overlap_check` with its default `cached` set: header, active and inactive L1
//! tables, active L2 tables, refcount table and blocks, snapshot table, bitmap directory. A write that
//! would land on any of them (other than the structure being written, at its own place) is refused and
//! the image marked corrupt by the caller.
//!
//! The map is a `BTreeMap` from range start to (end, kind): since registered ranges do not overlap each
//! other in a valid image, a write `[a, b)` hits a range iff the range starting last before `a` reaches
//! past `a`, or some range starts inside `[a, b)`: two O(log n) lookups.

use std::collections::BTreeMap;

/// The kind of a metadata structure (ordered only to key the map: `Header` first, `BitmapDirectory`
/// last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum MetaKind {
    /// The header cluster (cluster 0: the header, its extensions and the backing file name all live in
    /// it).
    Header,
    /// The active L1 table.
    ActiveL1,
    /// An inactive (snapshot) L1 table.
    InactiveL1,
    /// An active L2 table (one cluster).
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block (one cluster).
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// The bitmap directory.
    BitmapDirectory,
}

impl MetaKind {
    /// A human name for messages ("active L1 table", ...).
    pub(crate) fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2 header",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::InactiveL1 => "inactive L1 table",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::BitmapDirectory => "bitmap directory",
        }
    }
}

/// A metadata range that a write would overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverlapHit {
    /// What is there.
    pub(crate) kind: MetaKind,
    /// Its host offset.
    pub(crate) offset: u64,
    /// Its length in bytes.
    pub(crate) len: u64,
}

/// Host ranges of metadata. Ranges never overlap each other in a valid image; insertion does not
/// check that (the caller registers what the image says). In a corrupt image, structures of different
/// kinds registered at the same start are all kept (an L2 table that is also a refcount block protects
/// each from the other's writes); a range hidden behind a longer one starting earlier may go unnoticed
/// by [`OverlapMap::check`], which still reports the structures that do not overlap each other, which
/// is what QEMU's check guards.
#[derive(Debug, Default)]
pub(crate) struct OverlapMap {
    /// (range start, kind) -> exclusive end. Registering the same kind again at the same start replaces
    /// the range.
    ranges: BTreeMap<(u64, MetaKind), u64>,
    /// End of the header cluster, checked apart from `ranges` (as QEMU checks the main header on its
    /// own): a corrupt image whose L1 or refcount table claims offset 0 must not make the header
    /// writable for that table's updates.
    header_end: u64,
}

/// The smallest and largest kinds, bounding range queries over one start.
const FIRST_KIND: MetaKind = MetaKind::Header;
const LAST_KIND: MetaKind = MetaKind::BitmapDirectory;

impl OverlapMap {
    /// An empty map.
    pub(crate) fn new() -> OverlapMap {
        OverlapMap::default()
    }

    /// Registers `[offset, offset + len)` as holding `kind`. An empty range is not registered (nothing
    /// can overlap it); a range running past `u64::MAX` is clamped there.
    pub(crate) fn insert(&mut self, offset: u64, len: u64, kind: MetaKind) {
        if len == 0 {
            return;
        }
        if kind == MetaKind::Header {
            self.header_end = self.header_end.max(offset.saturating_add(len));
        }
        self.ranges
            .insert((offset, kind), offset.saturating_add(len));
    }

    /// Forgets every range that starts within `[offset, offset + len)` (clusters freed).
    pub(crate) fn remove_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if end <= offset {
            return;
        }
        let keys: Vec<(u64, MetaKind)> = self
            .ranges
            .range((offset, FIRST_KIND)..(end, FIRST_KIND))
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            self.ranges.remove(&k);
        }
    }

    /// The number of registered ranges.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether nothing is registered.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Checks a host write of `len` bytes at `offset`. `own`: the structure being written, at exactly
    /// the range registered for it (`Some((kind, its offset))`), which is not a hit; `None` for guest
    /// data and COW writes. O(log n).
    pub(crate) fn check(
        &self,
        offset: u64,
        len: u64,
        own: Option<(MetaKind, u64)>,
    ) -> Result<(), OverlapHit> {
        if len == 0 {
            return Ok(());
        }
        if offset < self.header_end && own != Some((MetaKind::Header, 0)) {
            return Err(OverlapHit {
                kind: MetaKind::Header,
                offset: 0,
                len: self.header_end,
            });
        }
        let end = offset.saturating_add(len);
        let is_own = |start: u64, kind: MetaKind| own == Some((kind, start));
        let hit = |start: u64, kind: MetaKind, r_end: u64| OverlapHit {
            kind,
            offset: start,
            len: r_end - start,
        };
        // The ranges starting last at or before `offset` (several kinds may share that start): one
        // overlaps iff it reaches past `offset`.
        let mut last_start = None;
        for (&(start, kind), &r_end) in self.ranges.range(..=(offset, LAST_KIND)).rev() {
            if last_start.is_some_and(|s| s != start) {
                break;
            }
            last_start = Some(start);
            if r_end > offset && !is_own(start, kind) {
                return Err(hit(start, kind, r_end));
            }
        }
        // Any range starting inside `(offset, end)` overlaps. At most one of them is `own`, so looking
        // at the first two is enough.
        if offset < u64::MAX {
            for (&(start, kind), &r_end) in self
                .ranges
                .range((offset + 1, FIRST_KIND)..(end, FIRST_KIND))
                .take(2)
            {
                if !is_own(start, kind) {
                    return Err(hit(start, kind, r_end));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> OverlapMap {
        let mut m = OverlapMap::new();
        m.insert(0, 0x10000, MetaKind::Header);
        m.insert(0x30000, 0x10000, MetaKind::ActiveL1);
        m.insert(0x10000, 0x10000, MetaKind::RefcountTable);
        m.insert(0x20000, 0x10000, MetaKind::RefcountBlock);
        m.insert(0x50000, 0x10000, MetaKind::ActiveL2);
        m
    }

    #[test]
    fn hits_and_misses() {
        let m = map();
        assert_eq!(m.len(), 5);
        // Free space between the L1 table and the L2 table.
        assert_eq!(m.check(0x40000, 0x10000, None), Ok(()));
        assert_eq!(m.check(0x60000, 1 << 40, None), Ok(()));
        // Inside, across the start, across the end, and covering a range.
        let l1 = |r: Result<(), OverlapHit>| r.err().map(|h| (h.kind, h.offset, h.len));
        assert_eq!(
            l1(m.check(0x30200, 8, None)),
            Some((MetaKind::ActiveL1, 0x30000, 0x10000))
        );
        assert_eq!(
            l1(m.check(0x2ffff, 2, Some((MetaKind::RefcountBlock, 0x20000)))),
            Some((MetaKind::ActiveL1, 0x30000, 0x10000))
        );
        assert_eq!(
            l1(m.check(0x3ffff, 0x10, None)),
            Some((MetaKind::ActiveL1, 0x30000, 0x10000))
        );
        assert_eq!(
            l1(m.check(0x40000, 0x20000, None)),
            Some((MetaKind::ActiveL2, 0x50000, 0x10000))
        );
        // Exactly at the end of a range: no hit.
        assert_eq!(m.check(0x60000, 0x1000, None), Ok(()));
        assert_eq!(m.check(0x40000, 0x10000, None), Ok(()));
        assert_eq!(m.check(0, 0, None), Ok(()));
    }

    #[test]
    fn own_structure_is_exempt_only_at_its_place() {
        let m = map();
        // Writing the header's reftable fields.
        assert_eq!(m.check(48, 12, Some((MetaKind::Header, 0))), Ok(()));
        // The same write claiming another identity is a hit.
        assert!(m.check(48, 12, Some((MetaKind::ActiveL1, 0))).is_err());
        assert!(m.check(48, 12, Some((MetaKind::Header, 0x200))).is_err());
        // A whole L1 table write, own exemption.
        assert_eq!(
            m.check(0x30000, 0x10000, Some((MetaKind::ActiveL1, 0x30000))),
            Ok(())
        );
        // Running past its own range into the next: the next one is a hit.
        let m2 = {
            let mut m = map();
            m.insert(0x40000, 0x200, MetaKind::SnapshotTable);
            m
        };
        let r = m2.check(0x30000, 0x10001, Some((MetaKind::ActiveL1, 0x30000)));
        assert_eq!(r.err().map(|h| h.kind), Some(MetaKind::SnapshotTable));
        // Spanning two ranges, the first being own: the second is found.
        let r = m2.check(0x3f000, 0x2000, Some((MetaKind::ActiveL1, 0x30000)));
        assert_eq!(r.err().map(|h| h.kind), Some(MetaKind::SnapshotTable));
    }

    #[test]
    fn the_header_stays_protected_under_a_table_claiming_offset_0() {
        let mut m = map();
        // A corrupt image: the L1 table at offset 0 replaces the header's entry in the ranges.
        m.insert(0, 0x200, MetaKind::ActiveL1);
        let r = m.check(0, 8, Some((MetaKind::ActiveL1, 0)));
        assert_eq!(r.err().map(|h| h.kind), Some(MetaKind::Header));
        // And a header write is refused too: it would land on the L1 table.
        let r = m.check(48, 12, Some((MetaKind::Header, 0)));
        assert_eq!(r.err().map(|h| h.kind), Some(MetaKind::ActiveL1));
    }

    #[test]
    fn two_structures_at_one_start_protect_each_other() {
        let mut m = map();
        // A corrupt image: the L2 table at 0x50000 is also a refcount block.
        m.insert(0x50000, 0x10000, MetaKind::RefcountBlock);
        let r = m.check(0x50000, 0x10000, Some((MetaKind::ActiveL2, 0x50000)));
        assert_eq!(r.err().map(|h| h.kind), Some(MetaKind::RefcountBlock));
        let r = m.check(0x50008, 8, Some((MetaKind::RefcountBlock, 0x50000)));
        assert_eq!(r.err().map(|h| h.kind), Some(MetaKind::ActiveL2));
        // Freeing the cluster forgets both.
        m.remove_range(0x50000, 0x10000);
        assert_eq!(m.check(0x50000, 0x10000, None), Ok(()));
    }

    #[test]
    fn remove_range_forgets_starts_inside() {
        let mut m = map();
        m.remove_range(0x20000, 0x20000);
        assert_eq!(m.len(), 3);
        assert_eq!(m.check(0x20000, 0x20000, None), Ok(()));
        assert!(m.check(0x1ffff, 1, None).is_err());
        m.remove_range(0, u64::MAX);
        assert!(m.is_empty());
        // Degenerate inputs do not panic.
        m.insert(u64::MAX - 1, 10, MetaKind::ActiveL2);
        assert!(m.check(u64::MAX - 1, 1, None).is_err());
        m.remove_range(u64::MAX - 1, 5);
        assert!(m.is_empty());
    }
}
