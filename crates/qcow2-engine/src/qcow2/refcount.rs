//! Refcounts: the refcount table, a write-back cache of whole refcount blocks, the cluster allocator.
//!
//! Spec: qcow2.txt, "Host cluster management". Ordering (DESIGN.md, "Metadata caches and crash-safe
//! ordering"): increments are cached dirty and written by [`Refcounts::write_back`], which the caller
//! follows with an fdatasync before any L2 entry relying on them is written; decrements are deferred
//! until the caller has made the dropping L2 change durable ([`Refcounts::apply_deferred`]); new refcount
//! blocks and a moved refcount table are written and synced at once, self-describing.
//!
//! The cache keeps whole refcount blocks keyed by their refcount table index. Dirty blocks
//! stay until [`Refcounts::write_back`]; clean blocks are evicted least-recently-used once more than
//! [`CACHE_BYTES`] of them are cached (at least [`MIN_CACHED_BLOCKS`]), so memory is bounded by that
//! plus the dirty blocks, which the caller bounds by writing back (without lazy refcounts, before every
//! L2 update; with lazy refcounts, dirty blocks may accumulate up to the image's whole refcount metadata,
//! `file size * refcount_bits / 8 / cluster_size` bytes, e.g. 32 MiB for 1 TiB at 64 KiB clusters).
//!
//! Allocation searches from `free_hint`, the lowest cluster that may be free, so that clusters freed by
//! [`Refcounts::apply_deferred`] are reused first (QEMU's `free_cluster_index`). Host offsets stay below
//! 2^56, the largest an L2 entry can hold; the refcount table below QEMU's 8 MiB limit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use qcow2_format::image_header::ImageHeader;
use qcow2_format::refcount::{
    decode_reftable_entry, get_refcount, parse_reftable, set_refcount, RefcountOrder,
    MAX_REFTABLE_SIZE_BYTES,
};
use qcow2_format::types::Geometry;
use qcow2_io::Backend;

use super::overlap::{MetaKind, OverlapHit, OverlapMap};
use crate::error::{Error, Result};

mod grow;
#[cfg(test)]
mod tests;

/// Host offsets must stay below 2^56: L1/L2 entries and refcount table entries hold offset bits 9-55.
pub(crate) const MAX_HOST_END: u64 = 1 << 56;
/// Bytes of clean refcount blocks kept cached. A 64 KiB block of 16-bit refcounts describes 2 GiB, so
/// 8 MiB of blocks describe 256 GiB of host file: the allocator's scans rarely miss.
pub(crate) const CACHE_BYTES: u64 = 8 << 20;
/// Clean blocks kept whatever the cluster size (an allocation touches at most a few blocks at once).
pub(crate) const MIN_CACHED_BLOCKS: usize = 16;

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

/// One cached refcount block.
struct Block {
    /// The whole block as on disk (one cluster).
    data: Vec<u8>,
    /// Changed since read or last written.
    dirty: bool,
    /// Last use (for evicting the least recently used clean block).
    used: u64,
}

/// Refcount state of one read-write qcow2 layer (under the metadata mutex).
pub(crate) struct Refcounts {
    /// Refcount width.
    order: RefcountOrder,
    /// log2 of the cluster size.
    cluster_bits: u32,
    /// Refcount entries per block.
    epb: u64,
    /// Refcount table: block offsets, 0 for "no block"; as many entries as the table's clusters hold.
    table: Vec<u64>,
    /// Host offset of the refcount table.
    table_offset: u64,
    /// Clusters of the refcount table.
    table_clusters: u64,
    /// Cached blocks by refcount table index.
    blocks: HashMap<u64, Block>,
    /// Table indices of dirty cached blocks (a subset of `blocks`' keys).
    dirty: BTreeSet<u64>,
    /// Clean blocks kept before evicting.
    max_clean: usize,
    /// Use counter for LRU eviction.
    tick: u64,
    /// Deferred decrements: cluster index -> references dropped.
    deferred: BTreeMap<u64, u64>,
    /// Lowest cluster index that may be free (never 0: the header cluster).
    free_hint: u64,
    /// File length at open.
    file_len: u64,
    /// Highest end (bytes) of anything handed out since open (data runs, blocks, tables).
    alloc_end: u64,
}

/// State of a free-run search.
struct Run {
    /// Start of the current run of free clusters.
    start: u64,
    /// Its length so far.
    len: u64,
    /// The first free cluster seen.
    first_free: Option<u64>,
}

