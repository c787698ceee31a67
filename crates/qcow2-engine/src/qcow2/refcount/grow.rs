//! Growing the refcount structures: new refcount blocks and a moved, larger refcount table.
//!
//! Spec: qcow2.txt, "Host cluster management". Both are written and fdatasync'ed at once, also with lazy
//! refcounts, and are self-describing (QEMU's `alloc_refcount_block`): a new block is placed inside the
//! range of clusters it describes and counts itself; a new table is laid out together with the new
//! blocks that describe it, and those blocks count the table and themselves. Ordering: new blocks (and
//! existing blocks whose counts changed) -> table -> fdatasync -> header fields -> fdatasync -> the old
//! table is freed. A crash at any point leaves either the old or the new table in force, each complete,
//! and at worst leaked clusters.

use qcow2_format::refcount::{
    encode_reftable_entry, serialize_reftable, set_refcount, MAX_REFTABLE_SIZE_BYTES,
};
use qcow2_format::types::HostOffset;
use qcow2_io::Backend;

use super::{sync, too_big, write_checked, Block, MetaIo, Refcounts, MAX_HOST_END};
use crate::error::{Error, Result};
use crate::qcow2::overlap::{MetaKind, OverlapMap};

/// Header offset of `refcount_table_offset` (u64, big-endian), followed at 56 by
/// `refcount_table_clusters` (u32): one 12-byte write updates both.
const HEADER_REFTABLE_FIELDS: u64 = 48;

/// Layout attempts when growing the table before giving up (each attempt only grows the layout, which
/// converges after two or three in practice).
const MAX_LAYOUT_TRIES: usize = 16;

