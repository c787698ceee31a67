//! Rebuilding refcounts of a dirty lazy-refcounts image on a read-write open (QEMU's
//! `qcow2_check_refcounts` with `BDRV_FIX_ERRORS` on a dirty image).
//!
//! Spec: qcow2.txt, "Host cluster management", "Snapshots", "Bitmaps". What counts, as QEMU's
//! `calculate_refcounts`: the header cluster; the active L1 table, every L2 table it references and the
//! clusters their entries reference; the same for every snapshot's L1 table (an L2 table or data cluster
//! shared by k tables counts k times); the snapshot table; the refcount table and every refcount block;
//! with the bitmaps extension in force (autoclear bit 0), the bitmap directory, each bitmap table and
//! each bitmap data cluster. Data clusters of normal and allocated-zero entries count once; a compressed
//! entry counts once for every host cluster its byte range touches; with an external data file, data
//! clusters are not counted (they live in the other file). An encryption header is not counted (the
//! engine refuses encrypted images).
//!
//! The counts are kept in memory in the on-disk refcount block format (one buffer per refcount block),
//! so memory is the size of the image's refcount metadata. Then every existing block is rewritten with
//! the computed counts, blocks missing for referenced clusters are created (self-describing, growing
//! the table if needed, through the allocator), and the file is synced. Every write is overlap-checked
//! against the metadata found while counting.

use std::collections::BTreeMap;

use qcow2_format::error::FormatError;
use qcow2_format::header::AutoclearFeatures;
use qcow2_format::image_header::ImageHeader;
use qcow2_format::l1::{L1Entry, MAX_L1_SIZE_BYTES};
use qcow2_format::l2::{decode_l2_entry, raw_l2_entry, L2Entry};
use qcow2_format::refcount::{get_refcount, set_refcount, RefcountOrder, MAX_REFTABLE_SIZE_BYTES};
use qcow2_format::snapshot::{parse_snapshot_table, MAX_SNAPSHOTS_SIZE};
use qcow2_io::Backend;

use super::overlap::{MetaKind, OverlapMap};
use super::refcount::{sync, write_checked, MetaIo, Refcounts, MAX_HOST_END};
use crate::error::{Error, Result};

/// Largest bitmap table read (bytes): 8 Mi entries, far beyond what any real bitmap needs (a 64 KiB
/// granularity bitmap of 16 TiB has 256 Ki bits = 4 clusters' worth of table at 64 KiB clusters).
const MAX_BITMAP_TABLE_BYTES: u64 = 64 << 20;
/// Offset bits of a bitmap table entry (bits 9-55).
const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// First read size for the snapshot table.
const SNAPSHOT_FIRST_CHUNK: u64 = 64 * 1024;

/// Computed refcounts, in the refcount block format, by refcount table index.
struct Counts<'a> {
    /// The image name, for messages.
    name: &'a str,
    /// Refcount width (overflow is an error, as it would be for the allocator).
    order: RefcountOrder,
    /// log2 of the cluster size.
    cluster_bits: u32,
    /// Refcount entries per block.
    epb: u64,
    /// One buffer per refcount table index with any reference: the block as it must be on disk.
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl Counts<'_> {
    /// One reference to every cluster overlapping `[off, off + len)`.
    fn add_range(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off
            .checked_add(len)
            .filter(|&e| e <= MAX_HOST_END)
            .ok_or_else(|| {
                Error::corrupt(
                    self.name,
                    format!("a reference to {len} bytes at {off:#x} runs past 2^56"),
                )
            })?;
        for c in (off >> self.cluster_bits)..=((end - 1) >> self.cluster_bits) {
            self.add(c)?;
        }
        Ok(())
    }

    /// One reference to cluster `c`.
    fn add(&mut self, c: u64) -> Result<()> {
        let ti = c / self.epb;
        let idx = (c % self.epb) as usize; // < 2^24
        if ti >= MAX_REFTABLE_SIZE_BYTES / 8 {
            return Err(Error::corrupt(
                self.name,
                format!(
                    "a cluster at {:#x} is referenced, beyond what a refcount table of QEMU's maximum \
                     size ({MAX_REFTABLE_SIZE_BYTES} bytes) can describe",
                    c << self.cluster_bits
                ),
            ));
        }
        let cs = 1usize << self.cluster_bits;
        let block = self.blocks.entry(ti).or_insert_with(|| vec![0; cs]);
        let v = get_refcount(block, idx, self.order).map_err(Error::format(self.name))?;
        let max = self.order.max_refcount();
        if v >= max {
            return Err(Error::RefcountOverflow {
                path: self.name.to_owned(),
                offset: c << self.cluster_bits,
                max,
            });
        }
        set_refcount(block, idx, self.order, v + 1).map_err(Error::format(self.name))
    }
}

