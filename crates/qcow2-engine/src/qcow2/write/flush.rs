//! Metadata write-back with barriers, guest flush, clean close.
//!
//! The order (DESIGN.md, "Metadata caches and crash-safe ordering"; argument in docs/ARCHITECTURE.md):
//!
//! 1. dirty refcount blocks are written (they count every cluster referenced by a dirty L2 entry or a
//!    changed L1 entry; skipped with lazy refcounts, whose dirty bit is set durably first);
//! 2. fdatasync of the image file and the data file: refcounts, completed guest data and COW data, and
//!    new or copied L2 tables (written to their clusters at allocation) are now durable;
//! 3. dirty L2 slices and dirty L1 chunks are written;
//! 4. fdatasync: the new mappings are durable;
//! 5. deferred refcount decrements (of clusters whose last reference a now durable L2 or L1 change
//!    dropped) are applied in memory, skipping clusters with fast-path I/O still running; clusters that
//!    reach zero are punched and forgotten by the overlap map. The decremented blocks are written by
//!    the next write-back (a lagging decrement is a leak at worst, never a too-low refcount).
//!
//! A failed fdatasync is sticky: every later flush fails.

use std::sync::atomic::Ordering;

use qcow2_format::header::IncompatibleFeatures;
use qcow2_format::l1::serialize_l1_table;
use qcow2_io::Backend;

use super::super::overlap::MetaKind;
use super::super::{Metadata, Qcow2Layer};
use super::l2::L1_CHUNK_ENTRIES;
use super::{be64, INCOMPATIBLE_OFFSET};
use crate::error::{Error, Result};

impl<B: Backend> Qcow2Layer<B> {
    /// fdatasync of the image file and the data file; sticky on failure.
    pub(crate) async fn sync_file(&self) -> Result<()> {
        let sticky = || {
            Error::Io {
            path: self.name.clone(),
            op: "fdatasync",
            offset: 0,
            source: std::io::Error::other(
                "an earlier fdatasync of this image failed; data may have been lost, so every later \
                 flush fails",
            ),
        }
        };
        if let Some(s) = &self.shared {
            if s.flush_failed.load(Ordering::Acquire) {
                return Err(sticky());
            }
        }
        let mut res = self
            .file
            .flush()
            .await
            .map_err(Error::io(&self.name, "fdatasync", 0));
        if res.is_ok() {
            if let Some(d) = &self.data_file {
                res = d
                    .file
                    .flush()
                    .await
                    .map_err(Error::io(&d.name, "fdatasync", 0));
            }
        }
        if res.is_err() {
            if let Some(s) = &self.shared {
                s.flush_failed.store(true, Ordering::Release);
            }
        }
        res
    }

