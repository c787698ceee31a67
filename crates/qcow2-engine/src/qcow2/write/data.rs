//! Guest writes: the fast path (in place, into NORMAL COPIED clusters) and the allocating path
//! (new clusters, or in-place fills of zero/unallocated subclusters, with copy-on-write).
//!
//! A request is served in steps, each within one L2 slice and stopping before the first in-flight
//! allocation it overlaps (or waiting for one that covers its first cluster, then looking up again).
//! Each step takes the metadata mutex for its lookup, drops it for data I/O, and (allocating path
//! only) retakes it to link the written clusters into L2.
//!
//! Copy-on-write: the parts of a newly written cluster that the request does not cover are filled
//! with what the guest read there before (the backing chain, decompressed data, zeros), read through
//! the image's own read path while the allocation is registered (so nothing else can change that
//! cluster's mapping meanwhile). Head COW, guest data and tail COW go to the host as one vectored
//! write. COW regions that read as zero are not read; on a fresh cluster past the old end of file they
//! are not written either. With extended L2 only partially written subclusters are copied into a
//! cluster whose old state had no data; untouched subclusters keep their state in the bitmap.

use bytes::Bytes;
use qcow2_format::compressed::CompressedDescriptor;
use qcow2_format::l2::{L2Entry, L2E_COPIED};
use qcow2_io::Backend;

use super::super::entry::ClusterEntry;
use super::super::Qcow2Layer;
use crate::error::{Error, Result};
use crate::image::Image;

/// What a write does with one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Write in place, no metadata change (NORMAL COPIED, all written subclusters allocated).
    Fast(u64),
    /// Keep the host cluster but change the entry (zero subclusters/clusters that kept a COPIED
    /// allocation): COW into it, then update L2.
    InPlace(u64),
    /// A new host cluster; `free` is the old host range whose reference the new entry drops;
    /// `full_cow` means the old cluster has data that must be copied in whole (shared or compressed).
    New {
        free: Option<(u64, u64)>,
        full_cow: bool,
    },
}

/// Bitmask of the subclusters of `[ws, we)` (relative to the cluster, `we > ws`).
fn written_mask(ws: u64, we: u64, sc: u64) -> u32 {
    let first = (ws / sc) as u32;
    let last = ((we - 1) / sc) as u32; // < 32
    let width = last - first + 1;
    let ones = if width >= 32 {
        u32::MAX
    } else {
        (1u32 << width) - 1
    };
    ones << first
}

/// The host range a compressed cluster occupies (its refcount is held per host cluster it touches).
fn compressed_range(d: &CompressedDescriptor) -> (u64, u64) {
    let (off, len) = d.host_range();
    (off.0, len)
}

impl<B: Backend> Qcow2Layer<B> {
    /// What writing `[ws, we)` (relative) of a cluster with entry `e` takes.
    fn classify(&self, e: &ClusterEntry, ws: u64, we: u64) -> Action {
        let cs = self.geom.cluster_size();
        match e.entry {
            L2Entry::Normal { host, copied: true } => match e.bitmap {
                Some(bm) => {
                    let w = written_mask(ws, we, self.geom.subcluster_size());
                    if bm.alloc & w == w {
                        Action::Fast(host.0)
                    } else {
                        Action::InPlace(host.0)
                    }
                }
                None => Action::Fast(host.0),
            },
            L2Entry::Zero {
                preallocated: Some(h),
                copied: true,
            } => Action::InPlace(h.0),
            L2Entry::Normal {
                host,
                copied: false,
            } => Action::New {
                free: (self.data_file.is_none()).then_some((host.0, cs)),
                full_cow: true,
            },
            L2Entry::Zero { preallocated, .. } => Action::New {
                free: preallocated
                    .filter(|_| self.data_file.is_none())
                    .map(|h| (h.0, cs)),
                full_cow: false,
            },
            L2Entry::Unallocated => Action::New {
                free: None,
                full_cow: false,
            },
            L2Entry::Compressed(d) => Action::New {
                free: Some(compressed_range(&d)),
                full_cow: true,
            },
        }
    }