/// Reads `len` bytes at `off` (zeros past the end of the file).
async fn read<B: Backend>(
    io: &MetaIo<'_, B>,
    off: u64,
    len: u64,
    what: &'static str,
) -> Result<Vec<u8>> {
    let len = usize::try_from(len)
        .map_err(|_| Error::corrupt(io.name, format!("{what}: {len} bytes at {off:#x}")))?;
    let (res, buf) = io.file.read_at(crate::buf::io_buf(len), off).await;
    res.map_err(Error::io(io.name, what, off))?;
    Ok(buf.to_vec())
}

/// Counts one L1 table (`entries`), its L2 tables and their clusters. `active`: registers the L2
/// tables in `map` (QEMU's overlap set holds active L2 tables only).
async fn count_l1<B: Backend>(
    io: &MetaIo<'_, B>,
    counts: &mut Counts<'_>,
    map: &mut OverlapMap,
    entries: &[u64],
    what: &str,
    active: bool,
    has_data_file: bool,
) -> Result<()> {
    let geom = io.geom;
    let cs = geom.cluster_size();
    for (i, &raw) in entries.iter().enumerate() {
        let e = L1Entry::decode(raw, geom)
            .map_err(|e| Error::corrupt(io.name, format!("{what} entry {i} ({raw:#018x}): {e}")))?;
        let Some(l2) = e.l2_offset.map(|o| o.0) else {
            continue;
        };
        if l2 < cs {
            return Err(Error::corrupt(
                io.name,
                format!(
                    "{what} entry {i} points to an L2 table at {l2:#x}, inside the header cluster"
                ),
            ));
        }
        counts.add_range(l2, cs)?;
        if active {
            map.insert(l2, cs, MetaKind::ActiveL2);
        }
        let table = read(io, l2, cs, "read L2 table").await?;
        for j in 0..geom.l2_entries() as usize {
            let entry = raw_l2_entry(&table, j, geom)
                .and_then(|(raw, bm)| decode_l2_entry(raw, bm, geom, has_data_file))
                .map_err(|e| {
                    Error::corrupt(io.name, format!("L2 table at {l2:#x}, index {j}: {e}"))
                })?
                .0;
            match entry {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    preallocated: Some(host),
                    ..
                } => {
                    if !has_data_file {
                        counts.add_range(host.0, cs)?;
                    }
                }
                L2Entry::Compressed(desc) => {
                    let (off, len) = desc.host_range();
                    counts.add_range(off.0, len)?;
                }
                L2Entry::Zero {
                    preallocated: None, ..
                }
                | L2Entry::Unallocated => {}
            }
        }
    }
    Ok(())
}

/// Reads an L1 table of `l1_size` entries at `off`.
async fn read_l1<B: Backend>(io: &MetaIo<'_, B>, off: u64, l1_size: u64) -> Result<Vec<u64>> {
    let bytes = l1_size
        .checked_mul(8)
        .filter(|&b| b <= MAX_L1_SIZE_BYTES)
        .ok_or_else(|| {
            Error::corrupt(
                io.name,
                format!("L1 table of {l1_size} entries is too large"),
            )
        })?;
    let buf = read(io, off, bytes, "read snapshot L1 table").await?;
    Ok(qcow2_format::l1::parse_l1_table(&buf))
}

