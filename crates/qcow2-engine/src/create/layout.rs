//! Where each structure of a new qcow2 image goes: a model of QEMU's cluster allocator as
//! `qemu-img create` drives it (qcow2.txt, "Host cluster management" and "Cluster mapping").
//!
//! QEMU creates an image in steps: it writes the header (cluster 0), a one-cluster refcount table
//! (cluster 1) and one refcount block (cluster 2), allocates those three clusters, grows the L1
//! table to cover the virtual size, and then preallocates. Every later allocation goes through
//! its allocator (`alloc_clusters_noref` + `update_refcount` + `alloc_refcount_block`, which places
//! a missing refcount block at the next free cluster and makes the caller search again), and
//! `preallocation=falloc|full` first builds a refcount area past the metadata
//! (`qcow2_refcount_area`) that moves the refcount table. This module replays those steps on an
//! in-memory model, so that our images have QEMU's layout byte for byte, and the refcounts count
//! exactly the clusters in use (a model of used clusters, not arithmetic, decides them).
//!
//! One deliberate difference: where QEMU would have to grow the refcount table in the middle of
//! metadata preallocation (only with tiny clusters and wide refcounts on large images), the model
//! keeps going and moves the table to the end once, at [`Alloc::fit_reftable`]. The image is just
//! as valid; only those structures' positions differ.
//!
//! No I/O here: the result is a [`Layout`] that `create.rs` writes.

use qcow2_format::l2::{encode_l2, L2Entry};
use qcow2_format::refcount::{
    serialize_reftable, set_refcount, RefcountOrder, MAX_REFTABLE_SIZE_BYTES,
};
use qcow2_format::types::{Geometry, HostOffset};

use super::{CreateError, Preallocation};

/// QEMU caps one data allocation at `INT_MAX` bytes (rounded down to clusters).
const INT_MAX: u64 = i32::MAX as u64;

/// Bound on allocator retries: QEMU's loop ends after at most a few rounds (each round creates a
/// refcount block); a model that does not converge is a bug, reported instead of spinning.
const MAX_RETRIES: u32 = 64;

/// What the model needs to know about the new image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Cluster geometry (cluster size, extended L2).
    pub geom: Geometry,
    /// Refcount order (width = 1 << order bits).
    pub order: RefcountOrder,
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Number of L1 entries.
    pub l1_size: u64,
    /// Preallocation of the qcow2 file.
    pub prealloc: Preallocation,
    /// Guest data lives in an external data file (identity-mapped, no refcounts).
    pub data_file: bool,
}

/// A run of consecutive guest clusters of one L2 table mapped to consecutive host clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Index of the first entry in the L2 table.
    pub first: u64,
    /// Host offset of the first cluster.
    pub host: u64,
    /// Number of clusters.
    pub count: u64,
}

/// One preallocated L2 table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct L2Plan {
    /// Its L1 index.
    pub l1_index: u64,
    /// Its host offset.
    pub offset: u64,
    /// The mapped runs.
    pub runs: Vec<Run>,
}

/// The placement of every structure of the new image.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Refcount table offset.
    pub reftable_offset: u64,
    /// Refcount table size in clusters.
    pub reftable_clusters: u64,
    /// Refcount table entries (refcount block offsets, 0 for none), `reftable_clusters` clusters' worth.
    pub reftable: Vec<u64>,
    /// L1 table offset (0 when `l1_size` is 0).
    pub l1_offset: u64,
    /// Preallocated L2 tables in allocation order.
    pub l2_tables: Vec<L2Plan>,
    /// Host range of preallocated data (falloc/full) to allocate or zero, as (offset, length).
    pub data_area: Option<(u64, u64)>,
    /// Final length of the qcow2 file.
    pub file_len: u64,
    /// Freed clusters' leftover bytes (old refcount tables), written before everything else so
    /// that the file matches QEMU's byte for byte.
    pub stale: Vec<(u64, Vec<u8>)>,
    /// Clusters in use (refcount 1), as a bitset.
    used: Bitset,
    /// Refcount block bits (log2 of entries per block).
    block_bits: u32,
    /// Cluster bits.
    cluster_bits: u32,
    /// Refcount order.
    order: RefcountOrder,
}

