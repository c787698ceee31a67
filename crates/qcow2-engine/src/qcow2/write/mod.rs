//! The write side of a qcow2 layer: read-write open, allocation, copy-on-write, zero writes and
//! discards, metadata write-back with its barriers, overlap checks.
//!
//! Spec: qcow2.txt, "Cluster mapping", "Host cluster management", "Extended L2 Entries"; behaviour as
//! QEMU 10's `block/qcow2.c` and `qcow2-cluster.c` where the spec leaves room (see DESIGN.md, "Facts
//! that are easy to get wrong"). The concurrency model and the ordering argument are written down in
//! docs/ARCHITECTURE.md ("The write path").
//!
//! Submodules: `inflight` (in-flight allocations, busy host clusters), `l2` (L2 tables and entries for
//! writing), `data` (guest writes: fast path and allocating path), `zero` (write-zeroes and discard),
//! `flush` (write-back and barriers, clean close, corrupt marking).

mod data;
mod flush;
pub(crate) mod inflight;
mod l2;
mod zero;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use qcow2_format::header::{AutoclearFeatures, IncompatibleFeatures, Version};
use qcow2_format::image_header::ImageHeader;
use qcow2_format::l1::L1Entry;
use qcow2_io::Backend;

use super::bitmaps::bitmap_ranges;
use super::overlap::{MetaKind, OverlapMap};
use super::refcount::{HostAlloc, MetaIo, Refcounts};
use super::snapshots::read_snapshot_table;
use super::{Metadata, Qcow2Layer};
use crate::error::{Error, Result};
use inflight::Tracker;

pub(crate) use zero::{SubZero, ZeroOp};

/// Byte offset of the incompatible feature bits in the header (v3).
const INCOMPATIBLE_OFFSET: u64 = 72;
/// Byte offset of the autoclear feature bits in the header (v3).
const AUTOCLEAR_OFFSET: u64 = 88;

/// Write state shared by the requests of a read-write layer without the metadata mutex.
pub(crate) struct WriteShared {
    /// In-flight allocations and busy host clusters.
    pub(crate) tracker: Arc<Tracker>,
    /// Set when an overlap check failed or corruption was found: the handle refuses all further I/O
    /// (QEMU detaches the driver).
    pub(crate) broken: AtomicBool,
    /// Set when an fdatasync failed: every later flush fails too (the page cache may have dropped the
    /// data that failed to reach the disk).
    pub(crate) flush_failed: AtomicBool,
}

/// Write state under the metadata mutex.
pub(crate) struct WriteState {
    /// Refcounts and the allocator.
    pub(crate) refcounts: Refcounts,
    /// Metadata host ranges, for overlap checks.
    pub(crate) overlap: OverlapMap,
    /// The header as it is on disk now.
    pub(crate) header: ImageHeader,
    /// Indices of 4 KiB chunks of the L1 table changed in memory and not yet written.
    pub(crate) l1_dirty: BTreeSet<usize>,
    /// The lazy-refcounts dirty bit is set on disk by this handle.
    pub(crate) dirty_marked: bool,
}

impl WriteState {
    /// Whether the image uses lazy refcounts (refcount blocks may lag on disk).
    pub(crate) fn lazy(&self) -> bool {
        self.header.lazy_refcounts()
    }
}

/// Big-endian bytes of a u64 header field.
fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

impl<B: Backend> Qcow2Layer<B> {
    /// Fails when the handle refused further I/O after corruption was found.
    pub(crate) fn check_usable(&self) -> Result<()> {
        match &self.shared {
            Some(s) if s.broken.load(Ordering::Acquire) => Err(Error::corrupt(
                &self.name,
                "the image was marked corrupt by an earlier request on this handle; no further \
                 I/O is allowed (run `qcow2 check -r all`)",
            )),
            _ => Ok(()),
        }
    }

    /// The shared write state, or [`Error::ReadOnly`].
    pub(crate) fn shared(&self) -> Result<&WriteShared> {
        self.shared.as_ref().ok_or(Error::ReadOnly)
    }

