//! Refcounts: the refcount table, a write-back cache of whole refcount blocks, the cluster allocator.
//!
//! Spec: qcow2.txt, "Host cluster management". Ordering (DESIGN.md, "Metadata caches and crash-safe
//! ordering"): increments are cached dirty and written by [`Refcounts::write_back`], which the caller
//! follows with an fdatasync before any L2 entry relying on them is written; decrements are deferred
//! until the caller has made the dropping L2 change durable ([`Refcounts::apply_deferred`]); new refcount
//! blocks and a moved refcount table are written and synced at once, self-describing.
//!
//! SKELETON (issue 3): H-ref implements; the signatures and docs below are the contract.

use qcow2_format::image_header::ImageHeader;
use qcow2_format::types::Geometry;
use qcow2_io::Backend;

use super::overlap::OverlapMap;
use crate::error::{Error, Result};

/// Where metadata I/O goes, for the refcount module: the image file and its name.
pub(crate) struct MetaIo<'a, B> {
    /// The image file.
    pub(crate) file: &'a B,
    /// Its name, for messages.
    pub(crate) name: &'a str,
    /// Cluster geometry.
    pub(crate) geom: Geometry,
}

/// A run of newly allocated host clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostAlloc {
    /// Host offset of the first cluster.
    pub(crate) offset: u64,
    /// Number of clusters.
    pub(crate) clusters: u64,
    /// True when no cluster of the run was ever allocated since the image was opened and all lie at or
    /// past the file's end at open: their content reads as zeros (no zero-fill needed for COW).
    pub(crate) fresh: bool,
}

/// Refcount state of one read-write qcow2 layer (under the metadata mutex).
pub(crate) struct Refcounts {
    _todo: (),
}

impl Refcounts {
    /// Loads the refcount table named by `header` (blocks are read on demand and cached whole).
    /// `file_len` is the image file's length at open. `lazy`: the image uses lazy refcounts (blocks may
    /// lag on disk; the caller handles the dirty bit).
    pub(crate) async fn load<B: Backend>(
        io: &MetaIo<'_, B>,
        header: &ImageHeader,
        file_len: u64,
    ) -> Result<Refcounts> {
        let _ = (header, file_len);
        Err(Error::Unsupported {
            path: io.name.to_owned(),
            what: "writing (refcounts not implemented yet)".into(),
        })
    }

    /// Registers the refcount table and every refcount block in `map`.
    pub(crate) fn register_metadata(&self, map: &mut OverlapMap) {
        let _ = map;
    }

    /// The refcount of the cluster holding host offset `offset` (0 beyond the table).
    pub(crate) async fn get<B: Backend>(&mut self, io: &MetaIo<'_, B>, offset: u64) -> Result<u64> {
        let _ = (io, offset);
        Ok(0)
    }

    /// Allocates `n >= 1` contiguous free clusters (refcount 0 -> 1 in the cache, blocks dirty),
    /// searching from the lowest possibly-free cluster so freed clusters are reused; grows refcount
    /// blocks / the table as needed (synced at once, registered in `map`).
    pub(crate) async fn alloc<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        n: u64,
    ) -> Result<HostAlloc> {
        let _ = (map, n);
        Err(Error::Unsupported {
            path: io.name.to_owned(),
            what: "allocation".into(),
        })
    }

    /// Adds one reference to every cluster overlapping `[offset, offset + len)`. On overflow of the
    /// refcount width, returns [`Error::RefcountOverflow`] and changes nothing.
    pub(crate) async fn increment<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let _ = (io, map, offset, len);
        Ok(())
    }

    /// Records that one reference to every cluster overlapping `[offset, offset + len)` was dropped.
    /// Nothing changes until [`Refcounts::apply_deferred`].
    pub(crate) fn defer_decrement(&mut self, offset: u64, len: u64) {
        let _ = (offset, len);
    }

    /// Whether deferred decrements are waiting.
    pub(crate) fn has_deferred(&self) -> bool {
        false
    }

    /// Applies the deferred decrements of clusters for which `busy(cluster_offset)` is false (the
    /// others stay deferred). Call only after the L2 changes that dropped the references are durable.
    /// Returns the host ranges whose refcount reached 0 (now free: the caller punches holes and removes
    /// them from the overlap map). Underflow (decrement of 0) is a corruption error.
    pub(crate) async fn apply_deferred<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        busy: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<Vec<(u64, u64)>> {
        let _ = (io, busy);
        Ok(Vec::new())
    }

    /// Writes every dirty refcount block (overlap-checked), without fdatasync. Returns whether anything
    /// was written.
    pub(crate) async fn write_back<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &OverlapMap,
    ) -> Result<bool> {
        let _ = (io, map);
        Ok(false)
    }

    /// Whether dirty blocks are waiting to be written.
    pub(crate) fn is_dirty(&self) -> bool {
        false
    }
}