impl Layout {
    /// The contents of the refcount block at reftable index `index` (all in-use clusters it
    /// covers at refcount 1).
    pub(crate) fn refblock(&self, index: u64) -> Result<Vec<u8>, CreateError> {
        let cs = 1usize << self.cluster_bits;
        let mut block = vec![0u8; cs];
        let per = 1u64 << self.block_bits;
        let first = index.checked_mul(per).ok_or_else(overflow)?;
        for j in 0..per {
            if self.used.get(first + j) {
                set_refcount(&mut block, j as usize, self.order, 1)
                    .map_err(|e| CreateError::Internal(e.to_string()))?;
            }
        }
        Ok(block)
    }

    /// The L2 table for `plan`, entries NORMAL|COPIED (extended L2: all subclusters left
    /// unallocated-but-allocated, bitmap 0, as QEMU's preallocation leaves them).
    pub(crate) fn l2_table(&self, plan: &L2Plan, geom: Geometry) -> Result<Vec<u8>, CreateError> {
        let mut table = vec![0u8; 1usize << self.cluster_bits];
        let cs = geom.cluster_size();
        for run in &plan.runs {
            for k in 0..run.count {
                let host = run.host + k * cs;
                let entry = L2Entry::Normal {
                    host: HostOffset(host),
                    copied: true,
                };
                encode_l2(&mut table, (run.first + k) as usize, geom, &entry, None)
                    .map_err(|e| CreateError::Internal(e.to_string()))?;
            }
        }
        Ok(table)
    }

    /// The L1 entries (COPIED | L2 offset for preallocated tables, else 0).
    pub(crate) fn l1_entries(&self, l1_size: u64) -> Vec<u64> {
        let mut l1 = vec![0u64; l1_size as usize];
        for t in &self.l2_tables {
            if let Some(e) = l1.get_mut(t.l1_index as usize) {
                *e = t.offset | qcow2_format::l1::L1E_COPIED;
            }
        }
        l1
    }
}

fn overflow() -> CreateError {
    CreateError::Internal("layout arithmetic overflowed".into())
}

/// A growable bitset of clusters; bits past the end read as 0.
#[derive(Debug, Clone, Default)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn get(&self, i: u64) -> bool {
        usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.0.get(w))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64, on: bool) -> Result<(), CreateError> {
        let w = usize::try_from(i / 64).map_err(|_| overflow())?;
        if w >= self.0.len() {
            if !on {
                return Ok(());
            }
            let add = w + 1 - self.0.len();
            self.0
                .try_reserve(add)
                .map_err(|_| CreateError::Internal("out of memory for the cluster map".into()))?;
            self.0.resize(w + 1, 0);
        }
        if on {
            self.0[w] |= 1 << (i % 64);
        } else {
            self.0[w] &= !(1 << (i % 64));
        }
        Ok(())
    }
}

/// "Search again": QEMU's `-EAGAIN` from `alloc_refcount_block`.
struct Again;

/// Errors of the allocator model: a real error, or a request to retry.
enum AllocErr {
    Again(Again),
    Fail(CreateError),
}

impl From<CreateError> for AllocErr {
    fn from(e: CreateError) -> Self {
        AllocErr::Fail(e)
    }
}

/// QEMU's allocator state for one image being created.
struct Alloc {
    cluster_bits: u32,
    block_bits: u32,
    /// Refcount table entries (refblock offsets); grows as needed (see the module docs).
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    /// Refcount 1 clusters (only ever set where a refcount block exists, as in QEMU).
    used: Bitset,
    /// QEMU's `free_cluster_index`.
    free_idx: u64,
    /// End of the data written so far (the file length).
    file_end: u64,
    /// Refcount order.
    order: RefcountOrder,
    /// Bytes QEMU leaves in freed clusters (old refcount tables), as (offset, bytes).
    stale: Vec<(u64, Vec<u8>)>,
}

