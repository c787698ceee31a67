//! A qcow2 layer: header, L1 table, L2 slice cache and the guest-to-host lookup.
//!
//! Spec: qcow2.txt, "Header", "Cluster mapping" (two-level lookup: L1 table -> L2 tables -> clusters).
//!
//! Locking: every piece of mutable metadata (the L1 table, the L2 slice cache, lazily computed facts)
//! lives in [`Metadata`] under one `tokio::sync::Mutex`, the analogue of QEMU's `s->lock`. That mutex
//! grants the lock strictly in arrival order (async-lock's switches to fairness only after 0.5 ms of
//! waiting, a wall-clock rule that made seeded simulations replay differently under load); it needs no
//! Tokio runtime, so the engine still runs on any executor. A lookup holds
//! it while it reads a missing L2 slice from the file (as QEMU does); it never holds it during guest data
//! I/O, which the read path does after [`Qcow2Layer::map`] returned.

pub(crate) mod bitmaps;
mod entry;
mod open;
pub(crate) mod overlap;
mod prealloc;
pub(crate) mod refcount;
pub(crate) mod snapshots;
pub(crate) mod write;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use qcow2_format::compressed::CompressedDescriptor;
use qcow2_format::header::Version;
use qcow2_format::image_header::ImageHeader;
use qcow2_format::l1::L1Entry;
use qcow2_format::l2::L2Entry;
use qcow2_format::types::{Geometry, GuestOffset, HostOffset};
use qcow2_io::Backend;
use tokio::sync::Mutex;

use crate::cache::LruCache;
use crate::error::{Error, Result};
use crate::mapping::{push_extent, Extent, Kind};
pub(crate) use entry::{ClusterEntry, SubState};
pub(crate) use open::read_image_header;
pub(crate) use snapshots::read_snapshots;

/// Mutable metadata, under the layer's mutex.
pub(crate) struct Metadata {
    /// The active L1 table, raw big-endian-decoded entries (validated per entry on use).
    pub(crate) l1: Vec<u64>,
    /// L2 slices keyed by their host offset.
    pub(crate) l2: LruCache<L2Slice>,
    /// Whether the image looks metadata-preallocated (QEMU's heuristic), computed on first block status.
    pub(crate) metadata_prealloc: Option<bool>,
    /// Write state of a read-write layer (`None` when read-only).
    pub(crate) w: Option<Box<write::WriteState>>,
}

/// One cached L2 slice.
pub(crate) struct L2Slice {
    /// The slice as on disk (plus changes not yet written when `dirty`).
    pub(crate) data: BytesMut,
    /// Changed since it was read or last written back: must be written (after the refcount barrier)
    /// before it may be evicted.
    pub(crate) dirty: bool,
}

/// An external data file.
pub(crate) struct DataFile<B> {
    /// Its name as opened.
    pub(crate) name: String,
    /// The opened file.
    pub(crate) file: B,
}

/// One qcow2 image of a chain.
pub(crate) struct Qcow2Layer<B> {
    /// File name, for messages.
    pub(crate) name: String,
    /// The image file (metadata; and data, unless there is a data file).
    pub(crate) file: B,
    /// The external data file, if the image has one and it was opened (a metadata-only open does not
    /// open it; lookups then fail).
    pub(crate) data_file: Option<DataFile<B>>,
    /// The parsed header cluster.
    pub(crate) header: ImageHeader,
    /// Cluster geometry.
    pub(crate) geom: Geometry,
    /// Virtual size rounded up to 512.
    pub(crate) virtual_size: u64,
    /// Length of the image file at open, raised to the end of every cluster allocated since: host
    /// offsets at or past it are corruption.
    pub(crate) file_len: AtomicU64,
    /// Bytes per cached L2 slice (a power of two, at most one cluster).
    pub(crate) slice_bytes: u64,
    /// Mutable metadata.
    pub(crate) meta: Mutex<Metadata>,
    /// State shared by the requests of a read-write layer outside the mutex (`None`: read-only).
    pub(crate) shared: Option<write::WriteShared>,
}

/// Cache statistics of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes per cached L2 slice.
    pub slice_bytes: u64,
    /// Maximum number of cached slices.
    pub capacity: usize,
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that read a slice from the file.
    pub misses: u64,
}