impl Run {
    /// Notes cluster `c` as free (`free`) or in use.
    fn step(&mut self, c: u64, free: bool) {
        if free {
            if self.len == 0 {
                self.start = c;
            }
            self.first_free.get_or_insert(c);
            self.len += 1;
        } else {
            self.len = 0;
        }
    }
}

/// The corruption error for a write refused by the overlap check.
pub(crate) fn overlap_error(
    name: &str,
    what: &str,
    offset: u64,
    len: u64,
    hit: OverlapHit,
) -> Error {
    Error::corrupt(
        name,
        format!(
            "{what} at {offset:#x} ({len} bytes) would overlap the {} at {:#x} ({} bytes)",
            hit.kind.name(),
            hit.offset,
            hit.len
        ),
    )
}

/// Overlap-checks and writes `data` at `offset` (no sync). `own`: the structure written, if registered.
pub(crate) async fn write_checked<B: Backend>(
    io: &MetaIo<'_, B>,
    map: &OverlapMap,
    offset: u64,
    data: Vec<u8>,
    own: Option<(MetaKind, u64)>,
    what: &'static str,
) -> Result<()> {
    let len = data.len() as u64;
    map.check(offset, len, own)
        .map_err(|hit| overlap_error(io.name, what, offset, len, hit))?;
    io.file
        .write_at(Bytes::from(data), offset)
        .await
        .map_err(Error::io(io.name, what, offset))
}

/// fdatasync of the image file (the barrier of the ordering rules).
pub(crate) async fn sync<B: Backend>(io: &MetaIo<'_, B>) -> Result<()> {
    io.file
        .flush()
        .await
        .map_err(Error::io(io.name, "fdatasync refcount metadata", 0))
}

/// The error for a file that would grow past [`MAX_HOST_END`].
fn too_big(name: &str, what: String) -> Error {
    Error::Unsupported {
        path: name.to_owned(),
        what: format!(
            "{what}: the image file would grow past 2^56 bytes, the largest host offset qcow2 tables \
             can hold"
        ),
    }
}

