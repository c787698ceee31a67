//! Zero writes and discards of whole clusters, with QEMU 10's semantics (`qcow2_subcluster_zeroize`
//! with `zero_in_l2_slice`, and `qcow2_cluster_discard` with `discard_in_l2_slice`).
//!
//! - Zero (v3): every whole cluster becomes a zero cluster. Without `unmap` the entry keeps its host
//!   offset and COPIED flag (a kept allocation); with `unmap`, and always for compressed clusters, the
//!   host cluster is released. With extended L2 the bitmap becomes "all zeros" (and the allocation is
//!   kept or released the same way).
//! - Discard (full_discard = false, as for a guest discard): an allocated cluster, or any cluster when
//!   there is a backing file, becomes a zero cluster on v3 (all-zero bitmap with extended L2, entry
//!   without offset) and unallocated on v2; an unallocated cluster without a backing file becomes
//!   unallocated. The host cluster is released.
//!
//! Released clusters are freed by deferred refcount decrements, after the L2 change is durable (see
//! `flush.rs`); their host range is then punched, so a discard reaches the host file. The caller
//! (`crate::write`) turns partial clusters into explicit zero writes (zero) or ignores them (discard),
//! as QEMU's block layer does.

use qcow2_format::l2::{L2Entry, L2E_COPIED, L2E_OFFSET_MASK, L2E_ZERO};
use qcow2_io::Backend;

use super::super::entry::ClusterEntry;
use super::super::Qcow2Layer;
use crate::error::{Error, Result};

/// Which whole-cluster operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroOp {
    /// Write zeroes; `unmap` allows releasing the host clusters.
    Zero {
        /// qemu-io `write -z -u`.
        unmap: bool,
    },
    /// Discard.
    Discard,
}

/// The all-zeros bitmap of an extended L2 entry (zero bits set, allocation bits clear).
const BITMAP_ALL_ZEROES: u64 = (u32::MAX as u64) << 32;

/// Which part of a cluster a subcluster-level zero write covers, and on what condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubZero {
    /// Zero the subclusters (extended L2) of `[offset, offset + len)`, a subcluster-aligned part of one
    /// cluster (QEMU's `zero_l2_subclusters`); refused for a compressed cluster.
    Range,
    /// Zero the (sub)cluster holding `offset` only if it is unallocated or zero (QEMU's check for an
    /// unaligned zero write whose rest already reads as zeros); `backing_zero`: the backing chain reads
    /// as zeros over the rest of it.
    IfUnallocated {
        /// The backing chain reads as zeros there (or there is none).
        backing_zero: bool,
        /// qemu-io `write -z -u`.
        unmap: bool,
    },
}

