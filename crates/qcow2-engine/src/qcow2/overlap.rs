//! Overlap checks: the map of host ranges holding metadata, consulted before every host write.
//!
//! QEMU's `qcow2_pre_write_overlap_check` with its default `cached` set: header, active and inactive L1
//! tables, active L2 tables, refcount table and blocks, snapshot table, bitmap directory. A write that
//! would land on any of them (other than the structure being written, at its own place) is refused and
//! the image marked corrupt by the caller.
//!
//! SKELETON (issue 3): H-ref implements; the signatures and docs below are the contract.

/// The kind of a metadata structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MetaKind {
    /// The header cluster (cluster 0; with extensions it may be more than a cluster? no: one cluster).
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
/// check that (the caller registers what the image says).
#[derive(Debug, Default)]
pub(crate) struct OverlapMap {
    _todo: (),
}

impl OverlapMap {
    /// An empty map.
    pub(crate) fn new() -> OverlapMap {
        OverlapMap::default()
    }

    /// Registers `[offset, offset + len)` as holding `kind`.
    pub(crate) fn insert(&mut self, offset: u64, len: u64, kind: MetaKind) {
        let _ = (offset, len, kind);
    }

    /// Forgets every range that starts within `[offset, offset + len)` (clusters freed).
    pub(crate) fn remove_range(&mut self, offset: u64, len: u64) {
        let _ = (offset, len);
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
        let _ = (offset, len, own);
        Ok(())
    }
}
