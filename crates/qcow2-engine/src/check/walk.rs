//! Counting references (QEMU's `calculate_refcounts`): every cluster the image uses, as the image's own
//! structures say, counted in memory; problems found on the way are reported and, in a repairing pass,
//! bad L2 and L1 entries are dropped.
//!
//! Spec: qcow2.txt, "Host cluster management", "Cluster mapping", "Snapshots", "Bitmaps". What counts
//! and how problems are counted follows QEMU 10 (`check_refcounts_l1`, `check_refcounts_l2`,
//! `qcow2_inc_refcounts_imrt`, `check_refblocks`), so that `corruptions` and `leaks` agree with
//! `qemu-img check` on the same image. Where QEMU leaves an entry broken (a data cluster at an unaligned
//! offset, a reference one cluster or more past the end of the file, an L2 table at such an offset), a
//! repairing pass drops the entry: the guest cluster then reads as unallocated.

use std::collections::BTreeMap;

use qcow2_format::compressed::CompressedDescriptor;
use qcow2_format::l1::{L1E_OFFSET_MASK, L1E_RESERVED_MASK};
use qcow2_format::l2::{
    L2E_COMPRESSED, L2E_COPIED, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, L2E_ZERO,
};
use qcow2_format::refcount::{REFT_OFFSET_MASK, REFT_RESERVED_MASK};

use super::{Pass, Repair};
use crate::qcow2::overlap::MetaKind;

/// An L2 entry whose cluster cannot take one more reference: the repair gives it a copy.
#[derive(Debug, Clone, Copy)]
pub(super) struct Copy {
    /// Where the entry is.
    pub(super) entry_off: u64,
    /// The L2 table holding it.
    pub(super) l2_off: u64,
    /// Whether that table is active.
    pub(super) active: bool,
    /// The raw entry (host offset and flags).
    pub(super) entry: u64,
}

/// Clusters per chunk of the in-memory reference counts.
const CHUNK: u64 = 4096;
/// Extended L2 bitmap: the allocation bits (low 32).
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// Reference counts computed in memory, sparse (chunks of [`CHUNK`] clusters allocated on first use),
/// so that a large sparse file costs memory only where it is used.
#[derive(Debug, Default)]
pub(super) struct RefMap {
    chunks: BTreeMap<u64, Box<[u64]>>,
}

impl RefMap {
    /// The count of cluster `c`.
    pub(super) fn get(&self, c: u64) -> u64 {
        self.chunks
            .get(&(c / CHUNK))
            .map_or(0, |ch| ch[(c % CHUNK) as usize])
    }

    /// Sets the count of cluster `c`.
    pub(super) fn set(&mut self, c: u64, v: u64) {
        let ch = self
            .chunks
            .entry(c / CHUNK)
            .or_insert_with(|| vec![0; CHUNK as usize].into_boxed_slice());
        ch[(c % CHUNK) as usize] = v;
    }

    /// Clusters with a nonzero count, ascending, with their counts.
    pub(super) fn nonzero(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.iter().flat_map(|(&k, ch)| {
            ch.iter()
                .enumerate()
                .filter(|(_, &v)| v != 0)
                .map(move |(i, &v)| (k * CHUNK + i as u64, v))
        })
    }
}

/// How a raw L2 entry is classified, as QEMU's `qcow2_get_cluster_type` does (not validated: the check
/// must see invalid entries as QEMU sees them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RawType {
    /// Compressed descriptor.
    Compressed,
    /// Zero flag with a host offset (standard L2 only).
    ZeroAlloc,
    /// Zero flag without a host offset (standard L2 only).
    ZeroPlain,
    /// A host offset (or, with a data file, offset 0 with COPIED set).
    Normal,
    /// Nothing.
    Unallocated,
}

/// QEMU's classification of a raw L2 entry.
pub(super) fn raw_type(entry: u64, extended_l2: bool, has_data_file: bool) -> RawType {
    if entry & L2E_COMPRESSED != 0 {
        RawType::Compressed
    } else if entry & L2E_ZERO != 0 && !extended_l2 {
        if entry & L2E_OFFSET_MASK != 0 {
            RawType::ZeroAlloc
        } else {
            RawType::ZeroPlain
        }
    } else if entry & L2E_OFFSET_MASK == 0 {
        if has_data_file && entry & L2E_COPIED != 0 {
            RawType::Normal
        } else {
            RawType::Unallocated
        }
    } else {
        RawType::Normal
    }
}