impl<B: Backend> Qcow2Layer<B> {
    /// Applies `op` to the whole clusters of `[offset, offset + len)` (cluster-aligned, or ending at
    /// the end of the virtual disk). `has_backing`: the image has a backing file.
    pub(crate) async fn zero_clusters(
        &self,
        offset: u64,
        len: u64,
        op: ZeroOp,
        has_backing: bool,
    ) -> Result<()> {
        let cs = self.geom.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (mut guard, stop) = self.lock_step(pos, end).await?;
            let meta = &mut *guard;
            // A table is needed only when some entry must change from unallocated.
            let v3 = self.header.version() == qcow2_format::header::Version::V3;
            let create = match op {
                ZeroOp::Zero { .. } => true,
                ZeroOp::Discard => has_backing && v3,
            };
            let Some(table) = self.l2_table_for_write(meta, pos, create).await? else {
                pos = stop;
                continue;
            };
            let mut g = pos;
            while g < stop {
                let e = self.entry_for_write(meta, table, g).await?;
                let (old_raw, old_bm) = raw_words(&e, self.geom, self.data_file.is_some())?;
                let (new_raw, new_bm, release) =
                    self.zeroed_entry(&e, old_raw, op, has_backing, v3);
                if (new_raw, new_bm) != (old_raw, old_bm) {
                    self.set_entry(meta, table, g, new_raw, new_bm).await?;
                    if release && self.data_file.is_none() {
                        let freed = match e.entry {
                            L2Entry::Compressed(d) => {
                                let (o, l) = d.host_range();
                                Some((o.0, l))
                            }
                            other => other.host_cluster().map(|h| (h.0, cs)),
                        };
                        if let Some((o, l)) = freed {
                            let w = meta.w.as_deref_mut().ok_or(Error::ReadOnly)?;
                            w.refcounts.defer_decrement(o, l);
                        }
                    }
                }
                g += cs;
            }
            pos = stop;
        }
        Ok(())
    }

    /// Zeroes part of one cluster at subcluster granularity as `how` says, under the metadata lock in
    /// one step (so the condition and the change are atomic). Returns false when the operation does not
    /// apply (the caller then writes zeros, as QEMU's block layer falls back on `-ENOTSUP`).
    pub(crate) async fn zero_subclusters(
        &self,
        offset: u64,
        len: u64,
        how: SubZero,
    ) -> Result<bool> {
        let cs = self.geom.cluster_size();
        let sc = self.geom.subcluster_size();
        {
            // The part lies within one cluster, so the step covers it whole.
            let (mut guard, _) = self.lock_step(offset, offset + len.max(1)).await?;
            let meta = &mut *guard;
            let table = self
                .l2_table_for_write(meta, offset, true)
                .await?
                .ok_or_else(|| Error::corrupt(&self.name, "internal: no L2 table after create"))?;
            let e = self.entry_for_write(meta, table, offset).await?;
            let (old_raw, old_bm) = raw_words(&e, self.geom, self.data_file.is_some())?;
            let in_cluster = offset % cs;
            let first = (in_cluster / sc) as u32;
            let count = len.div_ceil(sc).max(1) as u32;
            let mask = if count >= 32 {
                u32::MAX
            } else {
                ((1u32 << count) - 1) << first
            };
            let (new_raw, new_bm, release) = match how {
                SubZero::Range => {
                    if matches!(e.entry, L2Entry::Compressed(_)) {
                        return Ok(false);
                    }
                    let bm = old_bm | (u64::from(mask) << 32);
                    (old_raw, bm & !u64::from(mask), false)
                }
                SubZero::IfUnallocated {
                    backing_zero,
                    unmap,
                } => {
                    let st = e.subcluster(first, sc, &self.name, &|| String::new())?;
                    let ok = match st {
                        super::super::SubState::Zero(_) => true,
                        super::super::SubState::Unallocated(_) => backing_zero,
                        _ => false,
                    };
                    if !ok {
                        return Ok(false);
                    }
                    if self.geom.extended_l2 {
                        let bm = old_bm | (u64::from(mask) << 32);
                        (old_raw, bm & !u64::from(mask), false)
                    } else {
                        let v3 = self.header.version() == qcow2_format::header::Version::V3;
                        let op = if v3 {
                            ZeroOp::Zero { unmap }
                        } else {
                            ZeroOp::Discard
                        };
                        self.zeroed_entry(&e, old_raw, op, false, v3)
                    }
                }
            };
            if (new_raw, new_bm) != (old_raw, old_bm) {
                self.set_entry(meta, table, offset, new_raw, new_bm).await?;
                if release && self.data_file.is_none() {
                    if let Some(h) = e.entry.host_cluster() {
                        let w = meta.w.as_deref_mut().ok_or(Error::ReadOnly)?;
                        w.refcounts.defer_decrement(h.0, cs);
                    }
                }
            }
            Ok(true)
        }
    }

    /// The new (entry, bitmap) of a cluster after `op`, and whether its host cluster is released.
    fn zeroed_entry(
        &self,
        e: &ClusterEntry,
        old_raw: u64,
        op: ZeroOp,
        has_backing: bool,
        v3: bool,
    ) -> (u64, u64, bool) {
        let ext = self.geom.extended_l2;
        let allocated = match e.entry {
            L2Entry::Unallocated => false,
            L2Entry::Zero { preallocated, .. } => preallocated.is_some(),
            L2Entry::Normal { .. } | L2Entry::Compressed(_) => true,
        };
        match op {
            ZeroOp::Zero { unmap } => {
                let compressed = matches!(e.entry, L2Entry::Compressed(_));
                let release = compressed || (unmap && allocated);
                let base = if release { 0 } else { old_raw };
                if ext {
                    (base, BITMAP_ALL_ZEROES, release)
                } else {
                    (base | L2E_ZERO, 0, release)
                }
            }
            ZeroOp::Discard => {
                if has_backing || allocated {
                    if ext {
                        (0, BITMAP_ALL_ZEROES, allocated)
                    } else {
                        (if v3 { L2E_ZERO } else { 0 }, 0, allocated)
                    }
                } else {
                    (0, 0, allocated)
                }
            }
        }
    }
}

/// The raw words of a decoded entry, re-encoded (the decoder validated them; re-encoding gives the
/// canonical form QEMU compares against).
fn raw_words(
    e: &ClusterEntry,
    geom: qcow2_format::types::Geometry,
    has_data_file: bool,
) -> Result<(u64, u64)> {
    let raw = match e.entry {
        L2Entry::Normal { host, copied } if has_data_file && host.0 == 0 => {
            if copied {
                L2E_COPIED
            } else {
                0
            }
        }
        L2Entry::Zero {
            preallocated,
            copied,
        } if geom.extended_l2 => {
            preallocated.map_or(0, |h| h.0 & L2E_OFFSET_MASK) | if copied { L2E_COPIED } else { 0 }
        }
        other => other.encode(geom).map_err(|err| Error::Corrupt {
            path: String::new(),
            detail: format!("internal: L2 entry does not re-encode: {err}"),
        })?,
    };
    Ok((raw, e.bitmap.map_or(0, |b| b.encode())))
}