impl<B: Backend> Qcow2Layer<B> {
    /// The file holding guest data: the data file if there is one, else the image file.
    pub(crate) fn data_backend(&self) -> (&B, &str) {
        match &self.data_file {
            Some(d) => (&d.file, &d.name),
            None => (&self.file, &self.name),
        }
    }

    /// The current length bound of the image file (see the field).
    pub(crate) fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// Makes sure the L2 slice at `slice_off` is cached, reading it on a miss. When the cache is full
    /// and the slice it would evict is dirty, all dirty metadata is written back first (with its
    /// barriers), so that an eviction never writes an L2 entry ahead of the refcounts it relies on.
    pub(crate) async fn ensure_slice(&self, meta: &mut Metadata, slice_off: u64) -> Result<()> {
        if meta.l2.get(slice_off).is_some() {
            return Ok(());
        }
        if meta.l2.victim().is_some_and(|v| v.dirty) {
            self.flush_metadata(meta).await?;
        }
        let buf = crate::buf::io_buf(self.slice_bytes as usize);
        let (res, buf) = self.file.read_at(buf, slice_off).await;
        res.map_err(Error::io(&self.name, "read L2 table", slice_off))?;
        meta.l2.insert(
            slice_off,
            L2Slice {
                data: buf,
                dirty: false,
            },
        );
        Ok(())
    }

    /// Cache statistics.
    pub(crate) async fn cache_stats(&self) -> CacheStats {
        let meta = self.meta.lock().await;
        let (hits, misses) = meta.l2.stats();
        CacheStats {
            slice_bytes: self.slice_bytes,
            capacity: meta.l2.capacity(),
            hits,
            misses,
        }
    }

    /// Maps the guest range starting at `guest` (at most `len > 0` bytes, within the virtual size) to
    /// extents. Covers at least one byte; stops at the end of the L2 slice holding `guest` (or, in a
    /// range without L2 tables, at the next allocated L1 entry).
    pub(crate) async fn map(&self, guest: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(self.map_inner(guest, len, false).await?.0)
    }

    /// As [`Qcow2Layer::map`], for reading the data: in a read-write layer the host clusters of the
    /// data extents are marked busy (under the same lock hold as the lookup) until the returned guards
    /// drop, so that a concurrent discard cannot have them reused or punched under the read.
    pub(crate) async fn map_for_read(
        &self,
        guest: u64,
        len: u64,
    ) -> Result<(Vec<Extent>, Vec<write::inflight::BusyGuard>)> {
        self.map_inner(guest, len, true).await
    }

