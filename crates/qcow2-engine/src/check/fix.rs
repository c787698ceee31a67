//! Comparing the computed references with the stored refcounts (QEMU's `compare_refcounts`), the COPIED
//! flags (QEMU's `check_oflag_copied`), and the repairs: refcount entries raised or lowered in place, a
//! whole new refcount structure when the old one cannot be trusted, COPIED flags set or cleared.
//!
//! Crash safety (docs/ARCHITECTURE.md, "Check and repair"): each repair step ends with an fdatasync
//! before the next begins, and each is safe alone: dropping references (L2/L1 entries) only makes
//! refcounts too high (leaks); raising a refcount never harms; lowering one is done only after the
//! references it is computed from are durable; a new refcount structure is written and synced in free
//! space past the end of the file and takes effect with one header write of 12 bytes (one sector);
//! COPIED flags are set only after the refcounts that justify them are durable. A torn write of a table
//! leaves each 8- or 16-byte entry old or new, each of which is no worse than before.

use std::collections::HashMap;

use qcow2_format::l1::{L1E_COPIED, L1E_OFFSET_MASK};
use qcow2_format::l2::{L2E_COPIED, L2E_OFFSET_MASK};
use qcow2_format::refcount::{get_refcount, set_refcount, REFT_OFFSET_MASK};

use super::walk::{be64, raw_type, RawType};
use super::{Pass, Repair};
use crate::qcow2::overlap::MetaKind;
use crate::qcow2::refcount::MAX_HOST_END;

/// C's `%#x`: `0x` and hex digits, but plain `0` for zero.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Why a stored refcount could not be read.
#[derive(Debug)]
pub(super) struct Unreadable(pub(super) String);