/// Counts the snapshot table and every snapshot's L1 table and what it references.
async fn count_snapshots<B: Backend>(
    io: &MetaIo<'_, B>,
    header: &ImageHeader,
    file_len: u64,
    counts: &mut Counts<'_>,
    map: &mut OverlapMap,
) -> Result<()> {
    let h = &header.header;
    if h.nb_snapshots == 0 {
        return Ok(());
    }
    let offset = h.snapshots_offset;
    let cap = MAX_SNAPSHOTS_SIZE.min(file_len.saturating_sub(offset));
    let mut size = SNAPSHOT_FIRST_CHUNK.min(cap);
    let (snapshots, table_len) = loop {
        let buf = read(io, offset, size, "read snapshot table").await?;
        match parse_snapshot_table(&buf, h.nb_snapshots) {
            Ok(r) => break r,
            Err(FormatError::Truncated { .. }) if size < cap => size = cap.min(size * 8),
            Err(e) => {
                return Err(Error::corrupt(
                    io.name,
                    format!("the snapshot table at {offset:#x}: {e}"),
                ))
            }
        }
    };
    let table_len = table_len as u64;
    counts.add_range(offset, table_len)?;
    map.insert(offset, table_len, MetaKind::SnapshotTable);
    let cs = io.geom.cluster_size();
    for sn in &snapshots {
        let off = sn.l1_table_offset;
        let l1_size = u64::from(sn.l1_size);
        if !io.geom.is_cluster_aligned(off) || (off < cs && l1_size > 0) {
            return Err(Error::corrupt(
                io.name,
                format!(
                    "snapshot {} ({}): L1 table offset {off:#x} is not cluster aligned or inside the \
                     header cluster",
                    sn.id, sn.name
                ),
            ));
        }
        let l1 = read_l1(io, off, l1_size).await?;
        counts.add_range(off, l1_size * 8)?;
        map.insert(off, l1_size * 8, MetaKind::InactiveL1);
        let what = format!("L1 table of snapshot {}", sn.id);
        count_l1(io, counts, map, &l1, &what, false, header.has_data_file()).await?;
    }
    Ok(())
}

/// Counts the bitmap directory, every bitmap table and every bitmap data cluster.
async fn count_bitmaps<B: Backend>(
    io: &MetaIo<'_, B>,
    header: &ImageHeader,
    counts: &mut Counts<'_>,
    map: &mut OverlapMap,
) -> Result<()> {
    let Some((off, size)) = bitmap_directory(header) else {
        return Ok(());
    };
    map.insert(off, size, MetaKind::BitmapDirectory);
    for (o, l) in bitmap_ranges(io, header).await? {
        counts.add_range(o, l)?;
    }
    Ok(())
}

/// The bitmap directory `(offset, size)` when the bitmaps extension is in force (autoclear bit 0 set:
/// QEMU ignores the extension otherwise).
fn bitmap_directory(header: &ImageHeader) -> Option<(u64, u64)> {
    if !header.header.autoclear.contains(AutoclearFeatures::BITMAPS) {
        return None;
    }
    header.bitmaps().map(|(_, size, off)| (off, size))
}