    async fn map_inner(
        &self,
        guest: u64,
        len: u64,
        pin: bool,
    ) -> Result<(Vec<Extent>, Vec<write::inflight::BusyGuard>)> {
        let cs = self.geom.cluster_size();
        let slice_entries = self.slice_bytes / self.geom.l2_entry_size();
        let slice_cov = slice_entries * cs; // <= l1 coverage, far below 2^64 (cluster_bits <= 21)
        let end = guest
            .checked_add(len)
            .filter(|&e| e <= self.virtual_size)
            .ok_or(Error::OutOfRange {
                offset: guest,
                len,
                size: self.virtual_size,
            })?;
        let slice_start = guest - guest % slice_cov;
        let stop = end.min(slice_start.saturating_add(slice_cov));
        let l1_cov = self.geom.l1_entry_coverage();
        let l1_index = guest / l1_cov;

        if self.header.has_data_file() && self.data_file.is_none() {
            return Err(Error::Unsupported {
                path: self.name.clone(),
                what:
                    "reading guest data of an image opened metadata-only (its external data file \
                       was not opened)"
                        .into(),
            });
        }
        self.check_usable()?;
        let mut meta = self.meta.lock().await;
        let raw_l1 = usize::try_from(l1_index)
            .ok()
            .and_then(|i| meta.l1.get(i).copied())
            .ok_or_else(|| {
                Error::corrupt(
                    &self.name,
                    format!(
                        "L1 index {l1_index} for guest offset {guest:#x} is beyond the L1 table"
                    ),
                )
            })?;
        let l1e = L1Entry::decode(raw_l1, self.geom).map_err(|e| {
            Error::corrupt(
                &self.name,
                format!("L1 table entry {l1_index} ({raw_l1:#018x}): {e}"),
            )
        })?;
        let Some(l2_offset) = l1e.l2_offset.map(|o| o.0) else {
            // Extend over the following unallocated L1 entries (CPU only), so that block status of a
            // huge empty disk takes few calls.
            let mut run_end = (l1_index + 1).saturating_mul(l1_cov);
            let mut i = l1_index + 1;
            while run_end < end {
                let unallocated = usize::try_from(i)
                    .ok()
                    .and_then(|i| meta.l1.get(i).copied())
                    .and_then(|raw| L1Entry::decode(raw, self.geom).ok())
                    .is_some_and(|e| e.l2_offset.is_none());
                if !unallocated {
                    break;
                }
                i += 1;
                run_end = run_end.saturating_add(l1_cov);
            }
            return Ok((
                vec![Extent {
                    guest: GuestOffset(guest),
                    len: run_end.min(end) - guest,
                    kind: Kind::Unallocated { host: None },
                }],
                Vec::new(),
            ));
        };
        if l2_offset < cs || l2_offset >= self.file_len() {
            return Err(Error::corrupt(
                &self.name,
                format!(
                    "L1 table entry {l1_index} points to an L2 table at {l2_offset:#x}, which is {} \
                     (file length {:#x})",
                    if l2_offset < cs { "inside the header cluster" } else { "past the end of the file" },
                    self.file_len()
                ),
            ));
        }
        let slice_index = (guest % l1_cov) / slice_cov;
        let slice_off = l2_offset + slice_index * self.slice_bytes; // within the cluster: no overflow
        self.ensure_slice(&mut meta, slice_off).await?;
        // Inserted just above under the same lock guard, so always present; an error rather than a panic
        // all the same.
        let slice = meta.l2.peek(slice_off).map(|s| &s.data).ok_or_else(|| {
            Error::corrupt(
                &self.name,
                format!("internal: L2 slice at {slice_off:#x} not cached"),
            )
        })?;
        let mut out = Vec::new();
        self.scan_slice(slice, l2_offset, slice_start, guest, stop, &mut out)?;
        let mut guards = Vec::new();
        if let (true, Some(shared), None) = (pin, &self.shared, &self.data_file) {
            let cs = self.geom.cluster_size();
            for e in &out {
                let (start, len) = match e.kind {
                    Kind::Data { host } => (host.0, e.len),
                    Kind::Compressed { desc } => {
                        let (off, len) = desc.host_range();
                        (off.0, len.max(1))
                    }
                    _ => continue,
                };
                let first = start - start % cs;
                let n = start.saturating_add(len).div_ceil(cs) - first / cs;
                guards.push(shared.tracker.mark_busy(first, n, cs));
            }
        }
        Ok((out, guards))
    }

    /// Turns the entries of one L2 slice covering `[guest, stop)` into extents.
    fn scan_slice(
        &self,
        slice: &[u8],
        l2_offset: u64,
        slice_start: u64,
        guest: u64,
        stop: u64,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let cs = self.geom.cluster_size();
        let sc_size = self.geom.subcluster_size();
        let has_data_file = self.data_file.is_some();
        let mut pos = guest;
        while pos < stop {
            let idx_in_slice = ((pos - slice_start) / cs) as usize;
            let cluster_start = pos - pos % cs;
            let l2_index = (pos % self.geom.l1_entry_coverage()) / cs;
            let where_ = || format!("L2 table at {l2_offset:#x}, index {l2_index}");
            let entry = entry::cluster_entry(
                &self.name,
                slice,
                idx_in_slice,
                self.geom,
                has_data_file,
                &where_,
            )?;
            self.check_entry(&entry, cluster_start, &where_)?;
            let cluster_end = (cluster_start + cs).min(stop);
            // A compressed cluster is one unit whatever the subcluster size (the bitmap is not used):
            // one extent for the rest of it, so the read path reads and decompresses it once.
            if let L2Entry::Compressed(desc) = entry.entry {
                push_extent(
                    out,
                    Extent {
                        guest: GuestOffset(pos),
                        len: cluster_end - pos,
                        kind: Kind::Compressed { desc },
                    },
                );
                pos = cluster_end;
                continue;
            }
            while pos < cluster_end {
                let in_cluster = pos - cluster_start;
                let sc = (in_cluster / sc_size) as u32;
                let sc_end = (cluster_start + (u64::from(sc) + 1) * sc_size).min(cluster_end);
                let state = entry.subcluster(sc, sc_size, &self.name, &where_)?;
                let off_in_sc = in_cluster % sc_size;
                let kind = match state {
                    SubState::Data(h) => Kind::Data {
                        host: HostOffset(h.0 + off_in_sc),
                    },
                    SubState::Zero(h) => Kind::Zero {
                        host: h.map(|h| HostOffset(h.0 + off_in_sc)),
                    },
                    SubState::Unallocated(h) => Kind::Unallocated {
                        host: h.map(|h| HostOffset(h.0 + off_in_sc)),
                    },
                    SubState::Compressed(desc) => Kind::Compressed { desc },
                };
                push_extent(
                    out,
                    Extent {
                        guest: GuestOffset(pos),
                        len: sc_end - pos,
                        kind,
                    },
                );
                pos = sc_end;
            }
        }
        Ok(())
    }