impl<B: qcow2_io::Backend> Pass<'_, B> {
    /// The stored refcount of cluster `c` (QEMU's `qcow2_get_refcount`): 0 beyond the table or for a
    /// missing block; an unaligned block offset or a failed read is an error.
    pub(super) async fn stored(&mut self, c: u64) -> Result<u64, Unreadable> {
        let epb = self.epb();
        let ti = c / epb;
        let Some(&raw) = self.reftable.get(ti as usize) else {
            return Ok(0);
        };
        let off = raw & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if !self.geom.is_cluster_aligned(off) {
            if !self.signalled {
                // QEMU's qcow2_signal_corruption, once per check.
                self.signalled = true;
                self.msg(format!(
                    "qcow2: Image is corrupt: Refblock offset {} unaligned (reftable index: {}); \
                     further non-fatal corruption events will be suppressed",
                    c_hex(off),
                    c_hex(ti)
                ));
            }
            return Err(Unreadable("Input/output error".into()));
        }
        if off >= self.file_len {
            // Reads as zeros, not cached (a hostile table naming far blocks costs no memory); beyond
            // the largest file offset the read fails, as QEMU's does.
            if off.saturating_add(self.cs()) > i64::MAX as u64 {
                return Err(Unreadable("Input/output error".into()));
            }
            return Ok(0);
        }
        // Cached by block offset: a hostile table naming one block many times costs one copy.
        if !self.blocks.contains_key(&off) {
            let cs = self.cs();
            let (res, buf) = self
                .file
                .read_at(crate::buf::io_buf(cs as usize), off)
                .await;
            if res.is_err() {
                // QEMU's block layer fails such reads (out of range offsets included) with EIO.
                return Err(Unreadable("Input/output error".into()));
            }
            self.blocks.insert(off, buf.to_vec());
        }
        let block = &self.blocks[&off];
        get_refcount(block, (c % epb) as usize, self.order).map_err(|e| Unreadable(e.to_string()))
    }

    /// Sets the stored refcount of cluster `c` in the cached block (written by [`Pass::write_blocks`]).
    /// The block exists: only clusters with a nonzero stored count are updated in place.
    fn set_stored(&mut self, c: u64, v: u64) -> bool {
        let epb = self.epb();
        let order = self.order;
        let Some(off) = self.block_of(c) else {
            return false;
        };
        let Some(block) = self.blocks.get_mut(&off) else {
            return false;
        };
        if set_refcount(block, (c % epb) as usize, order, v).is_err() {
            return false;
        }
        self.dirty_blocks.insert(off);
        true
    }

    /// The offset of the refcount block describing cluster `c`, when the table names one.
    fn block_of(&self, c: u64) -> Option<u64> {
        let raw = *self.reftable.get((c / self.epb()) as usize)?;
        Some(raw & REFT_OFFSET_MASK).filter(|&o| o != 0)
    }

    /// Writes the changed refcount blocks and syncs. Returns false (with a check error) on failure.
    async fn write_blocks(&mut self) -> bool {
        let mut ok = true;
        for off in std::mem::take(&mut self.dirty_blocks) {
            let data = self.blocks[&off].clone();
            if !self
                .write(
                    off,
                    data,
                    Some((MetaKind::RefcountBlock, off)),
                    "write refcount block",
                )
                .await
            {
                ok = false;
            }
        }
        ok && self.sync().await
    }

    /// QEMU's `compare_refcounts`: stored against computed, for every cluster of the file. `fix`: what
    /// may be repaired in place (a stored 0 for a used cluster is never repaired here: it asks for a
    /// rebuild). Returns the highest cluster with a stored or computed count.
    pub(super) async fn compare(&mut self, fix: Repair) -> u64 {
        let mut highest = 0;
        let nb = self.nb_clusters;
        // Clusters to visit: those the file covers (stored counts of clusters past the end are not
        // compared, as in QEMU) and those referenced (`nb_clusters` covers both).
        let mut c = 0;
        while c < nb {
            // Skip runs where nothing is stored or referenced: whole absent blocks with no references.
            let epb = self.epb();
            let ti = c / epb;
            let block_absent = self
                .reftable
                .get(ti as usize)
                .is_none_or(|&r| r & REFT_OFFSET_MASK == 0);
            if block_absent && c % epb == 0 && !self.refs_in(c, (c + epb).min(nb)) {
                c += epb;
                continue;
            }
            let stored = match self.stored(c).await {
                Ok(v) => v,
                Err(Unreadable(e)) => {
                    self.check_error(format!("Can't get refcount for cluster {c}: {e}"));
                    c += 1;
                    continue;
                }
            };
            let computed = self.refs.get(c);
            if stored > 0 || computed > 0 {
                highest = c;
            }
            if stored != computed {
                let mut fixed = None;
                if stored == 0 {
                    self.rebuild = true;
                } else if stored > computed && fix != Repair::None {
                    fixed = Some(false);
                } else if stored < computed && fix == Repair::All {
                    fixed = Some(true);
                }
                let label = match fixed {
                    Some(_) => "Repairing",
                    None if stored < computed => "ERROR",
                    None => "Leaked",
                };
                self.msg(format!(
                    "{label} cluster {c} refcount={stored} reference={computed}"
                ));
                match fixed {
                    Some(corruption) if self.set_stored(c, computed) => {
                        if corruption {
                            self.res.corruptions_fixed += 1;
                        } else {
                            self.res.leaks_fixed += 1;
                        }
                    }
                    _ => {
                        if stored < computed {
                            self.res.corruptions += 1;
                        } else {
                            self.res.leaks += 1;
                        }
                    }
                }
            }
            c += 1;
        }
        if fix == Repair::All {
            self.clear_past_end(nb).await;
        }
        if !self.dirty_blocks.is_empty() {
            self.write_blocks().await;
        }
        highest
    }

    /// Zeroes stored refcounts of clusters at or past `nb` (past the end of the file) that nothing
    /// points at. QEMU neither compares nor reports them, so neither does the count; but left in place
    /// they would make the allocator skip those clusters once the file grows, leaking them for good.
    /// Only with `-r all`, after entries pointing past the end were dropped (durably); clusters some
    /// remaining reference still points at are kept.
    async fn clear_past_end(&mut self, nb: u64) {
        let epb = self.epb();
        let order = self.order;
        let bits = self.geom.cluster_bits;
        // A block named by several table entries (a corrupt table) holds counts for another range
        // too: left alone.
        let mut named: HashMap<u64, u32> = HashMap::new();
        for &raw in &self.reftable {
            *named.entry(raw & REFT_OFFSET_MASK).or_default() += 1;
        }
        for ti in nb / epb..self.reftable.len() as u64 {
            let off = self.reftable[ti as usize] & REFT_OFFSET_MASK;
            if off == 0
                || !self.geom.is_cluster_aligned(off)
                || off >= self.file_len
                || named.get(&off) != Some(&1)
            {
                continue;
            }
            if self.stored(ti * epb).await.is_err() {
                continue;
            }
            let referenced = |c: u64| {
                self.past_eof_refs
                    .iter()
                    .any(|&(s, e)| (s >> bits..=(e - 1) >> bits).contains(&c))
            };
            let first = (ti * epb).max(nb);
            let Some(block) = self.blocks.get(&off) else {
                continue;
            };
            let clear: Vec<usize> = (first..(ti + 1) * epb)
                .filter(|&c| {
                    matches!(get_refcount(block, (c % epb) as usize, order), Ok(v) if v != 0)
                        && !referenced(c)
                })
                .map(|c| (c % epb) as usize)
                .collect();
            if clear.is_empty() {
                continue;
            }
            if let Some(block) = self.blocks.get_mut(&off) {
                for i in clear {
                    let _ = set_refcount(block, i, order, 0);
                }
                self.dirty_blocks.insert(off);
            }
        }
    }

    /// The end of everything the image uses or points at, the refcount structure included (it stays in
    /// force until a rebuild switches the header, so it must not be overwritten): free space starts
    /// there.
    pub(super) fn free_end(&self) -> u64 {
        let cs = self.cs();
        let mut end = self.file_len.max(self.max_ref_end);
        // Old refcount blocks inside the file (one past its end holds nothing: zeros).
        for &raw in &self.reftable {
            let off = raw & REFT_OFFSET_MASK;
            if off < self.file_len {
                end = end.max(off.saturating_add(cs));
            }
        }
        if self.reftable_offset < self.file_len {
            end = end.max(
                self.reftable_offset
                    .saturating_add(self.reftable.len() as u64 * 8),
            );
        }
        end
    }

    /// Whether any cluster in `[from, to)` is referenced.
    fn refs_in(&self, from: u64, to: u64) -> bool {
        (from..to).any(|c| self.refs.get(c) != 0)
    }

    /// Writes a new refcount table and blocks holding the computed counts past the end of the file, syncs,
    /// then points the header at them (one 12-byte write) and syncs. The old table and blocks are then
    /// unreferenced, counted once: leaks for the caller to free. Returns false on failure
    /// (a check error is recorded; the image still uses the old structure unless the header write itself
    /// failed after reaching the disk, which leaves either structure: both count every reference).
    pub(super) async fn rebuild_structure(&mut self) -> bool {
        let cs = self.cs();
        let bits = self.geom.cluster_bits;
        let epb = self.epb();
        // The old table and blocks keep their counts: once the header points at the new structure
        // they are leaks, which the recount after the switch frees (as QEMU does), so that a crash
        // between the two leaves leaks only.
        let mut counts = std::mem::take(&mut self.refs);
        let last_used = counts.nonzero().last().map_or(0, |(c, _)| c + 1);
        let start = self.free_end().div_ceil(cs).max(last_used);
        // Table indices with counts, plus those of the new structure: a fixed point in the number of
        // new clusters (it only grows, and by little).
        let used: std::collections::BTreeSet<u64> =
            counts.nonzero().map(|(c, _)| c / epb).collect();
        let mut k = 1u64;
        let (blocks, table_clusters) = loop {
            let mut idx = used.clone();
            let mut c = start;
            while c < start + k {
                idx.insert(c / epb);
                c = (c / epb + 1) * epb;
            }
            let entries = idx.last().map_or(1, |&l| l + 1);
            let tc = (entries * 8).div_ceil(cs);
            if tc * cs > qcow2_format::refcount::MAX_REFTABLE_SIZE_BYTES {
                self.check_error(format!(
                    "ERROR cannot rebuild the refcount structure: {entries} refcount table entries \
                     exceed QEMU's limit"
                ));
                return false;
            }
            let need = tc + idx.len() as u64;
            if need <= k {
                break (idx, tc);
            }
            k = need;
        };
        let table_bytes = table_clusters * cs;
        let end = (start + table_clusters + blocks.len() as u64).saturating_mul(cs);
        if table_bytes > qcow2_format::refcount::MAX_REFTABLE_SIZE_BYTES || end > MAX_HOST_END {
            self.check_error(format!(
                "ERROR cannot rebuild the refcount structure: a table of {table_bytes} bytes ending at \
                 {end:#x} is beyond QEMU's limits"
            ));
            return false;
        }
        for c in start..start + table_clusters + blocks.len() as u64 {
            counts.set(c, 1);
        }
        let mut table = vec![0u8; table_bytes as usize];
        for (at, &ti) in (start + table_clusters..).zip(blocks.iter()) {
            let mut block = vec![0u8; cs as usize];
            for i in 0..epb {
                let v = counts.get(ti * epb + i).min(self.order.max_refcount());
                if v != 0 && set_refcount(&mut block, i as usize, self.order, v).is_err() {
                    self.check_error("ERROR cannot encode a rebuilt refcount".into());
                    return false;
                }
            }
            let off = at << bits;
            table[(ti * 8) as usize..(ti * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
            if !self
                .write(off, block, None, "write rebuilt refcount block")
                .await
            {
                return false;
            }
        }
        let table_off = start << bits;
        if !self
            .write(table_off, table, None, "write rebuilt refcount table")
            .await
            || !self.sync().await
        {
            return false;
        }
        let mut hdr = table_off.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(table_clusters as u32).to_be_bytes());
        if !self
            .write(48, hdr, Some((MetaKind::Header, 0)), "write header")
            .await
            || !self.sync().await
        {
            return false;
        }
        self.refs = counts;
        true
    }

    /// QEMU's `check_oflag_copied`: COPIED must be set exactly on L1 entries whose L2 table has refcount
    /// 1 and on L2 entries (data and allocated zero clusters) whose cluster has refcount 1. Repairs with
    /// `-r all`, and with `-r leaks` when the refcounts are known good.
    pub(super) async fn check_copied(&mut self) -> super::Flow<()> {
        let repair = match self.fix {
            Repair::All => true,
            Repair::Leaks => {
                self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
            }
            Repair::None => false,
        };
        let bits = self.geom.cluster_bits;
        let ext = self.header.extended_l2();
        let esize = self.geom.l2_entry_size();
        let n = self.geom.l2_entries();
        let l1_off = self.header.l1_table_offset().0;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Ok(rc) = self.stored(l2 >> bits).await else {
                continue;
            };
            if (rc == 1) != (e & L1E_COPIED != 0) {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}",
                    if repair { "Repairing" } else { "ERROR" }
                ));
                if repair {
                    let new = if rc == 1 {
                        e | L1E_COPIED
                    } else {
                        e & !L1E_COPIED
                    };
                    let at = l1_off + i as u64 * 8;
                    let own = Some((MetaKind::ActiveL1, l1_off));
                    if !self
                        .write(at, new.to_be_bytes().to_vec(), own, "write L1 entry")
                        .await
                        || !self.sync().await
                    {
                        return Err(super::PassAbort);
                    }
                    self.l1[i] = new;
                    self.res.corruptions -= 1;
                    self.res.corruptions_fixed += 1;
                }
            }
            let Some(mut table) = self
                .read(l2, n * esize, "ERROR: Could not read L2 table")
                .await
            else {
                return Err(super::PassAbort);
            };
            let mut dirty = 0;
            for j in 0..table.len() as u64 / esize {
                let at = (j * esize) as usize;
                let entry = be64(&table, at);
                let ty = raw_type(entry, ext, self.has_data_file);
                if !matches!(ty, RawType::Normal | RawType::ZeroAlloc) {
                    continue;
                }
                let rc = if self.has_data_file {
                    1
                } else {
                    match self.stored((entry & L2E_OFFSET_MASK) >> bits).await {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (entry & L2E_COPIED != 0) {
                    self.res.corruptions += 1;
                    self.msg(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}",
                        if repair { "Repairing" } else { "ERROR" }
                    ));
                    if repair {
                        let new = if rc == 1 {
                            entry | L2E_COPIED
                        } else {
                            entry & !L2E_COPIED
                        };
                        table[at..at + 8].copy_from_slice(&new.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                let own = Some((MetaKind::ActiveL2, l2));
                if !self.write(l2, table, own, "write L2 table").await || !self.sync().await {
                    return Err(super::PassAbort);
                }
                self.res.corruptions -= dirty;
                self.res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }
}