/// The repaired form of an entry with bits QEMU reports as corruption but does not repair: reserved
/// bits of a standard descriptor, subclusters marked both allocated and zero (allocated wins),
/// allocation bits of an unallocated entry, any bitmap of a compressed one. `None` when the entry is
/// fine.
fn fixed_entry(entry: u64, bitmap: u64, ext: bool, has_data_file: bool) -> Option<(u64, u64)> {
    let (mut e, mut b) = (entry, bitmap);
    match raw_type(entry, ext, has_data_file) {
        RawType::Compressed => {
            e &= !L2E_COPIED;
            b = 0;
        }
        RawType::Normal | RawType::ZeroAlloc => {
            e &= !L2E_STD_RESERVED_MASK;
            b &= !((b & BITMAP_ALL_ALLOC) << 32);
        }
        RawType::Unallocated | RawType::ZeroPlain => {
            e &= !L2E_STD_RESERVED_MASK;
            b &= !BITMAP_ALL_ALLOC;
        }
    }
    ((e, b) != (entry, bitmap)).then_some((e, b))
}

/// Big-endian u64 at `at` of `b` (0 where `b` is too short: tables are read whole, so this is only a
/// guard).
pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at.saturating_add(8))
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

impl<B: qcow2_io::Backend> Pass<'_, B> {
    /// QEMU's `qcow2_inc_refcounts_imrt`: one reference to every cluster touched by `[off, off + len)`.
    /// A range ending one cluster or more past the end of the file is a corruption and not counted; a
    /// count at the refcount width's maximum is an overflow corruption.
    pub(super) fn inc(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = self.cs();
        let end = u128::from(off) + u128::from(len);
        if off < self.file_len {
            // Ranges starting past the end of the file read as zeros and are corruption anyway; only
            // what starts inside the file bounds where free space begins.
            self.max_ref_end = self.max_ref_end.max(u64::try_from(end).unwrap_or(u64::MAX));
        }
        if end >= u128::from(self.file_len) + u128::from(cs) {
            if self.past_eof_refs.len() < super::MAX_MESSAGES {
                self.past_eof_refs
                    .push((off, u64::try_from(end).unwrap_or(u64::MAX)));
            }
            self.error(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or \
                 more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        // end < file_len + cs < 2^64 + 2^21, and file lengths are far below 2^63.
        let end = end as u64;
        let bits = self.geom.cluster_bits;
        let max = self.order.max_refcount();
        for c in (off >> bits)..=((end - 1) >> bits) {
            let v = self.refs.get(c);
            if v >= max {
                self.error(format!("ERROR: overflow cluster offset={:#x}", c << bits));
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to \
                     create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                continue;
            }
            self.refs.set(c, v + 1);
            self.nb_clusters = self.nb_clusters.max(c + 1);
        }
    }

    /// QEMU's `calculate_refcounts`.
    pub(super) async fn calculate(&mut self) -> super::Flow<()> {
        let cs = self.cs();
        self.inc(0, cs);
        self.map.insert(0, cs, MetaKind::Header);
        // The refcount structure and the snapshot table are known before the walk: registered first,
        // so that a repair recognises an L2 table placed on them.
        self.map.insert(
            self.reftable_offset,
            self.reftable.len() as u64 * 8,
            MetaKind::RefcountTable,
        );
        for i in 0..self.reftable.len() {
            let off = self.reftable[i] & REFT_OFFSET_MASK;
            if off != 0 && self.geom.is_cluster_aligned(off) && off < self.file_len {
                self.map.insert(off, cs, MetaKind::RefcountBlock);
            }
        }
        self.map.insert(
            self.header.header.snapshots_offset,
            self.snapshot_table_len,
            MetaKind::SnapshotTable,
        );
        let l1_off = self.header.l1_table_offset().0;
        let l1_size = self.header.l1_size();
        self.map.insert(l1_off, l1_size * 8, MetaKind::ActiveL1);
        self.check_l1(l1_off, l1_size, true).await?;

        if self.has_data_file && !self.snapshots.is_empty() {
            self.error(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
        }
        let snapshots = std::mem::take(&mut self.snapshots);
        for sn in &snapshots {
            if !self.geom.is_cluster_aligned(sn.l1_table_offset) {
                self.error(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot \
                     table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) * 8 > qcow2_format::l1::MAX_L1_SIZE_BYTES {
                self.error(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry \
                     corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.map.insert(
                sn.l1_table_offset,
                u64::from(sn.l1_size) * 8,
                MetaKind::InactiveL1,
            );
            self.check_l1(sn.l1_table_offset, u64::from(sn.l1_size), false)
                .await?;
        }
        self.snapshots = snapshots;
        let (snap_off, snap_len) = (self.header.header.snapshots_offset, self.snapshot_table_len);
        self.inc(snap_off, snap_len);
        self.map.insert(snap_off, snap_len, MetaKind::SnapshotTable);

        let (rt_off, rt_len) = (self.reftable_offset, self.reftable.len() as u64 * 8);
        self.inc(rt_off, rt_len);
        self.map.insert(rt_off, rt_len, MetaKind::RefcountTable);

        self.count_bitmaps().await?;
        self.check_refblocks();
        Ok(())
    }

    /// Bitmap directory, tables and data clusters (bitmaps extension in force only).
    async fn count_bitmaps(&mut self) -> super::Flow<()> {
        let io = self.meta_io();
        match crate::qcow2::bitmaps::bitmap_ranges(&io, &self.header).await {
            Ok(ranges) => {
                if let Some(&(off, len)) = ranges.first() {
                    self.map.insert(off, len, MetaKind::BitmapDirectory);
                }
                for (off, len) in ranges {
                    self.inc(off, len);
                }
                Ok(())
            }
            Err(e) => {
                self.check_error(format!("ERROR bitmaps: {e}"));
                Ok(())
            }
        }
    }

    /// QEMU's `check_refblocks`: each refcount table entry must be clean, aligned, inside the image,
    /// and its block used by nothing else.
    fn check_refblocks(&mut self) {
        let cs = self.cs();
        let bits = self.geom.cluster_bits;
        let fix = self.fix == Repair::All;
        let mut seen = std::collections::HashSet::new();
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            let off = raw & REFT_OFFSET_MASK;
            let cluster = off >> bits;
            if fix && off != 0 && !seen.insert(off) {
                // One block named twice: with 1-bit refcounts the second count overflows and QEMU's
                // "refcount block N refcount=2" check never sees it; a repair rebuilds all the same.
                self.rebuild = true;
            }
            if raw & REFT_RESERVED_MASK != 0 {
                self.error(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            if !self.geom.is_cluster_aligned(off) {
                self.error(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            if cluster >= self.file_clusters() {
                self.error(format!(
                    "{} refcount block {i} is outside image",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                // QEMU grows the file to hold the block; a rebuilt refcount structure serves as well.
                self.rebuild = true;
                continue;
            }
            if off != 0 {
                self.inc(off, cs);
                self.map.insert(off, cs, MetaKind::RefcountBlock);
                let n = self.refs.get(cluster);
                if n != 1 {
                    self.error(format!("ERROR refcount block {i} refcount={n}"));
                    self.rebuild = true;
                }
            }
        }
    }

    /// QEMU's `check_refcounts_l1`: the table, its L2 tables and what they reference. `active`: the
    /// image's current L1 table (fragmentation figures are taken from it; its L2 tables are registered
    /// for overlap checks).
    async fn check_l1(&mut self, l1_off: u64, l1_size: u64, active: bool) -> super::Flow<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = l1_size * 8;
        self.inc(l1_off, bytes);
        let Some(table) = self
            .read(l1_off, bytes, "ERROR: I/O error in check_refcounts_l1")
            .await
        else {
            return Err(super::PassAbort);
        };
        let cs = self.cs();
        let fix = self.fix == Repair::All;
        // Entries past the end of the file are zero (unused).
        for i in 0..table.len() / 8 {
            let e = be64(&table, i * 8);
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                let clean = e & !L1E_RESERVED_MASK;
                if fix && self.rewrite_l1_entry(l1_off, i, active, clean).await {
                    self.fixed_corruption(format!(
                        "Repairing L1 entry {i} of the L1 table at {l1_off:#x}: reserved bits cleared \
                         ({e:#x} is now {clean:#x})"
                    ));
                } else {
                    self.error(format!(
                        "ERROR found L1 entry with reserved bits set: {e:x}"
                    ));
                }
            }
            let l2 = e & L1E_OFFSET_MASK;
            let past_eof =
                u128::from(l2) + u128::from(cs) >= u128::from(self.file_len) + u128::from(cs);
            let unaligned = !self.geom.is_cluster_aligned(l2);
            // An "L2 table" on the header, an L1 table or the refcount structure: reading it as a
            // table would alias metadata as guest data, so a repair drops the entry.
            let on_metadata = self
                .map
                .check(l2, cs, None)
                .err()
                .filter(|h| h.kind != MetaKind::ActiveL2);
            if fix && (past_eof || unaligned || on_metadata.is_some()) {
                // QEMU leaves such an entry; its L2 table is garbage or zeros, so drop it: the guest
                // clusters it covered read as unallocated.
                if self.rewrite_l1_entry(l1_off, i, active, 0).await {
                    self.fixed_corruption(format!(
                        "Repairing L1 entry {i} of the L1 table at {l1_off:#x}: L2 table offset \
                         {l2:#x} is {}; entry dropped",
                        if unaligned {
                            "not cluster aligned".to_string()
                        } else if let Some(h) = on_metadata {
                            format!("on the {}", h.kind.name())
                        } else {
                            "past the end of the file".to_string()
                        }
                    ));
                    continue;
                }
            }
            self.inc(l2, cs);
            if unaligned {
                self.error(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            if active {
                self.map.insert(l2, cs, MetaKind::ActiveL2);
            }
            self.check_l2(l2, active).await?;
        }
        if self.need_sync && !self.sync().await {
            // The drops may not be durable: changing refcounts now could leave one too low.
            return Err(super::PassAbort);
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2` for the L2 table at `l2_off`.
    async fn check_l2(&mut self, l2_off: u64, active: bool) -> super::Flow<()> {
        let cs = self.cs();
        let esize = self.geom.l2_entry_size();
        let n = self.geom.l2_entries();
        let Some(table) = self
            .read(l2_off, n * esize, "ERROR: I/O error in check_refcounts_l2")
            .await
        else {
            return Err(super::PassAbort);
        };
        let ext = self.header.extended_l2();
        let fix = self.fix == Repair::All;
        let mut next_contiguous = 0u64;
        // Entries past the end of the file are zero (unallocated).
        for i in 0..table.len() as u64 / esize {
            let at = (i * esize) as usize;
            let mut entry = be64(&table, at);
            let mut bitmap = if ext { be64(&table, at + 8) } else { 0 };
            let entry_off = l2_off + i * esize;
            if fix {
                if let Some((e, b)) = fixed_entry(entry, bitmap, ext, self.has_data_file) {
                    // Bits QEMU reports but leaves: cleared so that the entry means what its valid
                    // bits say (reserved bits dropped; data wins over zero in a subcluster marked both;
                    // no subcluster allocated in an unallocated or compressed entry).
                    if self.rewrite_l2_entry(entry_off, l2_off, active, e, b).await {
                        self.fixed_corruption(format!(
                            "Repairing L2 entry at {entry_off:#x}: {entry:#x}/{bitmap:#x} has reserved \
                             or contradictory bits; now {e:#x}/{b:#x}"
                        ));
                        (entry, bitmap) = (e, b);
                    }
                }
            }
            let ty = raw_type(entry, ext, self.has_data_file);
            if ty != RawType::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.error(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
            }
            match ty {
                RawType::Compressed => {
                    if entry & L2E_COPIED != 0 {
                        let d = CompressedDescriptor::decode(entry, self.geom);
                        self.error(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed \
                             clusters",
                            d.host_offset
                        ));
                        // QEMU reports the entry without the flag from here on.
                        entry &= !L2E_COPIED;
                    }
                    if self.has_data_file {
                        self.error(format!(
                            "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.error(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, \
                             entry={entry:#x}"
                        ));
                        continue;
                    }
                    let (off, len) = CompressedDescriptor::decode(entry, self.geom).host_range();
                    if fix
                        && self.past_eof(off.0, len)
                        && self
                            .drop_l2_entry(entry_off, l2_off, active, "past the end of the file")
                            .await
                    {
                        continue;
                    }
                    self.inc(off.0, len);
                    if active {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        self.res.fragmented_clusters += 1;
                    }
                }
                RawType::ZeroAlloc | RawType::Normal => {
                    let off = entry & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.error(format!(
                            "ERROR offset={off:x}: Allocated cluster has corrupted subcluster \
                             allocation bitmap"
                        ));
                    }
                    if !self.geom.is_cluster_aligned(off) {
                        let contains_data = if ext {
                            bitmap & BITMAP_ALL_ALLOC != 0
                        } else {
                            entry & L2E_ZERO == 0
                        };
                        if !contains_data {
                            if fix {
                                // As QEMU: the entry becomes a plain zero cluster.
                                let new = if ext { 0 } else { L2E_ZERO };
                                if self
                                    .rewrite_l2_entry(entry_off, l2_off, active, new, bitmap)
                                    .await
                                {
                                    self.fixed_corruption(format!(
                                        "Repairing offset={off:x}: Preallocated cluster is not \
                                         properly aligned; L2 entry corrupted."
                                    ));
                                    continue;
                                }
                            } else {
                                self.error(format!(
                                    "ERROR offset={off:x}: Preallocated cluster is not properly \
                                     aligned; L2 entry corrupted."
                                ));
                            }
                        } else if fix {
                            if self
                                .drop_l2_entry(entry_off, l2_off, active, "not cluster aligned")
                                .await
                            {
                                continue;
                            }
                        } else {
                            self.error(format!(
                                "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry \
                                 corrupted."
                            ));
                        }
                    } else if fix
                        && !self.has_data_file
                        && self.past_eof(off, cs)
                        && self
                            .drop_l2_entry(entry_off, l2_off, active, "past the end of the file")
                            .await
                    {
                        continue;
                    }
                    if active {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = off.wrapping_add(cs);
                    }
                    if !self.has_data_file {
                        let max = self.order.max_refcount();
                        if fix
                            && self.allow_copies
                            && self.geom.is_cluster_aligned(off)
                            && self.refs.get(off / cs) >= max
                            && (self.copies.len() as u64 + 1) * cs
                                <= super::max_copy_bytes(self.file_len)
                        {
                            // One reference too many for the refcount width (with 1-bit refcounts, any
                            // second one): this entry gets a copy of the cluster of its own.
                            self.copies.push(Copy {
                                entry_off,
                                l2_off,
                                active,
                                entry,
                            });
                            continue;
                        }
                        self.inc(off, cs);
                    }
                }
                RawType::ZeroPlain => {}
                RawType::Unallocated => {
                    if bitmap & BITMAP_ALL_ALLOC != 0 {
                        self.error(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a reference to `[off, off + len)` would be refused as running past the end of the file.
    fn past_eof(&self, off: u64, len: u64) -> bool {
        u128::from(off) + u128::from(len) >= u128::from(self.file_len) + u128::from(self.cs())
    }

    /// Rewrites entry `i` of the L1 table at `l1_off` (the active one when `active`, whose in-memory
    /// copy follows) with `value`; synced before refcounts change. Returns whether it was written.
    async fn rewrite_l1_entry(&mut self, l1_off: u64, i: usize, active: bool, value: u64) -> bool {
        let kind = if active {
            MetaKind::ActiveL1
        } else {
            MetaKind::InactiveL1
        };
        let at = l1_off + i as u64 * 8;
        let data = value.to_be_bytes().to_vec();
        if !self
            .write(at, data, Some((kind, l1_off)), "repair L1 entry")
            .await
        {
            return false;
        }
        if active {
            if let Some(x) = self.l1.get_mut(i) {
                *x = value;
            }
        }
        self.need_sync = true;
        true
    }

    /// Rewrites the L2 entry at `entry_off` (and its bitmap with extended L2), synced. Returns whether
    /// it was written.
    async fn rewrite_l2_entry(
        &mut self,
        entry_off: u64,
        l2_off: u64,
        active: bool,
        entry: u64,
        bitmap: u64,
    ) -> bool {
        let mut bytes = entry.to_be_bytes().to_vec();
        if self.header.extended_l2() {
            bytes.extend_from_slice(&bitmap.to_be_bytes());
        }
        let own = active.then_some((MetaKind::ActiveL2, l2_off));
        if !self.write(entry_off, bytes, own, "repair L2 entry").await {
            return false;
        }
        self.need_sync = true;
        true
    }

    /// Drops the L2 entry at `entry_off` (the project's repair where QEMU has none): the entry (and an
    /// extended L2 bitmap) becomes zero, so the guest cluster reads as unallocated. Returns whether it
    /// was written. The caller syncs before refcounts are changed.
    async fn drop_l2_entry(
        &mut self,
        entry_off: u64,
        l2_off: u64,
        active: bool,
        why: &str,
    ) -> bool {
        let esize = self.geom.l2_entry_size() as usize;
        let own = active.then_some((MetaKind::ActiveL2, l2_off));
        if !self
            .write(entry_off, vec![0; esize], own, "drop L2 entry")
            .await
        {
            return false;
        }
        let index = (entry_off - l2_off) / self.geom.l2_entry_size();
        self.fixed_corruption(format!(
            "Repairing L2 entry {index} of the L2 table at {l2_off:#x}: its cluster is {why}; entry \
             dropped (the guest cluster now reads as unallocated)"
        ));
        self.need_sync = true;
        true
    }

    /// Gives each entry in `copies` a copy of its cluster, past everything the image uses: the copies
    /// are written and synced first, then the entries switched to them (COPIED set) and synced; then
    /// they are counted. A crash before the switch leaves unreferenced bytes past the old end of file.
    pub(super) async fn make_copies(&mut self) -> super::Flow<()> {
        let mut copies = std::mem::take(&mut self.copies);
        // An L2 table reachable twice (two L1 entries) lists its entries twice: one copy each.
        copies.sort_by_key(|c| c.entry_off);
        copies.dedup_by_key(|c| c.entry_off);
        if copies.is_empty() {
            return Ok(());
        }
        let cs = self.cs();
        let mut next = self.free_end().div_ceil(cs) * cs;
        let mut placed = Vec::with_capacity(copies.len());
        for c in &copies {
            let from = c.entry & L2E_OFFSET_MASK;
            let Some(data) = self
                .read(from, cs, "ERROR: Could not read a shared cluster")
                .await
            else {
                return Err(super::PassAbort);
            };
            if !self.write(next, data, None, "copy a shared cluster").await {
                return Err(super::PassAbort);
            }
            placed.push(next);
            next += cs;
        }
        if !self.sync().await {
            return Err(super::PassAbort);
        }
        self.file_len = self.file_len.max(next);
        for (c, &to) in copies.iter().zip(&placed) {
            // COPIED waits for the refcount of the copy to be durable (set by the COPIED pass).
            let new = (c.entry & !L2E_OFFSET_MASK & !L2E_COPIED) | to;
            let own = c.active.then_some((MetaKind::ActiveL2, c.l2_off));
            if !self
                .write(
                    c.entry_off,
                    new.to_be_bytes().to_vec(),
                    own,
                    "write L2 entry",
                )
                .await
            {
                return Err(super::PassAbort);
            }
            self.fixed_corruption(format!(
                "Repairing L2 entry at {:#x}: cluster {:#x} cannot take one more reference with \
                 {}-bit refcounts; the entry now has a copy at {to:#x}",
                c.entry_off,
                c.entry & L2E_OFFSET_MASK,
                self.order.refcount_bits()
            ));
            self.inc(to, cs);
        }
        if !self.sync().await {
            return Err(super::PassAbort);
        }
        Ok(())
    }
}