impl Refcounts {
    /// Makes sure table index `ti` has a refcount block, creating it (and growing the table) if not.
    /// `avoid`: an inclusive range of clusters the new block must not occupy (clusters about to be
    /// referenced by the caller).
    ///
    /// The block goes to the first cluster of the range it describes (all free: the range has no
    /// block) and counts itself. When `avoid` covers that whole range, it goes to the first free
    /// cluster elsewhere, counted by the block describing that cluster, which is created first if
    /// needed and written before the new block is linked.
    pub(crate) async fn ensure_block<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        ti: u64,
        avoid: Option<(u64, u64)>,
    ) -> Result<()> {
        // Each round creates a block or grows the table, so a few rounds always suffice.
        for _ in 0..MAX_LAYOUT_TRIES {
            if self.block_offset(ti).is_some() {
                return Ok(());
            }
            let need = ti.saturating_add(1);
            if need > self.table.len() as u64 {
                self.grow_table(io, map, need).await?;
                continue;
            }
            if let Some(idx) = self.self_slot(ti, avoid) {
                return self.create_block(io, map, ti, idx).await;
            }
            // The range is full: find a free cluster elsewhere.
            let (c2, _) = self.find_free_run(io, self.free_hint, 1).await?;
            if avoid.is_some_and(|(a, b)| (a..=b).contains(&c2)) {
                break;
            }
            let (ti2, _) = self.loc(c2);
            if ti2 >= self.table.len() as u64 {
                self.grow_table(io, map, ti2 + 1).await?;
                continue;
            }
            if self.block_offset(ti2).is_none() {
                // c2 is free, so block ti2 can describe itself.
                if let Some(idx2) = self.self_slot(ti2, None) {
                    self.create_block(io, map, ti2, idx2).await?;
                }
                continue;
            }
            self.set(io, c2, 1).await?;
            self.write_block(io, map, ti2).await?;
            let data = self.take_initial();
            return self.link_block(io, map, ti, c2, data).await;
        }
        Err(Error::corrupt(
            io.name,
            format!("no place found for the refcount block of refcount table entry {ti}"),
        ))
    }

    /// The initial content of a new block: zeros.
    fn take_initial(&self) -> Vec<u8> {
        vec![0; self.cs() as usize]
    }

    /// The index (in block `ti`, which does not exist yet, so every cluster it describes is free) of
    /// the first cluster other than the header cluster and `avoid`.
    fn self_slot(&self, ti: u64, avoid: Option<(u64, u64)>) -> Option<usize> {
        let base = ti.saturating_mul(self.epb);
        (0..self.epb as usize).find(|&idx| {
            let c = base + idx as u64;
            c != 0 && !avoid.is_some_and(|(a, b)| (a..=b).contains(&c))
        })
    }

    /// Creates block `ti` at its own cluster `idx`, counting itself.
    async fn create_block<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        ti: u64,
        idx: usize,
    ) -> Result<()> {
        let mut data = self.take_initial();
        set_refcount(&mut data, idx, self.order, 1).map_err(Error::format(io.name))?;
        let c = ti.saturating_mul(self.epb) + idx as u64;
        self.link_block(io, map, ti, c, data).await
    }

    /// Writes block `ti` with `data` at cluster `c`, syncs, links it in the table, syncs.
    async fn link_block<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        ti: u64,
        c: u64,
        data: Vec<u8>,
    ) -> Result<()> {
        let cs = self.cs();
        let off = c << self.cluster_bits;
        if off.saturating_add(cs) > MAX_HOST_END {
            return Err(too_big(io.name, "allocating a refcount block".into()));
        }
        write_checked(io, map, off, data.clone(), None, "write new refcount block").await?;
        sync(io).await?;
        let entry = encode_reftable_entry(Some(HostOffset(off)), io.geom)
            .map_err(Error::format(io.name))?;
        // ti < table length <= 1 Mi entries.
        let entry_off = self.table_offset + ti * 8;
        write_checked(
            io,
            map,
            entry_off,
            entry.to_be_bytes().to_vec(),
            Some((MetaKind::RefcountTable, self.table_offset)),
            "write refcount table entry",
        )
        .await?;
        sync(io).await?;
        self.table[ti as usize] = off;
        map.insert(off, cs, MetaKind::RefcountBlock);
        self.evict();
        self.tick += 1;
        self.blocks.insert(
            ti,
            Block {
                data,
                dirty: false,
                used: self.tick,
            },
        );
        self.alloc_end = self.alloc_end.max(off + cs);
        Ok(())
    }

    /// Moves the refcount table to a larger place holding at least `need_entries` entries.
    async fn grow_table<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        need_entries: u64,
    ) -> Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let max_entries = MAX_REFTABLE_SIZE_BYTES / 8;
        let table_too_big = |entries: u64| Error::Unsupported {
            path: io.name.to_owned(),
            what: format!(
                "a refcount table of {entries} entries (the image would outgrow QEMU's limit of \
                 {MAX_REFTABLE_SIZE_BYTES} bytes of refcount table)"
            ),
        };
        if need_entries > max_entries {
            return Err(table_too_big(need_entries));
        }
        let old = self.table.len() as u64;
        // Grow by half at least (QEMU grows by 1.5x too), within the limit.
        let mut want = need_entries
            .max(old + old / 2)
            .max(old + per_cluster)
            .min(max_entries)
            .max(need_entries);
        let mut b = 0u64;
        for _ in 0..MAX_LAYOUT_TRIES {
            let t = want.div_ceil(per_cluster);
            let total = b + t;
            let (start, first_free) = self.find_free_run(io, self.free_hint, total).await?;
            let (lo, _) = self.loc(start);
            let (hi, _) = self.loc(start + total - 1);
            let missing: Vec<u64> = (lo..=hi)
                .filter(|&i| self.block_offset(i).is_none())
                .collect();
            let need2 = want.max(hi + 1);
            if need2 > max_entries {
                return Err(table_too_big(need2));
            }
            if missing.len() as u64 == b && need2.div_ceil(per_cluster) == t {
                self.move_table(io, map, start, &missing, t).await?;
                self.note_taken(start, total, first_free);
                return Ok(());
            }
            b = missing.len() as u64;
            want = need2;
        }
        Err(Error::corrupt(
            io.name,
            "internal: no stable layout found for a larger refcount table",
        ))
    }

    /// Lays out new blocks for the table indices `missing` at clusters `start..`, then a new table of
    /// `t` clusters after them; writes and syncs all, switches the header, frees the old table.
    async fn move_table<B: Backend>(
        &mut self,
        io: &MetaIo<'_, B>,
        map: &mut OverlapMap,
        start: u64,
        missing: &[u64],
        t: u64,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cluster_bits;
        let order = self.order;
        let b = missing.len() as u64;
        let end = start + b + t;
        // <= 2^56 / cs (find_free_run)
        let mut new_blocks: Vec<(u64, u64, Vec<u8>)> = missing
            .iter()
            .enumerate()
            .map(|(k, &ti)| (ti, (start + k as u64) << cb, vec![0; cs as usize]))
            .collect();
        // Count every cluster of the layout in the block describing it.
        let mut touched = std::collections::BTreeSet::new();
        for c in start..end {
            let (ti, idx) = self.loc(c);
            if let Some((_, _, d)) = new_blocks.iter_mut().find(|(i, _, _)| *i == ti) {
                set_refcount(d, idx, order, 1).map_err(Error::format(io.name))?;
            } else {
                self.set(io, c, 1).await?;
                touched.insert(ti);
            }
        }
        for (_, off, d) in &new_blocks {
            write_checked(io, map, *off, d.clone(), None, "write new refcount block").await?;
        }
        for &ti in &touched {
            self.write_block(io, map, ti).await?;
        }
        let table_off = (start + b) << cb;
        let mut table = self.table.clone();
        // t <= 8 MiB / cs entries' worth of clusters.
        table.resize((t * (cs / 8)) as usize, 0);
        for (ti, off, _) in &new_blocks {
            table[*ti as usize] = *off;
        }
        write_checked(
            io,
            map,
            table_off,
            serialize_reftable(&table),
            None,
            "write new refcount table",
        )
        .await?;
        sync(io).await?;
        let clusters = u32::try_from(t).map_err(|_| {
            Error::corrupt(io.name, format!("internal: refcount table of {t} clusters"))
        })?;
        let mut fields = table_off.to_be_bytes().to_vec();
        fields.extend_from_slice(&clusters.to_be_bytes());
        write_checked(
            io,
            map,
            HEADER_REFTABLE_FIELDS,
            fields,
            Some((MetaKind::Header, 0)),
            "write header (refcount table fields)",
        )
        .await?;
        sync(io).await?;

        // The new table is in force.
        let old_off = self.table_offset;
        let old_clusters = self.table_clusters;
        self.table = table;
        self.table_offset = table_off;
        self.table_clusters = t;
        map.remove_range(old_off, old_clusters << cb);
        map.insert(table_off, t << cb, MetaKind::RefcountTable);
        for (ti, off, data) in new_blocks {
            map.insert(off, cs, MetaKind::RefcountBlock);
            self.evict();
            self.tick += 1;
            self.blocks.insert(
                ti,
                Block {
                    data,
                    dirty: false,
                    used: self.tick,
                },
            );
        }
        self.alloc_end = self.alloc_end.max(end << cb);
        // Nothing references the old table any more: free it now (the decrement reaches the disk with
        // the next write-back; a crash before that only leaks it).
        let first_old = old_off >> cb;
        for c in first_old..first_old + old_clusters {
            let v = self.rc(io, c).await?;
            if v == 0 {
                continue;
            }
            let (ti, _) = self.loc(c);
            if self.block_offset(ti).is_some() {
                self.set(io, c, v - 1).await?;
            }
            if v == 1 {
                self.free_hint = self.free_hint.min(c).max(1);
            }
        }
        Ok(())
    }
}