    /// Takes the metadata lock for one step of a request starting at guest offset `pos` and ending at
    /// most at `end`: the step stays within one L2 slice, waits (lock dropped, then retaken) while an
    /// in-flight allocation covers its first cluster, and stops before the first one it would overlap.
    /// Returns the guard and where the step ends.
    pub(crate) async fn lock_step(
        &self,
        pos: u64,
        end: u64,
    ) -> Result<(tokio::sync::MutexGuard<'_, Metadata>, u64)> {
        let shared = self.shared()?;
        let cs = self.geom.cluster_size();
        let slice_cov = (self.slice_bytes / self.geom.l2_entry_size()) * cs;
        loop {
            let guard = self.meta.lock().await;
            self.check_usable()?;
            let stop = end.min(
                (pos / slice_cov)
                    .saturating_add(1)
                    .saturating_mul(slice_cov),
            );
            match shared.tracker.conflict(pos / cs, stop.div_ceil(cs)) {
                inflight::Conflict::Wait(listener) => {
                    drop(guard);
                    listener.await;
                }
                inflight::Conflict::StopAt(c) => return Ok((guard, stop.min(c * cs))),
                inflight::Conflict::None => return Ok((guard, stop)),
            }
        }
    }

    /// Context for the refcount module.
    pub(crate) fn meta_io(&self) -> MetaIo<'_, B> {
        MetaIo {
            file: &self.file,
            name: &self.name,
            geom: self.geom,
        }
    }

    /// Turns this read-only layer into a read-write one: rebuilds refcounts of a dirty lazy-refcounts
    /// image, clears the autoclear bits the engine does not maintain (the bitmaps bit: bitmaps are not
    /// updated by writes, so they must not be trusted afterwards), loads the refcount table and builds
    /// the overlap map.
    pub(crate) async fn enable_writes(&mut self) -> Result<()> {
        let cs = self.geom.cluster_size();
        let file_len = self.file_len();
        let mut header = self.header.clone();
        let l1 = self.meta.get_mut().l1.clone();
        let io = self.meta_io();
        // Bitmaps: writes do not maintain them, so the "bitmaps consistent" autoclear bit is cleared
        // below; QEMU then ignores the bitmaps extension, so the clusters the bitmaps hold are released
        // (else they would be leaks). Listed while the bit still says they are valid.
        let bitmaps_valid = header.version() == Version::V3
            && header.header.autoclear.contains(AutoclearFeatures::BITMAPS);
        let bitmap_refs = if bitmaps_valid {
            bitmap_ranges(&io, &header).await?
        } else {
            Vec::new()
        };
        let (file_len, l1) = if header.is_dirty() {
            // The check's repair rebuilds the refcounts (possibly moving the refcount table, growing
            // the file, dropping broken entries) and clears the dirty bit: read everything again.
            crate::check::repair_dirty(&self.file, &self.name).await?;
            let len = self
                .file
                .len()
                .await
                .map_err(Error::io(&self.name, "get file length", 0))?;
            header = super::read_image_header(&self.file, &self.name, len).await?;
            let l1_off = header.l1_table_offset().0;
            let (res, buf) = self
                .file
                .read_at(crate::buf::io_buf(l1.len() * 8), l1_off)
                .await;
            res.map_err(Error::io(&self.name, "read L1 table", l1_off))?;
            let l1 = qcow2_format::l1::parse_l1_table(&buf);
            self.meta.get_mut().l1 = l1.clone();
            self.file_len
                .store(len, std::sync::atomic::Ordering::Release);
            self.header = header.clone();
            (len, l1)
        } else {
            (file_len, l1)
        };
        let io = self.meta_io();
        let mut refcounts = Refcounts::load(&io, &header, file_len).await?;
        if header.version() == Version::V3 {
            let keep = header.header.autoclear.0 & AutoclearFeatures::RAW_EXTERNAL.0;
            if header.header.autoclear.0 != keep {
                header.header.autoclear = AutoclearFeatures(keep);
                self.write_header_field(AUTOCLEAR_OFFSET, be64(keep))
                    .await?;
                self.sync_file().await?;
            }
        }
        if !bitmap_refs.is_empty() {
            // The bit is durably clear: nothing references these clusters any more.
            for (off, len) in bitmap_refs {
                refcounts.defer_decrement(off, len);
            }
            // Freed, not punched: the overlap map that would vouch for the range is not built yet,
            // and a hostile bitmap table may point at live metadata.
            refcounts.apply_deferred(&io, &|_| false).await?;
        }

        let mut overlap = OverlapMap::new();
        overlap.insert(0, cs, MetaKind::Header);
        let h = &header.header;
        overlap.insert(
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            MetaKind::ActiveL1,
        );
        for raw in &l1 {
            if let Ok(L1Entry {
                l2_offset: Some(off),
                ..
            }) = L1Entry::decode(*raw, self.geom)
            {
                overlap.insert(off.0, cs, MetaKind::ActiveL2);
            }
        }
        let (snapshots, table_len) =
            read_snapshot_table(&self.file, &self.name, &header, file_len).await?;
        if h.nb_snapshots > 0 {
            overlap.insert(h.snapshots_offset, table_len, MetaKind::SnapshotTable);
        }
        for s in &snapshots {
            overlap.insert(
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
                MetaKind::InactiveL1,
            );
        }
        refcounts.register_metadata(&mut overlap);

        self.meta.get_mut().w = Some(Box::new(WriteState {
            refcounts,
            overlap,
            header,
            l1_dirty: BTreeSet::new(),
            dirty_marked: false,
        }));
        self.shared = Some(WriteShared {
            tracker: Arc::new(Tracker::default()),
            broken: AtomicBool::new(false),
            flush_failed: AtomicBool::new(false),
        });
        Ok(())
    }

    /// Writes `bytes` into the header cluster at `offset` (a field update; the header cluster is never
    /// anything else, so no overlap check is needed beyond staying inside it).
    async fn write_header_field(&self, offset: u64, bytes: Vec<u8>) -> Result<()> {
        let end = offset + bytes.len() as u64;
        if end > self.geom.cluster_size() {
            return Err(Error::corrupt(
                &self.name,
                format!("internal: header field write at {offset} runs past the header cluster"),
            ));
        }
        self.file
            .write_at(bytes.into(), offset)
            .await
            .map_err(Error::io(&self.name, "write header", offset))
    }

    /// Allocates `n` contiguous host clusters and raises the file length bound past them.
    pub(crate) async fn alloc_clusters(&self, w: &mut WriteState, n: u64) -> Result<HostAlloc> {
        let a = w
            .refcounts
            .alloc(&self.meta_io(), &mut w.overlap, n)
            .await?;
        let end = a
            .clusters
            .checked_mul(self.geom.cluster_size())
            .and_then(|l| l.checked_add(a.offset))
            .ok_or_else(|| {
                Error::corrupt(
                    &self.name,
                    "internal: allocation past the end of the address space",
                )
            })?;
        self.file_len.fetch_max(end, Ordering::AcqRel);
        Ok(a)
    }

    /// Checks a host write of `len` bytes at `offset` in the image file against the metadata map.
    /// On a hit the image is marked corrupt and the handle refuses further I/O.
    pub(crate) async fn guard_write(
        &self,
        meta: &mut Metadata,
        offset: u64,
        len: u64,
        own: Option<(MetaKind, u64)>,
    ) -> Result<()> {
        let hit = match &meta.w {
            Some(w) => w.overlap.check(offset, len, own).err(),
            None => return Err(Error::ReadOnly),
        };
        match hit {
            None => Ok(()),
            Some(hit) => {
                let detail = format!(
                    "refusing a write of {len} bytes at host offset {offset:#x}: it would overlap \
                     the {} at {:#x} ({} bytes)",
                    hit.kind.name(),
                    hit.offset,
                    hit.len
                );
                Err(self.mark_corrupt(meta, detail).await)
            }
        }
    }

    /// Marks the image corrupt: on disk (incompatible bit 1, v3 only, best effort) and in this handle,
    /// which then refuses all I/O. Returns the corruption error to report.
    pub(crate) async fn mark_corrupt(&self, meta: &mut Metadata, detail: String) -> Error {
        tracing::error!(file = %self.name, "marking image corrupt: {detail}");
        if let Some(s) = &self.shared {
            s.broken.store(true, Ordering::Release);
        }
        if let Some(w) = meta.w.as_mut() {
            if w.header.version() == Version::V3 {
                let bits = w.header.header.incompatible | IncompatibleFeatures::CORRUPT;
                w.header.header.incompatible = bits;
                let res = async {
                    self.write_header_field(INCOMPATIBLE_OFFSET, be64(bits.0))
                        .await?;
                    self.file
                        .flush()
                        .await
                        .map_err(Error::io(&self.name, "fdatasync", 0))
                }
                .await;
                if let Err(e) = res {
                    tracing::error!(file = %self.name, "could not set the corrupt bit: {e}");
                }
            }
        }
        Error::corrupt(&self.name, detail)
    }

    /// Runs `op`; when it fails with a corruption error, marks the image corrupt (unless already).
    pub(crate) async fn corruption_marks(&self, res: Result<()>) -> Result<()> {
        match res {
            Err(e) if e.is_corruption() => {
                let already = self
                    .shared
                    .as_ref()
                    .is_some_and(|s| s.broken.load(Ordering::Acquire));
                if !already {
                    let mut meta = self.meta.lock().await;
                    let _ = self.mark_corrupt(&mut meta, e.to_string()).await;
                }
                Err(e)
            }
            other => other,
        }
    }
}