    /// Writes `data` at guest offset `offset` (within the virtual size).
    pub(crate) async fn write_data(&self, img: &Image<B>, offset: u64, data: Bytes) -> Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let n = self
                .write_step(img, offset + done as u64, data.slice(done..))
                .await?;
            done += n as usize;
        }
        Ok(())
    }

    /// One step of a write starting at `pos` with the remaining `data`; returns the bytes written.
    async fn write_step(&self, img: &Image<B>, pos: u64, data: Bytes) -> Result<u64> {
        let shared = self.shared()?;
        let cs = self.geom.cluster_size();
        let end = pos + data.len() as u64;
        {
            let (mut guard, stop) = self.lock_step(pos, end).await?;
            let meta = &mut *guard;
            let c0 = pos / cs;
            let table = self
                .l2_table_for_write(meta, pos, true)
                .await?
                .ok_or_else(|| Error::corrupt(&self.name, "internal: no L2 table after create"))?;

            // Classify the clusters of [pos, stop): a run of the same kind of action.
            let cluster_end = |g: u64| (g - g % cs + cs).min(stop);
            let first_entry = self.entry_for_write(meta, table, pos).await?;
            let first = self.classify(&first_entry, pos % cs, cluster_end(pos) - (pos - pos % cs));
            let mut entries = vec![first_entry];
            let mut run_end = cluster_end(pos);
            let chainable = |a: &Action, b: &Action, i: u64| match (a, b) {
                (Action::Fast(h0), Action::Fast(h)) => *h == h0 + i * cs,
                (Action::New { .. }, Action::New { .. }) => true,
                _ => false,
            };
            if !matches!(first, Action::InPlace(_)) {
                while run_end < stop {
                    let e = self.entry_for_write(meta, table, run_end).await?;
                    let a = self.classify(&e, 0, cluster_end(run_end) - run_end);
                    if !chainable(&first, &a, entries.len() as u64) {
                        break;
                    }
                    entries.push(e);
                    run_end = cluster_end(run_end);
                }
            }
            let len = run_end - pos;
            let n = entries.len() as u64;

            if let Action::Fast(host) = first {
                let host_start = host + pos % cs;
                let (file, fname) = self.data_backend();
                if self.data_file.is_none() {
                    self.guard_write(meta, host_start, len, None).await?;
                }
                let busy = shared.tracker.mark_busy(host, n, cs);
                drop(guard);
                let res = file
                    .write_at(data.slice(..len as usize), host_start)
                    .await
                    .map_err(Error::io(fname, "write", host_start));
                drop(busy);
                res?;
                return Ok(len);
            }

            // Allocating path: new clusters (a run), or one cluster filled in place.
            let (host, fresh) = match first {
                Action::InPlace(h) => (h, false),
                _ if self.data_file.is_some() => (c0 * cs, false),
                _ => {
                    let w = meta.w.as_deref_mut().ok_or(Error::ReadOnly)?;
                    let a = self.alloc_clusters(w, n).await?;
                    (a.offset, a.fresh)
                }
            };
            let new_alloc = !matches!(first, Action::InPlace(_)) && self.data_file.is_none();
            if self.data_file.is_none() {
                self.guard_write(meta, host, n * cs, None).await?;
            }
            let alloc_guard = shared.tracker.register(c0, c0 + n);
            drop(guard);

            let res = self
                .fill_clusters(
                    img,
                    pos,
                    &data,
                    stop.min(run_end),
                    host,
                    fresh,
                    &entries,
                    first,
                )
                .await;

            let mut guard = self.meta.lock().await;
            let meta = &mut *guard;
            if let Err(e) = res {
                if new_alloc {
                    if let Some(w) = meta.w.as_deref_mut() {
                        w.refcounts.defer_decrement(host, n * cs);
                    }
                }
                drop(alloc_guard);
                return Err(e);
            }
            // Link the clusters into L2.
            for (i, e) in entries.iter().enumerate() {
                let g = (c0 + i as u64) * cs;
                let ws = if i == 0 { pos % cs } else { 0 };
                let we = cluster_end(g.max(pos)) - g;
                let h = host + i as u64 * cs;
                let (raw, bitmap) = self.new_entry(e, first, h, ws, we)?;
                self.set_entry(meta, table, g, raw, bitmap).await?;
                if let Action::New {
                    free: Some((off, flen)),
                    ..
                } = self.classify(e, ws, we)
                {
                    if let Some(w) = meta.w.as_deref_mut() {
                        w.refcounts.defer_decrement(off, flen);
                    }
                }
            }
            drop(alloc_guard);
            Ok(len)
        }
    }

    /// The new raw entry and bitmap of a cluster written at `[ws, we)` into host cluster `host`.
    fn new_entry(
        &self,
        old: &ClusterEntry,
        first: Action,
        host: u64,
        ws: u64,
        we: u64,
    ) -> Result<(u64, u64)> {
        let raw = if self.data_file.is_some() && host == 0 {
            // QEMU's encoding of host offset 0 in an external data file: COPIED with offset 0.
            L2E_COPIED
        } else {
            host | L2E_COPIED
        };
        let Some(bm) = old.bitmap else {
            return Ok((raw, 0));
        };
        let w = written_mask(ws, we, self.geom.subcluster_size());
        let (alloc, zero) = match (old.entry, first) {
            (L2Entry::Compressed(_), _) => (u32::MAX, 0),
            _ => (bm.alloc | w, bm.zero & !w),
        };
        Ok((raw, u64::from(alloc) | (u64::from(zero) << 32)))
    }

    /// Writes the guest data `data[..stop - pos]` plus the COW head of the first cluster and tail of the
    /// last one into the host clusters starting at `host` (one per entry of `entries`, guest clusters
    /// from the one holding `pos`).
    #[allow(clippy::too_many_arguments)]
    async fn fill_clusters(
        &self,
        img: &Image<B>,
        pos: u64,
        data: &Bytes,
        stop: u64,
        host: u64,
        fresh: bool,
        entries: &[ClusterEntry],
        first: Action,
    ) -> Result<()> {
        let cs = self.geom.cluster_size();
        let sc = self.geom.subcluster_size();
        let ext = self.geom.extended_l2;
        let n = entries.len() as u64;
        let g0 = pos - pos % cs;
        let ws = pos - g0;
        let last_g = g0 + (n - 1) * cs;
        let we = stop - last_g; // relative to the last cluster, in (0, cs]
        let has_backing = img.backing().is_some();

        // COW region bounds of the head (first cluster) and tail (last cluster), and whether the old
        // content there is known to read as zeros without I/O.
        let tail_act = if n == 1 {
            first
        } else {
            self.classify(&entries[entries.len() - 1], 0, we)
        };
        let region = |e: &ClusterEntry, act: Action, is_head: bool| -> (u64, u64, bool) {
            let full = !ext || matches!(act, Action::New { full_cow: true, .. });
            let (a, b) = if is_head {
                (if full { 0 } else { ws - ws % sc }, ws)
            } else {
                (we, if full { cs } else { we.div_ceil(sc) * sc }.min(cs))
            };
            if a >= b {
                return (a, a, true);
            }
            let sub = (if is_head { ws } else { we } / sc) as u32;
            // In place with extended L2: a partially written subcluster that already holds data
            // needs no copy.
            if ext
                && matches!(act, Action::InPlace(_))
                && e.bitmap.is_some_and(|bm| bm.alloc & (1 << sub) != 0)
            {
                return (a, a, true);
            }
            let zero = if full && ext {
                false
            } else {
                reads_zero(e, if ext { sub } else { 0 }, has_backing)
            };
            (a, b, zero)
        };
        let (ha, hb, hzero) = region(&entries[0], first, true);
        let (ta, tb, tzero) = region(&entries[entries.len() - 1], tail_act, false);

        let mut bufs: Vec<Bytes> = Vec::with_capacity(3);
        let mut start = host + ws;
        if hb > ha {
            if fresh && hzero {
                // The host cluster past the old end of file already reads as zeros.
            } else {
                bufs.push(self.cow_bytes(img, g0 + ha, hb - ha, hzero).await?);
                start = host + ha;
            }
        }
        bufs.push(data.slice(..(stop - pos) as usize));
        let (file, fname) = self.data_backend();
        if tb > ta {
            if fresh && tzero {
                // The tail already reads as zeros, but extend the file over it (fallocate, as QEMU's
                // zero-COW path does) so that the writes that fill the rest of the cluster later are
                // not file-extending writes, which the kernel serialises (O_DIRECT especially).
                let at = host + (n - 1) * cs + ta;
                file.zero_range(at, tb - ta)
                    .await
                    .map_err(Error::io(fname, "write zeroes", at))?;
            } else {
                bufs.push(self.cow_bytes(img, last_g + ta, tb - ta, tzero).await?);
            }
        }
        file.writev_at(bufs, start)
            .await
            .map_err(Error::io(fname, "write", start))
    }

    /// The old guest content of `[guest, guest + len)` for copy-on-write: zeros when known, else read
    /// through the image (its current mapping, the backing chain, decompression). Bytes past the
    /// virtual size read as zeros.
    async fn cow_bytes(&self, img: &Image<B>, guest: u64, len: u64, zero: bool) -> Result<Bytes> {
        let mut buf = vec![0u8; len as usize];
        if !zero {
            let size = img.virtual_size();
            let readable = size.saturating_sub(guest).min(len) as usize;
            if readable > 0 {
                crate::read::read(img, guest, &mut buf[..readable]).await?;
            }
        }
        Ok(Bytes::from(buf))
    }
}

/// Whether subcluster `sub` (0 without extended L2) of a cluster with entry `e` reads as zeros
/// without any I/O.
fn reads_zero(e: &ClusterEntry, sub: u32, has_backing: bool) -> bool {
    match (e.entry, e.bitmap) {
        (L2Entry::Compressed(_), _) => false,
        (_, Some(bm)) if bm.zero & (1 << sub) != 0 => true,
        (_, Some(bm)) if bm.alloc & (1 << sub) != 0 => false,
        (_, Some(_)) => !has_backing,
        (L2Entry::Zero { .. }, None) => true,
        (L2Entry::Unallocated, None) => !has_backing,
        (L2Entry::Normal { .. }, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::written_mask;

    #[test]
    fn masks() {
        assert_eq!(written_mask(0, 2048, 2048), 1);
        assert_eq!(written_mask(0, 65536, 2048), u32::MAX);
        assert_eq!(written_mask(2047, 2049, 2048), 0b11);
        assert_eq!(written_mask(65535, 65536, 2048), 1 << 31);
    }
}