impl Alloc {
    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn block_exists(&self, block: u64) -> bool {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.reftable.get(b))
            .is_some_and(|&e| e != 0)
    }

    fn refcount(&self, cluster: u64) -> bool {
        self.block_exists(cluster >> self.block_bits) && self.used.get(cluster)
    }

    fn set_reftable(&mut self, block: u64, offset: u64) -> Result<(), CreateError> {
        let b = usize::try_from(block).map_err(|_| overflow())?;
        if (b as u64 + 1) * 8 > MAX_REFTABLE_SIZE_BYTES {
            return Err(CreateError::TooLarge);
        }
        if b >= self.reftable.len() {
            self.reftable.resize(b + 1, 0);
        }
        self.reftable[b] = offset;
        Ok(())
    }

    fn grow_end(&mut self, end: u64) {
        self.file_end = self.file_end.max(end);
    }

    /// `alloc_clusters_noref`: the first run of `n` free clusters from `free_idx`.
    fn alloc_noref(&mut self, n: u64) -> Result<u64, CreateError> {
        let mut run = 0u64;
        loop {
            let c = self.free_idx;
            self.free_idx = c.checked_add(1).ok_or_else(overflow)?;
            if self.refcount(c) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Ok(self.free_idx - n);
                }
            }
        }
    }

    /// `update_refcount(+1)` over `[start, start + n)`, undoing on failure as QEMU does.
    fn incref(&mut self, start: u64, n: u64) -> Result<(), AllocErr> {
        let end = start.checked_add(n).ok_or_else(overflow)?;
        let mut c = start;
        while c < end {
            if !self.block_exists(c >> self.block_bits) {
                if let Err(e) = self.alloc_refcount_block(c) {
                    // QEMU: "If the caller needs to restart the search for free clusters, try the
                    // same ones first to see if they're still free" (also when nothing was
                    // counted yet), then the counts made so far are undone.
                    if matches!(e, AllocErr::Again(_)) {
                        self.free_idx = self.free_idx.min(start);
                    }
                    for x in start..c {
                        self.used.set(x, false)?;
                    }
                    if c > start {
                        self.free_idx = self.free_idx.min(start);
                    }
                    return Err(e);
                }
            }
            self.used.set(c, true)?;
            c += 1;
        }
        Ok(())
    }

    /// `alloc_refcount_block` for a cluster whose block is missing: always ends in "search again"
    /// (or an error), as in QEMU.
    fn alloc_refcount_block(&mut self, cluster: u64) -> Result<(), AllocErr> {
        let block = cluster >> self.block_bits;
        let nb = self.alloc_noref(1)?;
        let capacity = self.reftable_clusters * (self.cs() / 8);
        if block >= capacity {
            // The table is full: QEMU builds a new refcount area (new blocks and a bigger table)
            // after the blocks in use, hooking the new block in there.
            if nb >> self.block_bits == block {
                self.used.set(nb, true)?;
            } else {
                self.incref(nb, 1)?;
            }
            let per = 1u64 << self.block_bits;
            let blocks_used = (cluster + 1).max(nb + 1).div_ceil(per);
            let meta = blocks_used.checked_mul(per).ok_or_else(overflow)?;
            self.refcount_area(meta, 0, false, Some((block, nb << self.cluster_bits)))?;
            self.grow_end((nb + 1) << self.cluster_bits);
            return Err(AllocErr::Again(Again));
        }
        if nb >> self.block_bits == block {
            self.set_reftable(block, nb << self.cluster_bits)?;
            self.used.set(nb, true)?;
        } else {
            self.incref(nb, 1)?;
            self.set_reftable(block, nb << self.cluster_bits)?;
        }
        let end = (nb + 1) << self.cluster_bits;
        self.grow_end(end);
        Err(AllocErr::Again(Again))
    }

    /// `qcow2_alloc_clusters`: `n` contiguous clusters, with their refcounts set.
    fn alloc(&mut self, n: u64) -> Result<u64, CreateError> {
        // Each retry creates at least one refcount block.
        let retries = u64::from(MAX_RETRIES) + 3 * (n >> self.block_bits);
        for _ in 0..retries {
            let start = self.alloc_noref(n)?;
            match self.incref(start, n) {
                Ok(()) => return Ok(start << self.cluster_bits),
                Err(AllocErr::Again(_)) => continue,
                Err(AllocErr::Fail(e)) => return Err(e),
            }
        }
        Err(CreateError::Internal(
            "the cluster allocator model did not converge".into(),
        ))
    }

    /// `qcow2_alloc_clusters_at`: up to `n` clusters exactly at cluster `start`; returns how many.
    fn alloc_at(&mut self, start: u64, n: u64) -> Result<u64, CreateError> {
        let retries = u64::from(MAX_RETRIES) + 3 * (n >> self.block_bits);
        for _ in 0..retries {
            let mut i = 0;
            while i < n && !self.refcount(start + i) {
                i += 1;
            }
            match self.incref(start, i) {
                Ok(()) => return Ok(i),
                Err(AllocErr::Again(_)) => continue,
                Err(AllocErr::Fail(e)) => return Err(e),
            }
        }
        Err(CreateError::Internal(
            "the cluster allocator model did not converge".into(),
        ))
    }

    /// `qcow2_free_clusters` of `n` clusters at cluster `start`.
    fn free(&mut self, start: u64, n: u64) -> Result<(), CreateError> {
        for c in start..start + n {
            self.used.set(c, false)?;
        }
        self.free_idx = self.free_idx.min(start);
        Ok(())
    }

    /// `qcow2_refcount_area` (exact size, no extra refblock): refcount structures covering
    /// `start` plus `additional` clusters, built at cluster `start`; the old table is freed.
    /// Returns the first cluster after the area.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Result<u64, CreateError> {
        let order = self.order;
        let cs = self.cs();
        let per_block = 1u64 << self.block_bits;
        let entries_per_cluster = cs / 8;
        let clusters = start.checked_add(additional).ok_or_else(overflow)?;
        let total_blocks = refcount_metadata_blocks(clusters, cs, order, !exact)?;
        let area_index = start / per_block;
        // Without `exact`, QEMU leaves room to grow: half as many entries again (matches its
        // images: 67 blocks -> 2 clusters of 64 entries, 1041 -> 25).
        let wanted = if exact {
            total_blocks
        } else {
            total_blocks + total_blocks / 2
        };
        let table_size = wanted.div_ceil(entries_per_cluster) * entries_per_cluster;
        if table_size * 8 > MAX_REFTABLE_SIZE_BYTES {
            return Err(CreateError::TooLarge);
        }
        let table_clusters = table_size * 8 / cs;
        let mut new_table = vec![0u64; table_size as usize];
        for (i, &e) in self.reftable.iter().enumerate().take(table_size as usize) {
            new_table[i] = e;
        }
        if let Some((index, offset)) = new_block {
            let slot = new_table.get_mut(index as usize).ok_or_else(|| {
                CreateError::Internal("new refcount block outside the table".into())
            })?;
            *slot = offset;
        }
        let additional_blocks = (area_index..total_blocks)
            .filter(|&i| new_table[i as usize] == 0)
            .count() as u64;
        let table_first = start + additional_blocks;
        let end = table_first + table_clusters;
        let mut next_block = start;
        for i in area_index..total_blocks {
            if new_table[i as usize] == 0 {
                new_table[i as usize] = next_block << self.cluster_bits;
                next_block += 1;
            }
            let first_covered = i * per_block;
            if first_covered < end {
                let j0 = start.saturating_sub(first_covered);
                let j1 = (end - first_covered).min(per_block);
                for j in j0..j1 {
                    self.used.set(first_covered + j, true)?;
                }
            }
        }
        let (old_off, old_clusters) = (self.reftable_offset, self.reftable_clusters);
        // QEMU leaves the old table's bytes in the freed clusters; keep them for byte equality.
        let old_len = (old_clusters * entries_per_cluster) as usize;
        let mut old = self.reftable.clone();
        old.resize(old_len, 0);
        self.stale.push((old_off, serialize_reftable(&old)));
        self.reftable = new_table;
        self.reftable_offset = table_first << self.cluster_bits;
        self.reftable_clusters = table_clusters;
        self.grow_end(end << self.cluster_bits);
        self.free(old_off >> self.cluster_bits, old_clusters)?;
        Ok(end)
    }

    /// Makes the refcount table hold every refcount block: where the model let it grow past its
    /// clusters, allocate a bigger table at the first free place and free the old one.
    fn fit_reftable(&mut self) -> Result<(), CreateError> {
        let epc = self.cs() / 8;
        for _ in 0..MAX_RETRIES {
            let needed_entries = self
                .reftable
                .iter()
                .rposition(|&e| e != 0)
                .map_or(1, |i| i as u64 + 1);
            let need = needed_entries.div_ceil(epc);
            if need <= self.reftable_clusters {
                self.reftable
                    .resize((self.reftable_clusters * epc) as usize, 0);
                return Ok(());
            }
            let off = self.alloc(need)?;
            let after = self
                .reftable
                .iter()
                .rposition(|&e| e != 0)
                .map_or(1, |i| i as u64 + 1);
            if after.div_ceil(epc) <= need {
                let (old_off, old_n) = (self.reftable_offset, self.reftable_clusters);
                self.reftable_offset = off;
                self.reftable_clusters = need;
                self.grow_end(off + need * self.cs());
                self.free(old_off >> self.cluster_bits, old_n)?;
            } else {
                self.free(off >> self.cluster_bits, need)?;
            }
        }
        Err(CreateError::Internal(
            "the refcount table placement did not converge".into(),
        ))
    }
}