    /// Checks what the format crate cannot: host offsets against the file length and, with a data
    /// file, identity mapping (QEMU's checks in `qcow2_get_host_offset`).
    fn check_entry(
        &self,
        entry: &ClusterEntry,
        guest_cluster: u64,
        where_: &dyn Fn() -> String,
    ) -> Result<()> {
        // Compressed descriptors are checked when the data is read (`compressed_range`), not here:
        // block status reports them without reading, as qemu-img map does.
        if let L2Entry::Zero { .. } = entry.entry {
            if self.header.version() == Version::V2 {
                return Err(Error::corrupt(
                    &self.name,
                    format!("Zero cluster entry found in pre-v3 image ({})", where_()),
                ));
            }
        }
        let host = entry.entry.host_cluster().map(|h| h.0);
        let Some(host) = host else { return Ok(()) };
        if self.data_file.is_some() {
            if host != guest_cluster {
                return Err(Error::corrupt(
                    &self.name,
                    format!(
                        "{}: external data file host cluster offset {host:#x} does not match guest \
                         cluster offset {guest_cluster:#x}",
                        where_()
                    ),
                ));
            }
        } else if host < self.geom.cluster_size() || host >= self.file_len() {
            // Zero clusters that kept an allocation are never read, so only data needs to be in the file;
            // but a preallocated offset into the header is corrupt either way.
            let is_zero = matches!(entry.entry, L2Entry::Zero { .. });
            if host < self.geom.cluster_size() || !is_zero {
                return Err(Error::corrupt(
                    &self.name,
                    format!(
                        "{}: data cluster offset {host:#x} is {} (file length {:#x})",
                        where_(),
                        if host < self.geom.cluster_size() {
                            "inside the header cluster"
                        } else {
                            "past the end of the file"
                        },
                        self.file_len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl<B: Backend> Qcow2Layer<B> {
    /// The validated host range `(offset, len)` of a compressed cluster, before it is read: the data
    /// must start after the header cluster and before the end of the file, and the length must not
    /// exceed what a descriptor of this cluster size can express (2 x cluster size + 512), so that the
    /// input buffer is bounded.
    pub(crate) fn compressed_range(&self, desc: &CompressedDescriptor) -> Result<(u64, u64)> {
        let (off, len) = desc.host_range();
        let off = off.0;
        let cs = self.geom.cluster_size();
        let limit = 2 * cs + 512;
        let problem = if off < cs {
            Some("starts inside the header cluster".to_owned())
        } else if off >= self.file_len() {
            Some(format!(
                "starts past the end of the file (length {:#x})",
                self.file_len()
            ))
        } else if len > limit {
            Some(format!("is longer than the limit of {limit} bytes"))
        } else {
            None
        };
        match problem {
            Some(p) => Err(Error::corrupt(
                &self.name,
                format!("compressed cluster data at host offset {off:#x} ({len} bytes) {p}"),
            )),
            None => Ok((off, len)),
        }
    }

    /// Whether QEMU would consider this image metadata-preallocated (computed once, under the lock).
    pub(crate) async fn is_metadata_preallocated(&self) -> bool {
        let mut meta = self.meta.lock().await;
        if let Some(v) = meta.metadata_prealloc {
            return v;
        }
        let v = self.detect_metadata_prealloc().await;
        meta.metadata_prealloc = Some(v);
        v
    }
}
