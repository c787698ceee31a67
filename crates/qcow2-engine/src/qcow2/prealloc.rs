//! Detection of metadata-preallocated images, as QEMU's `qcow2_detect_metadata_preallocation`.
//!
//! `qemu-img map` reports data clusters whose host range is a hole in the host file as zero only when
//! QEMU considers the image metadata-preallocated: when the clusters with a non-zero refcount clearly
//! outnumber the clusters the host file really allocates (threshold `max(real * 10 / 9, real + 2)`).
//! The engine computes the same answer once, on the first block-status query, so that its `map` output
//! matches QEMU's. Any error while computing it means "not preallocated", as in QEMU.
//!
//! Spec: qcow2.txt, "Host cluster management" (refcount table and blocks).

use qcow2_format::refcount::{get_refcount, RefcountOrder};
use qcow2_io::Backend;

use super::Qcow2Layer;

/// Bits 9..=63 of a refcount table entry: the refcount block offset.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

impl<B: Backend> Qcow2Layer<B> {
    /// Whether the image looks metadata-preallocated. Called under the metadata lock; the result is
    /// cached by the caller in [`super::Metadata::metadata_prealloc`].
    pub(crate) async fn detect_metadata_prealloc(&self) -> bool {
        self.try_detect().await.unwrap_or(false)
    }

    async fn try_detect(&self) -> Option<bool> {
        let cs = self.geom.cluster_size();
        let real = self.file.allocated_size().await.ok()??;
        let real_clusters = real / cs;
        let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters.saturating_add(2));
        let end_cluster = self.file_len().div_ceil(cs);
        let h = &self.header.header;
        let order = RefcountOrder(h.refcount_order);
        let bits = 1u64 << h.refcount_order.min(6);
        let per_block = cs * 8 / bits;
        let blocks_needed = end_cluster.div_ceil(per_block);
        let table_entries = u64::from(h.refcount_table_clusters) * cs / 8;
        let n = blocks_needed.min(table_entries);
        // Bounded by the refcount table size (format crate: <= 8 MiB).
        let (res, table) = self
            .file
            .read_at(
                crate::buf::io_buf(usize::try_from(n * 8).ok()?),
                h.refcount_table_offset,
            )
            .await;
        res.ok()?;
        let mut count = 0u64;
        let mut block = crate::buf::io_buf(cs as usize);
        for (i, raw) in table.chunks_exact(8).enumerate() {
            if count >= threshold {
                break;
            }
            let raw = u64::from_be_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]);
            let off = raw & REFTABLE_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off >= self.file_len() {
                return None;
            }
            let (res, b) = self.file.read_at(block, off).await;
            block = b;
            res.ok()?;
            let first = i as u64 * per_block;
            let in_block = per_block.min(end_cluster.saturating_sub(first));
            for j in 0..in_block {
                if count >= threshold {
                    break;
                }
                if get_refcount(&block, j as usize, order).ok()? != 0 {
                    count += 1;
                }
            }
        }
        Some(count >= threshold)
    }
}