/// QEMU's `qcow2_refcount_metadata_size` (without the generous increase): the number of refcount
/// blocks needed so that `clusters` clusters plus the refcount structures themselves are covered.
fn refcount_metadata_blocks(
    mut clusters: u64,
    cs: u64,
    order: RefcountOrder,
    mut generous: bool,
) -> Result<u64, CreateError> {
    let blocks_per_table_cluster = cs / 8;
    let per_block = cs * 8 / u64::from(order.refcount_bits());
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        let sum = clusters
            .checked_add(table)
            .and_then(|v| v.checked_add(blocks))
            .ok_or_else(overflow)?;
        blocks = sum.div_ceil(per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        } else if n == last {
            return Ok(blocks);
        }
    }
}

/// Replays QEMU's creation of an image with `p` and returns where everything goes.
pub(crate) fn plan(p: &Params) -> Result<Layout, CreateError> {
    let cb = p.geom.cluster_bits;
    let cs = p.geom.cluster_size();
    let block_bits = cb + 3 - p.order.0;
    let mut a = Alloc {
        cluster_bits: cb,
        block_bits,
        reftable: vec![0; (cs / 8) as usize],
        reftable_offset: cs,
        reftable_clusters: 1,
        used: Bitset::default(),
        free_idx: 0,
        file_end: 3 * cs,
        order: p.order,
        stale: Vec::new(),
    };
    a.reftable[0] = 2 * cs;
    a.alloc(3)?;

    let l1_bytes = p.l1_size.checked_mul(8).ok_or_else(overflow)?;
    let mut l1_offset = 0;
    if p.l1_size > 0 {
        l1_offset = a.alloc(l1_bytes.div_ceil(cs))?;
        a.grow_end(l1_offset + l1_bytes);
    }

    let total = p.size.div_ceil(cs);
    let l2_entries = p.geom.l2_entries();
    let chunk = (INT_MAX >> cb).max(1);
    let mut l2_tables: Vec<L2Plan> = Vec::new();
    let mut data_area = None;
    let mut file_len_min = 0;

    match p.prealloc {
        Preallocation::Off => {}
        Preallocation::Falloc | Preallocation::Full if !p.data_file => {
            let start = a.file_end.div_ceil(cs);
            let last_used = (0..start)
                .rev()
                .find(|&c| a.refcount(c))
                .map_or(0, |c| c + 1);
            let nb_l2 = total.div_ceil(l2_entries) + 1;
            let alloc_start = a.refcount_area(last_used, total + nb_l2, true, None)?;
            let got = a.alloc_at(alloc_start, total)?;
            if got != total {
                return Err(CreateError::Internal(
                    "preallocated data area is not free".into(),
                ));
            }
            let data_off = alloc_start << cb;
            let data_len = total * cs;
            data_area = Some((data_off, data_len));
            file_len_min = data_off + data_len;
            let mut g = 0;
            while g < total {
                let l1_index = g / l2_entries;
                let idx = g % l2_entries;
                let n = (total - g).min(l2_entries - idx);
                let offset = a.alloc(1)?;
                a.grow_end(offset + cs);
                l2_tables.push(L2Plan {
                    l1_index,
                    offset,
                    runs: vec![Run {
                        first: idx,
                        host: data_off + g * cs,
                        count: n,
                    }],
                });
                g += n;
            }
        }
        Preallocation::Metadata | Preallocation::Falloc | Preallocation::Full => {
            let mut g = 0;
            while g < total {
                let l1_index = g / l2_entries;
                let idx = g % l2_entries;
                if l2_tables.last().is_none_or(|t| t.l1_index != l1_index) {
                    let offset = a.alloc(1)?;
                    a.grow_end(offset + cs);
                    l2_tables.push(L2Plan {
                        l1_index,
                        offset,
                        runs: Vec::new(),
                    });
                }
                let n = (total - g).min(l2_entries - idx).min(chunk);
                let host = if p.data_file {
                    g * cs
                } else {
                    let h = a.alloc(n)?;
                    // QEMU extends the file to the end of the last allocation; with extended L2
                    // that end is the last subcluster in use (no COW of the cluster's tail), so
                    // the file may end inside the last data cluster.
                    let bytes = if p.geom.extended_l2 {
                        let sc = p.geom.subcluster_size();
                        (n * cs).min((p.size - g * cs).div_ceil(sc) * sc)
                    } else {
                        n * cs
                    };
                    file_len_min = file_len_min.max(h + bytes);
                    h
                };
                if let Some(t) = l2_tables.last_mut() {
                    match t.runs.last_mut() {
                        Some(r) if r.first + r.count == idx && r.host + r.count * cs == host => {
                            r.count += n;
                        }
                        _ => t.runs.push(Run {
                            first: idx,
                            host,
                            count: n,
                        }),
                    }
                }
                g += n;
            }
        }
    }

    a.fit_reftable()?;
    let file_len = a.file_end.max(file_len_min);
    Ok(Layout {
        reftable_offset: a.reftable_offset,
        reftable_clusters: a.reftable_clusters,
        reftable: a.reftable,
        l1_offset,
        l2_tables,
        data_area,
        file_len,
        stale: a.stale,
        used: a.used,
        block_bits,
        cluster_bits: cb,
        order: p.order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(cb: u32, order: u32, size: u64, prealloc: Preallocation) -> Params {
        let geom = Geometry::new(cb, false).unwrap();
        Params {
            geom,
            order: RefcountOrder(order),
            size,
            l1_size: geom.l1_entries_for(size).unwrap(),
            prealloc,
            data_file: false,
        }
    }

    #[test]
    fn plain_image_is_qemus() {
        let l = plan(&params(16, 4, 1 << 30, Preallocation::Off)).unwrap();
        assert_eq!(l.reftable_offset, 0x10000);
        assert_eq!(l.reftable[0], 0x20000);
        assert_eq!(l.l1_offset, 0x30000);
        assert_eq!(l.file_len, 0x30000 + 16);
    }

    #[test]
    fn metadata_4k_inserts_refblocks_like_qemu() {
        // qemu-img create -o preallocation=metadata,cluster_size=4k 300M
        let l = plan(&params(12, 4, 300 << 20, Preallocation::Metadata)).unwrap();
        assert_eq!(l.reftable[1], 0x808000);
        assert_eq!(l.reftable[2], 0x100d000);
        assert_eq!(l.l2_tables[4].offset, 0x809000);
        assert_eq!(l.file_len, 315355136);
    }

    #[test]
    fn reftable_growth_like_qemu() {
        // qemu-img create -o cluster_size=512,refcount_bits=64,preallocation=metadata 3M
        let l = plan(&params(9, 6, 3 << 20, Preallocation::Metadata)).unwrap();
        assert_eq!((l.reftable_offset, l.reftable_clusters), (0x208400, 2));
        assert_eq!(l.file_len, 3280384);
        assert_eq!(l.stale.len(), 1, "the old table's bytes stay in cluster 1");
        // qemu-img create -o cluster_size=512,refcount_bits=64 128G: the L1 table alone (32 MiB)
        // makes the table grow; QEMU leaves room for half as many blocks again.
        let l = plan(&params(9, 6, 128 << 30, Preallocation::Off)).unwrap();
        assert_eq!((l.reftable_offset, l.reftable_clusters), (0x200a200, 25));
        assert_eq!(l.file_len, 34101760);
    }

    #[test]
    fn refcounts_count_exactly_the_clusters_in_use() {
        for (cb, order, size, p) in [
            (9, 0, 5 << 20, Preallocation::Metadata),
            (12, 3, 40 << 20, Preallocation::Falloc),
            (16, 6, 1 << 30, Preallocation::Full),
        ] {
            let l = plan(&params(cb, order, size, p)).unwrap();
            let per = RefcountOrder(order).entries_per_block(cb);
            let cs = 1u64 << cb;
            let mut counted = 0u64;
            for (i, &off) in l.reftable.iter().enumerate() {
                if off == 0 {
                    continue;
                }
                let block = l.refblock(i as u64).unwrap();
                for j in 0..per {
                    let v =
                        qcow2_format::refcount::get_refcount(&block, j as usize, l.order).unwrap();
                    assert!(v <= 1);
                    if v == 1 {
                        counted += 1;
                        assert!((i as u64 * per + j) * cs < l.file_len.next_multiple_of(cs));
                    }
                }
            }
            // Every structure is counted: header, table, blocks, L1, L2s, data.
            let blocks = l.reftable.iter().filter(|&&o| o != 0).count() as u64;
            let data = if p == Preallocation::Off {
                0
            } else {
                size.div_ceil(cs)
            };
            let l1 = (params(cb, order, size, p).l1_size * 8).div_ceil(cs);
            let expect = 1 + l.reftable_clusters + blocks + l1 + l.l2_tables.len() as u64 + data;
            assert_eq!(counted, expect, "cb {cb} order {order}");
        }
    }

    #[test]
    fn falloc_moves_reftable_like_qemu() {
        // qemu-img create -o preallocation=falloc 100M: L2 at 0x10000, reftable at 0x40000.
        let l = plan(&params(16, 4, 100 << 20, Preallocation::Falloc)).unwrap();
        assert_eq!(l.reftable_offset, 0x40000);
        assert_eq!(l.l2_tables[0].offset, 0x10000);
        assert_eq!(l.l2_tables[0].runs[0].host, 0x50000);
        assert_eq!(l.file_len, 105185280);
    }
}