/// Every host range holding persistent-bitmap data, each a reference: the bitmap directory, each
/// bitmap table, each bitmap data cluster. Empty when the bitmaps extension is not in force.
///
/// A caller that clears autoclear bit 0 (the engine does not maintain bitmaps) can drop these
/// references ([`Refcounts::defer_decrement`] for each range) so that the clusters are freed rather
/// than leaked: once the bit is clear, QEMU ignores the extension and counts none of them.
pub(crate) async fn bitmap_ranges<B: Backend>(
    io: &MetaIo<'_, B>,
    header: &ImageHeader,
) -> Result<Vec<(u64, u64)>> {
    let Some((off, size)) = bitmap_directory(header) else {
        return Ok(Vec::new());
    };
    let nb = header.bitmaps().map_or(0, |(nb, _, _)| nb);
    let cs = io.geom.cluster_size();
    let mut out = vec![(off, size)];
    // The format crate bounds the directory size to QEMU's 64 MiB limit.
    let dir = read(io, off, size, "read bitmap directory").await?;
    let corrupt = |pos: usize| {
        Error::corrupt(
            io.name,
            format!("bitmap directory at {off:#x}: entry at byte {pos} runs past its end ({size} bytes)"),
        )
    };
    let field = |pos: usize, at: usize, n: usize| -> Result<u64> {
        let from = pos.saturating_add(at);
        let s = dir
            .get(from..from.saturating_add(n))
            .ok_or_else(|| corrupt(pos))?;
        Ok(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    };
    let mut pos = 0usize;
    for _ in 0..nb {
        let table_off = field(pos, 0, 8)?;
        let table_size = field(pos, 8, 4)?;
        let name_size = field(pos, 18, 2)? as usize;
        let extra = field(pos, 20, 4)? as usize;
        let entry_len = (24 + extra + name_size).div_ceil(8) * 8;
        let table_bytes = table_size * 8;
        if table_bytes > MAX_BITMAP_TABLE_BYTES || !io.geom.is_cluster_aligned(table_off) {
            return Err(Error::corrupt(
                io.name,
                format!(
                    "bitmap directory at {off:#x}: bitmap table at {table_off:#x} of {table_size} \
                     entries is unaligned or larger than {MAX_BITMAP_TABLE_BYTES} bytes"
                ),
            ));
        }
        if table_bytes > 0 {
            out.push((table_off, table_bytes));
        }
        let table = read(io, table_off, table_bytes, "read bitmap table").await?;
        for e in qcow2_format::l1::parse_l1_table(&table) {
            let data = e & BME_TABLE_ENTRY_OFFSET_MASK;
            if data != 0 {
                out.push((data, cs));
            }
        }
        pos = pos.saturating_add(entry_len);
    }
    Ok(out)
}

/// Recounts every reference (header, L1 tables active and of snapshots, L2 tables, data and compressed
/// clusters, refcount table and blocks, snapshot table, bitmap directory) and rewrites the refcount
/// blocks on disk to match (leaks and too-low counts both corrected), then fdatasyncs. The caller then
/// clears the dirty bit. `l1` is the active L1 table.
///
/// When the rebuild had to create refcount blocks or move the refcount table (only for images whose
/// refcount structures do not cover every referenced cluster), the caller's header copy and file length
/// are stale afterwards: [`rebuild_and_load`] returns the loaded refcount state instead.
pub(crate) async fn rebuild_refcounts<B: Backend>(
    io: &MetaIo<'_, B>,
    header: &ImageHeader,
    l1: &[u64],
    file_len: u64,
) -> Result<()> {
    rebuild_and_load(io, header, l1, file_len).await.map(drop)
}

/// [`rebuild_refcounts`], returning the refcount state as [`Refcounts::load`] would load it afterwards
/// (the table possibly moved: see [`Refcounts::table_offset`]; blocks possibly past `file_len`), so that
/// the caller need not reload with a stale header or file length.
pub(crate) async fn rebuild_and_load<B: Backend>(
    io: &MetaIo<'_, B>,
    header: &ImageHeader,
    l1: &[u64],
    file_len: u64,
) -> Result<Refcounts> {
    let geom = io.geom;
    let cs = geom.cluster_size();
    let order = header.refcount_order();
    let mut counts = Counts {
        name: io.name,
        order,
        cluster_bits: geom.cluster_bits,
        epb: order.entries_per_block(geom.cluster_bits),
        blocks: BTreeMap::new(),
    };
    let mut map = OverlapMap::new();

    counts.add_range(0, cs)?;
    map.insert(0, cs, MetaKind::Header);
    let l1_off = header.l1_table_offset().0;
    let l1_bytes = header.l1_table_bytes();
    counts.add_range(l1_off, l1_bytes)?;
    map.insert(l1_off, l1_bytes, MetaKind::ActiveL1);
    count_l1(
        io,
        &mut counts,
        &mut map,
        l1,
        "active L1 table",
        true,
        header.has_data_file(),
    )
    .await?;
    count_snapshots(io, header, file_len, &mut counts, &mut map).await?;
    count_bitmaps(io, header, &mut counts, &mut map).await?;

    let mut refcounts = Refcounts::load(io, header, file_len).await?;
    counts.add_range(refcounts.table_offset(), refcounts.table_clusters() * cs)?;
    for ti in 0..refcounts.table_len() {
        if let Some(off) = refcounts.block_at(ti) {
            counts.add_range(off, cs)?;
        }
    }
    refcounts.register_metadata(&mut map);

    // Existing blocks get the computed counts (zeros where nothing is referenced).
    let mut blocks = counts.blocks;
    for ti in 0..refcounts.table_len() {
        if let Some(off) = refcounts.block_at(ti) {
            let data = blocks.remove(&ti).unwrap_or_else(|| vec![0; cs as usize]);
            write_checked(
                io,
                &map,
                off,
                data,
                Some((MetaKind::RefcountBlock, off)),
                "write rebuilt refcount block",
            )
            .await?;
        }
    }
    // Referenced clusters without a block: create the blocks (synced as they are made).
    refcounts.set_phantom(blocks.into_iter().collect());
    for ti in refcounts.phantom_indices() {
        refcounts.ensure_block(io, &mut map, ti, None).await?;
    }
    refcounts.write_back(io, &map).await?;
    sync(io).await?;
    Ok(refcounts)
}

#[cfg(test)]
mod tests {
    //! Rebuilds checked by `qemu-img check`: images written by qemu-io with lazy refcounts and left
    //! dirty (`abort`), whose refcount blocks are then damaged on purpose (zeroed, saturated, or cut off
    //! from the table), so that only a correct recount makes qemu-img check clean again.

    use std::path::Path;

    use qcow2_io::{Backend, MemoryBackend};
    use qcow2_testkit::{path_str, qemu_img, qemu_img_raw, run, skip_without_qemu, temp_dir};

    use super::*;

    /// How the refcount blocks are damaged before the rebuild.
    #[derive(Clone, Copy, Debug)]
    enum Damage {
        /// Every refcount 0.
        Zero,
        /// Every byte 0xff (every refcount at its maximum).
        Saturate,
        /// Refcount table entries after the first cleared (blocks orphaned, counts missing).
        Orphan,
        /// The refcount table cut to its first cluster in the header (the rebuild must grow it again).
        Truncate,
    }

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// `qemu-img check IMG`: (exit code, output).
    fn check(dir: &Path, img: &str) -> (i32, String) {
        let out = run(dir, "qemu-img", &["check", img]);
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Creates an image with `opts`, runs the qemu-img commands `pre` on it, writes `before` with
    /// qemu-io, takes a snapshot if asked, writes `dirty` and aborts; damages the refcounts, rebuilds,
    /// and checks with qemu-img.
    #[allow(clippy::too_many_arguments)]
    async fn case(
        opts: &str,
        size: &str,
        pre: &[&[&str]],
        before: &[&str],
        snapshot: bool,
        dirty: &[&str],
        damage: Damage,
    ) {
        let dir = temp_dir();
        let d = dir.path();
        qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", size],
        );
        for cmd in pre {
            qemu_img(d, cmd);
        }
        let io_cmds = |cmds: &[&str], abort: bool| {
            let mut args = vec!["-f", "qcow2"];
            for c in cmds {
                args.extend(["-c", c]);
            }
            if abort {
                args.extend(["-c", "abort"]);
            }
            args.push("img.qcow2");
            let out = run(d, "qemu-io", &args);
            assert!(
                abort || out.status.success(),
                "qemu-io {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        io_cmds(before, false);
        if snapshot {
            qemu_img(d, &["snapshot", "-c", "s1", "img.qcow2"]);
        }
        io_cmds(dirty, true);
        let path = d.join("img.qcow2");
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes[79] & 1,
            1,
            "{opts}: qemu-io abort did not leave the image dirty"
        );
        let guest_before = qemu_img_raw(d, "img.qcow2", Some("qcow2"));

        // Damage the refcount blocks.
        let cs = 1usize << u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        let rt = be64(&bytes, 48) as usize;
        let rt_len = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize * cs;
        for i in 0..rt_len / 8 {
            let block = be64(&bytes, rt + 8 * i) as usize;
            if block == 0 {
                continue;
            }
            match damage {
                Damage::Zero => bytes[block..block + cs].fill(0),
                Damage::Saturate => bytes[block..block + cs].fill(0xff),
                Damage::Orphan if i > 0 => bytes[rt + 8 * i..rt + 8 * i + 8].fill(0),
                Damage::Orphan | Damage::Truncate => {}
            }
        }
        if let Damage::Truncate = damage {
            assert!(
                rt_len > cs,
                "{opts}: qemu-img did not grow the refcount table"
            );
            bytes[56..60].copy_from_slice(&1u32.to_be_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let (code, text) = check(d, "img.qcow2");
        assert_ne!(code, 0, "{opts} {damage:?}: damage went unnoticed:\n{text}");

        // Rebuild on an in-memory copy.
        let len = bytes.len() as u64;
        let file = MemoryBackend::from_vec(bytes);
        let header = crate::qcow2::read_image_header(&file, "img.qcow2", len)
            .await
            .unwrap();
        let contents = file.contents();
        let l1_off = header.l1_table_offset().0 as usize;
        let l1 = qcow2_format::l1::parse_l1_table(
            &contents[l1_off..l1_off + header.l1_table_bytes() as usize],
        );
        let io = MetaIo {
            file: &file,
            name: "img.qcow2",
            geom: header.geometry(),
        };
        let mut rc = rebuild_and_load(&io, &header, &l1, len).await.unwrap();
        // The returned state matches the header on disk and allocates past everything in use.
        let now = file.contents();
        assert_eq!(be64(&now, 48), rc.table_offset(), "{opts} {damage:?}");
        let mut map = OverlapMap::new();
        rc.register_metadata(&mut map);
        let a = rc.alloc(&io, &mut map, 1).await.unwrap();
        assert_eq!(rc.get(&io, a.offset).await.unwrap(), 1);
        rc.defer_decrement(a.offset, 1);
        rc.apply_deferred(&io, &|_| false).await.unwrap();
        rc.write_back(&io, &map).await.unwrap();
        // What the caller does next: clear the dirty bit.
        let mut incompat = contents[72..80].to_vec();
        incompat[7] &= !1;
        file.write_at(incompat.into(), 72).await.unwrap();
        std::fs::write(&path, file.contents()).unwrap();

        let (code, text) = check(d, "img.qcow2");
        match damage {
            // Orphaned blocks are leaks (some may have been reused for the new blocks).
            Damage::Orphan | Damage::Truncate => assert!(
                (code == 0 || code == 3) && !text.contains("ERROR"),
                "{opts} {damage:?}:\n{text}"
            ),
            _ => assert_eq!(code, 0, "{opts} {damage:?}:\n{text}"),
        }
        assert!(
            qemu_img_raw(d, "img.qcow2", Some("qcow2")) == guest_before,
            "{opts} {damage:?}: guest data changed"
        );
        let _ = path_str(&path);
        if let Damage::Truncate = damage {
            let after = std::fs::read(&path).unwrap();
            assert_ne!(
                be64(&after, 48) as usize,
                rt,
                "{opts}: the table did not move"
            );
        }
    }

    #[tokio::test]
    async fn rebuild_after_crash_with_snapshot_compressed_and_zero_clusters() {
        skip_without_qemu!();
        let before = [
            "write -P 1 0 300k",
            "write -c -P 2 1M 64k",
            "write -P 3 2M 64k",
            "write -z 2M 8k",
        ];
        let dirty = [
            "write -P 4 100k 50k",
            "write -c -P 5 1M 16k",
            "write -P 6 6M 200k",
            "discard 2060k 8k",
        ];
        for damage in [Damage::Zero, Damage::Saturate] {
            case(
                "lazy_refcounts=on,cluster_size=4096",
                "16M",
                &[],
                &before,
                true,
                &dirty,
                damage,
            )
            .await;
        }
        case(
            "lazy_refcounts=on,extended_l2=on",
            "64M",
            &[],
            &before,
            true,
            &dirty,
            Damage::Zero,
        )
        .await;
    }

    /// A persistent bitmap: its directory, table and data clusters count (autoclear bit 0 is set).
    #[tokio::test]
    async fn rebuild_counts_bitmaps() {
        skip_without_qemu!();
        case(
            "lazy_refcounts=on,cluster_size=4096",
            "64M",
            &[&["bitmap", "--add", "img.qcow2", "bm0"]],
            &["write -P 1 0 1M"],
            false,
            &["write -P 2 2M 1M"],
            Damage::Zero,
        )
        .await;
    }

    /// Dropping the bitmap references when clearing autoclear bit 0 leaves neither leaks nor errors.
    #[tokio::test]
    async fn bitmap_references_can_be_dropped_with_the_autoclear_bit() {
        skip_without_qemu!();
        let dir = temp_dir();
        let d = dir.path();
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "img.qcow2",
                "64M",
            ],
        );
        qemu_img(d, &["bitmap", "--add", "img.qcow2", "bm0"]);
        let out = run(
            d,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 1 0 3M", "img.qcow2"],
        );
        assert!(out.status.success());
        let path = d.join("img.qcow2");
        let bytes = std::fs::read(&path).unwrap();
        let len = bytes.len() as u64;
        let file = MemoryBackend::from_vec(bytes);
        let header = crate::qcow2::read_image_header(&file, "img.qcow2", len)
            .await
            .unwrap();
        let io = MetaIo {
            file: &file,
            name: "img.qcow2",
            geom: header.geometry(),
        };
        let ranges = bitmap_ranges(&io, &header).await.unwrap();
        // Directory, table, and data clusters.
        assert!(ranges.len() >= 3, "{ranges:?}");
        let mut rc = Refcounts::load(&io, &header, len).await.unwrap();
        let mut map = OverlapMap::new();
        rc.register_metadata(&mut map);
        for &(o, l) in &ranges {
            rc.defer_decrement(o, l);
        }
        // The caller clears the bit (durably) before the references are dropped.
        let mut autoclear = file.contents()[88..96].to_vec();
        autoclear[7] &= !1;
        file.write_at(autoclear.into(), 88).await.unwrap();
        let freed = rc.apply_deferred(&io, &|_| false).await.unwrap();
        assert!(!freed.is_empty());
        rc.write_back(&io, &map).await.unwrap();
        std::fs::write(&path, file.contents()).unwrap();
        let (code, text) = check(d, "img.qcow2");
        assert_eq!(code, 0, "{text}");
    }

    #[tokio::test]
    async fn rebuild_with_many_blocks_and_wide_or_narrow_refcounts() {
        skip_without_qemu!();
        let before = ["write -P 1 0 700k"];
        let dirty = ["write -P 2 300k 1200k", "write -c -P 3 3M 4k"];
        case(
            "lazy_refcounts=on,cluster_size=512,refcount_bits=64",
            "8M",
            &[],
            &before,
            false,
            &dirty,
            Damage::Saturate,
        )
        .await;
        case(
            "lazy_refcounts=on,cluster_size=512,refcount_bits=2",
            "8M",
            &[],
            &before,
            true,
            &dirty,
            Damage::Zero,
        )
        .await;
    }

    #[tokio::test]
    async fn rebuild_creates_missing_blocks() {
        skip_without_qemu!();
        let before = ["write -P 1 0 700k"];
        let dirty = ["write -P 2 300k 1200k"];
        case(
            "lazy_refcounts=on,cluster_size=512",
            "8M",
            &[],
            &before,
            false,
            &dirty,
            Damage::Orphan,
        )
        .await;
        // 64 entries of 64 refcounts of 512-byte clusters describe 2 MiB: 3 MiB of data made qemu-img
        // grow the table, which is cut back here.
        case(
            "lazy_refcounts=on,cluster_size=512,refcount_bits=64",
            "8M",
            &[],
            &["write -P 1 0 1M"],
            false,
            &["write -P 2 1M 2M"],
            Damage::Truncate,
        )
        .await;
    }
}