    /// Writes back every dirty piece of metadata in the order above, ending durable.
    pub(crate) async fn flush_metadata(&self, meta: &mut Metadata) -> Result<()> {
        let Some(w) = meta.w.as_deref_mut() else {
            return Ok(());
        };
        let cs = self.geom.cluster_size();
        let io = self.meta_io();
        // 1. Refcounts (or, with lazy refcounts, the dirty bit that stands in for them).
        if w.lazy() {
            // Decrements applied at the end of this flush make the blocks dirty too: the bit must be
            // set before, or a crash after a flush that only freed clusters would leave a clean image
            // with stale counts (leaks nothing ever repairs on open).
            let will_be_dirty = w.refcounts.is_dirty() || w.refcounts.has_deferred();
            if will_be_dirty && !w.dirty_marked {
                let bits = w.header.header.incompatible | IncompatibleFeatures::DIRTY;
                w.header.header.incompatible = bits;
                self.write_header_field(INCOMPATIBLE_OFFSET, be64(bits.0))
                    .await?;
                w.dirty_marked = true;
            }
        } else {
            w.refcounts.write_back(&io, &w.overlap).await?;
        }
        // 2. Barrier.
        self.sync_file().await?;
        // 3. L2 slices and L1 chunks.
        let mut wrote = false;
        let slice_bytes = self.slice_bytes;
        let dirty: Vec<u64> = meta
            .l2
            .iter_mut()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| k)
            .collect();
        for off in dirty {
            let table = off - off % cs;
            self.guard_write(meta, off, slice_bytes, Some((MetaKind::ActiveL2, table)))
                .await?;
            let Some(slice) = meta.l2.get_mut(off) else {
                continue;
            };
            let bytes = bytes::Bytes::copy_from_slice(&slice.data);
            self.file.write_at(bytes, off).await.map_err(Error::io(
                &self.name,
                "write L2 table",
                off,
            ))?;
            if let Some(slice) = meta.l2.get_mut(off) {
                slice.dirty = false;
            }
            wrote = true;
        }
        // A chunk stays dirty until its write succeeded: a failed write must be retried by the next
        // flush, or the L2 tables it points at would be lost although later flushes succeed.
        let chunks: Vec<usize> = match meta.w.as_deref() {
            Some(w) => w.l1_dirty.iter().copied().collect(),
            None => Vec::new(),
        };
        let l1_off = self.header.header.l1_table_offset;
        for c in chunks {
            let first = c * L1_CHUNK_ENTRIES;
            let last = (first + L1_CHUNK_ENTRIES).min(meta.l1.len());
            if first < last {
                let bytes = serialize_l1_table(&meta.l1[first..last]);
                let off = l1_off + first as u64 * 8;
                self.guard_write(
                    meta,
                    off,
                    bytes.len() as u64,
                    Some((MetaKind::ActiveL1, l1_off)),
                )
                .await?;
                self.file
                    .write_at(bytes.into(), off)
                    .await
                    .map_err(Error::io(&self.name, "write L1 table", off))?;
                wrote = true;
            }
            if let Some(w) = meta.w.as_deref_mut() {
                w.l1_dirty.remove(&c);
            }
        }
        // 4. Barrier.
        if wrote {
            self.sync_file().await?;
        }
        // 5. Deferred decrements.
        self.apply_frees(meta).await
    }

    /// Applies the deferred refcount decrements (their L2 changes are durable), punching freed clusters.
    async fn apply_frees(&self, meta: &mut Metadata) -> Result<()> {
        let Some(w) = meta.w.as_deref_mut() else {
            return Ok(());
        };
        if !w.refcounts.has_deferred() {
            return Ok(());
        }
        let tracker = &self.shared()?.tracker;
        let busy = |c: u64| tracker.is_busy(c);
        let freed = w.refcounts.apply_deferred(&self.meta_io(), &busy).await?;
        for (off, len) in freed {
            w.overlap.remove_range(off, len);
            // Freed clusters of a corrupt image may still hold metadata another structure claims:
            // never discard those on the host.
            if w.overlap.check(off, len, None).is_err() {
                continue;
            }
            if let Err(e) = self.file.punch_hole(off, len).await {
                tracing::debug!(file = %self.name, "punching freed clusters at {off:#x}: {e}");
            }
        }
        Ok(())
    }

    /// Guest flush: every write completed before the call is durable when it returns.
    pub(crate) async fn flush(&self) -> Result<()> {
        self.shared()?;
        let mut meta = self.meta.lock().await;
        self.check_usable()?;
        self.flush_metadata(&mut meta).await
    }

    /// Everything in memory to disk, refcount blocks included also with lazy refcounts (the dirty bit
    /// stays as it is), ending durable: what a consistency check of an open image needs first.
    pub(crate) async fn write_back_all(&self, meta: &mut Metadata) -> Result<()> {
        self.flush_metadata(meta).await?;
        let io = self.meta_io();
        let Some(w) = meta.w.as_deref_mut() else {
            return Ok(());
        };
        if w.refcounts.write_back(&io, &w.overlap).await? {
            self.sync_file().await?;
        }
        Ok(())
    }

    /// Clean close: flush, then write the refcount blocks (also with lazy refcounts, and the
    /// decrements just applied), sync, and clear the dirty bit this handle set.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.shared.is_none() {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        self.check_usable()?;
        self.write_back_all(&mut meta).await?;
        let Some(w) = meta.w.as_deref_mut() else {
            return Ok(());
        };
        if w.dirty_marked {
            let bits = w
                .header
                .header
                .incompatible
                .with(IncompatibleFeatures::DIRTY, false);
            w.header.header.incompatible = bits;
            self.write_header_field(INCOMPATIBLE_OFFSET, be64(bits.0))
                .await?;
            self.sync_file().await?;
            w.dirty_marked = false;
        }
        Ok(())
    }
}
