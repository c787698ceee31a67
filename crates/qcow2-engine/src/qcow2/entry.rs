//! Interpretation of L2 entries for reading: per-cluster entry and per-subcluster state.
//!
//! Spec: qcow2.txt, "Standard Cluster Descriptor", "Compressed Clusters Descriptor", "Extended L2
//! Entries". Decoding and bit-level validation (alignment, reserved bits, invalid bitmap combinations,
//! QEMU's external-data-file rule for offset 0 with COPIED) are the format crate's; this module wraps its
//! errors as corruption naming the file, the L2 table and the index.

use qcow2_format::compressed::CompressedDescriptor;
use qcow2_format::l2::{
    decode_l2_with, subcluster_state, L2Entry, SubclusterBitmap, SubclusterState,
};
use qcow2_format::types::{Geometry, HostOffset};

use crate::error::{Error, Result};

/// One decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClusterEntry {
    pub(crate) entry: L2Entry,
    pub(crate) bitmap: Option<SubclusterBitmap>,
}

/// The state of one subcluster (or, without extended L2, of the whole cluster), with host offsets of
/// the subcluster's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubState {
    /// Data at this host offset.
    Data(HostOffset),
    /// Reads as zeros; host offset where allocated.
    Zero(Option<HostOffset>),
    /// Falls through to the backing image; host offset where the cluster is allocated (extended L2).
    Unallocated(Option<HostOffset>),
    /// Compressed cluster.
    Compressed(CompressedDescriptor),
}

/// Decodes entry `index` of the L2 slice `slice`. `where_` describes the entry for error messages.
pub(crate) fn cluster_entry(
    path: &str,
    slice: &[u8],
    index: usize,
    geom: Geometry,
    has_data_file: bool,
    where_: &dyn Fn() -> String,
) -> Result<ClusterEntry> {
    let (entry, bitmap) = decode_l2_with(slice, index, geom, has_data_file)
        .map_err(|e| Error::corrupt(path, format!("{}: {e}", where_())))?;
    Ok(ClusterEntry { entry, bitmap })
}

impl ClusterEntry {
    /// The state of subcluster `sc` (0 without extended L2). Invalid bitmap combinations are
    /// corruption, as QEMU's `QCOW2_SUBCLUSTER_INVALID`.
    pub(crate) fn subcluster(
        &self,
        sc: u32,
        subcluster_size: u64,
        path: &str,
        where_: &dyn Fn() -> String,
    ) -> Result<SubState> {
        let sc_in = if self.bitmap.is_some() { sc } else { 0 };
        let st = subcluster_state(&self.entry, self.bitmap, sc_in)
            .map_err(|e| Error::corrupt(path, format!("{}, subcluster {sc}: {e}", where_())))?;
        // sc < 32 and subcluster_size <= 64 KiB; host offsets are < 2^56: no overflow.
        let delta = u64::from(sc_in) * subcluster_size;
        Ok(match st {
            SubclusterState::Normal { host } => SubState::Data(HostOffset(host.0 + delta)),
            SubclusterState::ZeroPlain => SubState::Zero(None),
            SubclusterState::ZeroAlloc { host } => SubState::Zero(Some(HostOffset(host.0 + delta))),
            SubclusterState::UnallocatedPlain => SubState::Unallocated(None),
            SubclusterState::UnallocatedAlloc { host } => {
                SubState::Unallocated(Some(HostOffset(host.0 + delta)))
            }
            SubclusterState::Compressed(d) => SubState::Compressed(d),
        })
    }
}