impl Refcounts {
    /// Loads the refcount table named by `header` (blocks are read on demand and cached whole).
    /// `file_len` is the image file's length at open. Lazy refcounts need nothing here: in-memory counts
    /// are exact either way (a dirty image is rebuilt first); the caller handles the dirty bit and when
    /// to call [`Refcounts::write_back`].
    ///
    /// Every table entry is validated here (aligned, after the header cluster, inside the file), so that
    /// later lookups can trust the table.
    pub(crate) async fn load<B: Backend>(
        io: &MetaIo<'_, B>,
        header: &ImageHeader,
        file_len: u64,
    ) -> Result<Refcounts> {
        let geom: Geometry = io.geom;
        let cluster_bits = geom.cluster_bits;
        let cs = geom.cluster_size();
        let order = header.refcount_order();
        let table_offset = header.refcount_table_offset().0;
        let table_bytes = header.refcount_table_bytes();
        let table_clusters = u64::from(header.header.refcount_table_clusters);
        if table_bytes == 0 || table_bytes > MAX_REFTABLE_SIZE_BYTES {
            return Err(Error::corrupt(
                io.name,
                format!(
                    "refcount table of {table_clusters} clusters ({table_bytes} bytes): expected 1 to \
                     {MAX_REFTABLE_SIZE_BYTES} bytes"
                ),
            ));
        }
        if table_offset < cs || table_offset.saturating_add(table_bytes) > MAX_HOST_END {
            return Err(Error::corrupt(
                io.name,
                format!(
                    "refcount table at {table_offset:#x} ({table_bytes} bytes): expected after the \
                     header cluster and below 2^56"
                ),
            ));
        }
        // table_bytes <= 8 MiB.
        let (res, buf) = io
            .file
            .read_at(crate::buf::io_buf(table_bytes as usize), table_offset)
            .await;
        res.map_err(Error::io(io.name, "read refcount table", table_offset))?;
        let raw = parse_reftable(&buf);
        let mut table = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let entry = decode_reftable_entry(r, geom).map_err(|e| {
                Error::corrupt(
                    io.name,
                    format!("refcount table entry {i} ({r:#018x}): {e}"),
                )
            })?;
            let off = entry.map_or(0, |o| o.0);
            if off != 0 && (off < cs || off >= file_len) {
                return Err(Error::corrupt(
                    io.name,
                    format!(
                        "refcount table entry {i} points to a refcount block at {off:#x}, which is {} \
                         (file length {file_len:#x})",
                        if off < cs {
                            "inside the header cluster"
                        } else {
                            "past the end of the file"
                        }
                    ),
                ));
            }
            table.push(off);
        }
        let max_clean = usize::try_from(CACHE_BYTES >> cluster_bits)
            .unwrap_or(usize::MAX)
            .max(MIN_CACHED_BLOCKS);
        Ok(Refcounts {
            order,
            cluster_bits,
            epb: order.entries_per_block(cluster_bits),
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::new(),
            dirty: BTreeSet::new(),
            max_clean,
            tick: 0,
            deferred: BTreeMap::new(),
            free_hint: 1,
            file_len,
            alloc_end: 0,
        })
    }

    /// Registers the refcount table and every refcount block in `map`.
    pub(crate) fn register_metadata(&self, map: &mut OverlapMap) {
        map.insert(
            self.table_offset,
            self.table_clusters << self.cluster_bits,
            MetaKind::RefcountTable,
        );
        for &off in self.table.iter().filter(|&&o| o != 0) {
            map.insert(off, self.cs(), MetaKind::RefcountBlock);
        }
    }

    /// Host offset of the refcount table (it moves when the table grows; the caller's copy of the
    /// header is then stale).
    #[cfg(test)]
    pub(crate) fn table_offset(&self) -> u64 {
        self.table_offset
    }

    /// Clusters of the refcount table.
    #[cfg(test)]
    pub(crate) fn table_clusters(&self) -> u64 {
        self.table_clusters
    }

    /// The highest end of anything allocated since open (0 when nothing was): the file may need to
    /// reach at least this far.
    #[cfg(test)]
    pub(crate) fn alloc_end(&self) -> u64 {
        self.alloc_end
    }

    /// Cluster size in bytes.
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// (table index, index in block) of cluster `c`.
    fn loc(&self, c: u64) -> (u64, usize) {
        // The index in block is < epb <= 2^24.
        (c / self.epb, (c % self.epb) as usize)
    }

    /// The block offset of table index `ti`, if it has a block.
    fn block_offset(&self, ti: u64) -> Option<u64> {
        usize::try_from(ti)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .filter(|&o| o != 0)
    }

    /// Makes block `ti` cached if it exists; returns whether it exists.
    async fn load_block<B: Backend>(&mut self, io: &MetaIo<'_, B>, ti: u64) -> Result<bool> {
        let Some(off) = self.block_offset(ti) else {
            return Ok(false);
        };
        self.tick += 1;
        if let Some(b) = self.blocks.get_mut(&ti) {
            b.used = self.tick;
            return Ok(true);
        }
        let cs = self.cs() as usize; // <= 2 MiB
        let (res, buf) = io.file.read_at(crate::buf::io_buf(cs), off).await;
        res.map_err(Error::io(io.name, "read refcount block", off))?;
        self.evict();
        self.blocks.insert(
            ti,
            Block {
                data: buf.to_vec(),
                dirty: false,
                used: self.tick,
            },
        );
        Ok(true)
    }

    /// Evicts least recently used clean blocks until there is room for one more.
    fn evict(&mut self) {
        while self.blocks.len() - self.dirty.len() >= self.max_clean {
            let victim = self
                .blocks
                .iter()
                .filter(|(_, b)| !b.dirty)
                .min_by_key(|(_, b)| b.used)
                .map(|(&ti, _)| ti);
            match victim {
                Some(ti) => {
                    self.blocks.remove(&ti);
                }
                None => break,
            }
        }
    }

    /// The in-memory refcount of cluster `c` (0 where no block exists).
    async fn rc<B: Backend>(&mut self, io: &MetaIo<'_, B>, c: u64) -> Result<u64> {
        let (ti, idx) = self.loc(c);
        let order = self.order;
        let data = if self.load_block(io, ti).await? {
            self.blocks.get(&ti).map(|b| b.data.as_slice())
        } else {
            None
        };
        match data {
            Some(d) => get_refcount(d, idx, order).map_err(Error::format(io.name)),
            None => Ok(0),
        }
    }

    /// Sets the refcount of cluster `c`, whose block must exist; marks the block dirty.
    async fn set<B: Backend>(&mut self, io: &MetaIo<'_, B>, c: u64, value: u64) -> Result<()> {
        let (ti, idx) = self.loc(c);
        if !self.load_block(io, ti).await? {
            return Err(Error::corrupt(
                io.name,
                format!(
                    "internal: no refcount block for the cluster at {:#x}",
                    c << self.cluster_bits
                ),
            ));
        }
        let order = self.order;
        let Some(b) = self.blocks.get_mut(&ti) else {
            return Err(Error::corrupt(
                io.name,
                "internal: refcount block not cached",
            ));
        };
        set_refcount(&mut b.data, idx, order, value).map_err(Error::format(io.name))?;
        b.dirty = true;
        self.dirty.insert(ti);
        Ok(())
    }

    /// Finds `n >= 1` contiguous free clusters at or after cluster `from` (never cluster 0). Returns the
    /// run's first cluster and the first free cluster seen (for the free hint).
    async fn find_free_run<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        from: u64,
        n: u64,
    ) -> Result<(u64, u64)> {
        let limit = MAX_HOST_END >> self.cluster_bits;
        let mut c = from.max(1);
        let mut run = Run {
            start: c,
            len: 0,
            first_free: None,
        };
        let order = self.order;
        let epb = self.epb;
        while run.len < n {
            if c >= limit {
                return Err(too_big(io.name, format!("allocating {n} clusters")));
            }
            let (ti, idx) = self.loc(c);
            let data = if self.load_block(io, ti).await? {
                self.blocks.get(&ti).map(|b| b.data.as_slice())
            } else {
                None
            };
            match data {
                Some(d) => {
                    let mut i = idx;
                    while (i as u64) < epb && run.len < n {
                        let free = get_refcount(d, i, order).map_err(Error::format(io.name))? == 0;
                        run.step(c, free);
                        i += 1;
                        c += 1;
                    }
                }
                None => {
                    // No block: every cluster it would cover is free.
                    let span = epb - idx as u64;
                    run.step(c, true);
                    run.len += span - 1;
                    c += span;
                }
            }
        }
        if run.start.checked_add(n).is_none_or(|e| e > limit) {
            return Err(too_big(io.name, format!("allocating {n} clusters")));
        }
        Ok((run.start, run.first_free.unwrap_or(run.start)))
    }

    /// Updates the free hint after `n` clusters from `start` were taken by a search from the hint that
    /// saw `first_free` as its first free cluster.
    fn note_taken(&mut self, start: u64, n: u64, first_free: u64) {
        if first_free >= start {
            self.free_hint = self.free_hint.max(start + n);
        } else {
            self.free_hint = self.free_hint.max(first_free);
        }
    }

    /// The refcount of the cluster holding host offset `offset` (0 beyond the table).
    #[cfg(test)]
    pub(crate) async fn get<B: Backend>(&mut self, io: &MetaIo<'_, B>, offset: u64) -> Result<u64> {
        self.rc(io, offset >> self.cluster_bits).await
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
        if n == 0 {
            return Err(Error::corrupt(
                io.name,
                "internal: allocation of 0 clusters",
            ));
        }
        // Each retry follows the creation of at least one refcount block inside the candidate run; a
        // run spans at most n / epb + 2 table indices, so this bound is never reached in practice.
        let max_tries = (n / self.epb).saturating_add(8);
        for _ in 0..max_tries {
            let (start, first_free) = self.find_free_run(io, self.free_hint, n).await?;
            let last = start + n - 1; // find_free_run checked start + n <= 2^56 / cs
            let (ti_first, _) = self.loc(start);
            let (ti_last, _) = self.loc(last);
            for ti in ti_first..=ti_last {
                self.ensure_block(io, map, ti, None).await?;
            }
            // A new block may have been placed inside the run: then search again.
            let mut still_free = true;
            for c in start..=last {
                if self.rc(io, c).await? != 0 {
                    still_free = false;
                    break;
                }
            }
            if !still_free {
                continue;
            }
            for c in start..=last {
                self.set(io, c, 1).await?;
            }
            self.note_taken(start, n, first_free);
            let offset = start << self.cluster_bits;
            let end = (last + 1) << self.cluster_bits;
            let fresh = offset >= self.file_len && offset >= self.alloc_end;
            self.alloc_end = self.alloc_end.max(end);
            return Ok(HostAlloc {
                offset,
                clusters: n,
                fresh,
            });
        }
        Err(Error::corrupt(
            io.name,
            format!("internal: no stable run of {n} free clusters found"),
        ))
    }

    /// Adds one reference to every cluster overlapping `[offset, offset + len)`. On overflow of the
    /// refcount width, returns [`Error::RefcountOverflow`] and changes nothing.
    #[cfg(test)]
    pub(crate) async fn increment<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_HOST_END)
            .ok_or_else(|| {
                too_big(
                    io.name,
                    format!("a reference to {len} bytes at {offset:#x}"),
                )
            })?;
        let first = offset >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        for ti in self.loc(first).0..=self.loc(last).0 {
            self.ensure_block(io, map, ti, Some((first, last))).await?;
        }
        let max = self.order.max_refcount();
        let mut values = Vec::new();
        for c in first..=last {
            let v = self.rc(io, c).await?;
            if v >= max {
                return Err(Error::RefcountOverflow {
                    path: io.name.to_owned(),
                    offset: c << self.cluster_bits,
                    max,
                });
            }
            values.push(v + 1);
        }
        for (c, v) in (first..=last).zip(values) {
            self.set(io, c, v).await?;
        }
        Ok(())
    }

    /// Records that one reference to every cluster overlapping `[offset, offset + len)` was dropped.
    /// Nothing changes until [`Refcounts::apply_deferred`].
    pub(crate) fn defer_decrement(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        for c in first..=last {
            let k = self.deferred.entry(c).or_insert(0);
            *k = k.saturating_add(1);
        }
    }

    /// Whether deferred decrements are waiting.
    pub(crate) fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Applies the deferred decrements of clusters for which `busy(cluster_offset)` is false (the
    /// others stay deferred). Call only after the L2 changes that dropped the references are durable.
    /// Returns the host ranges whose refcount reached 0 (now free: the caller punches holes and removes
    /// them from the overlap map). Underflow (decrement of 0) is a corruption error.
    ///
    /// On an error nothing is changed (all decrements are validated first).
    pub(crate) async fn apply_deferred<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        busy: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<Vec<(u64, u64)>> {
        let cb = self.cluster_bits;
        let ready: Vec<(u64, u64)> = self
            .deferred
            .iter()
            .filter(|(&c, _)| !busy(c << cb))
            .map(|(&c, &k)| (c, k))
            .collect();
        let mut new_values = Vec::with_capacity(ready.len());
        for &(c, k) in &ready {
            let v = self.rc(io, c).await?;
            let nv = v.checked_sub(k).ok_or_else(|| {
                Error::corrupt(
                    io.name,
                    format!(
                        "refcount of the cluster at {:#x} is {v}, cannot drop {k} reference(s) \
                         (underflow)",
                        c << cb
                    ),
                )
            })?;
            if c == 0 && nv == 0 {
                // Only a corrupt image references the header cluster from an L2 table (e.g. a
                // compressed cluster stored in it); freeing it would let the host discard the header.
                return Err(Error::corrupt(
                    io.name,
                    "dropping a reference would free the header cluster (an L2 entry points into it)"
                        .to_string(),
                ));
            }
            new_values.push(nv);
        }
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for (&(c, _), nv) in ready.iter().zip(new_values) {
            self.set(io, c, nv).await?;
            self.deferred.remove(&c);
            if nv == 0 {
                self.free_hint = self.free_hint.min(c).max(1);
                let off = c << cb;
                match freed.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += 1 << cb,
                    _ => freed.push((off, 1 << cb)),
                }
            }
        }
        Ok(freed)
    }

    /// Writes every dirty refcount block (overlap-checked), without fdatasync. Returns whether anything
    /// was written.
    pub(crate) async fn write_back<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &OverlapMap,
    ) -> Result<bool> {
        let dirty: Vec<u64> = self.dirty.iter().copied().collect();
        for &ti in &dirty {
            self.write_block(io, map, ti).await?;
        }
        Ok(!dirty.is_empty())
    }

    /// Writes cached block `ti` (overlap-checked) and marks it clean.
    async fn write_block<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &OverlapMap,
        ti: u64,
    ) -> Result<()> {
        let (Some(off), Some(b)) = (self.block_offset(ti), self.blocks.get(&ti)) else {
            return Err(Error::corrupt(
                io.name,
                format!("internal: dirty refcount block {ti} is not cached"),
            ));
        };
        let data = b.data.clone();
        write_checked(
            io,
            map,
            off,
            data,
            Some((MetaKind::RefcountBlock, off)),
            "write refcount block",
        )
        .await?;
        if let Some(b) = self.blocks.get_mut(&ti) {
            b.dirty = false;
        }
        self.dirty.remove(&ti);
        Ok(())
    }

    /// Whether dirty blocks are waiting to be written.
    pub(crate) fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
}
