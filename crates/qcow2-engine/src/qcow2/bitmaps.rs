//! Persistent bitmaps, as far as the engine needs them: where their clusters are, so that the
//! consistency check counts them and a read-write open (which clears the "bitmaps consistent"
//! autoclear bit, since writes do not maintain bitmaps) can release them.
//!
//! Spec: qcow2.txt, "Bitmaps" (the bitmaps header extension, the bitmap directory, bitmap tables).

use qcow2_format::header::AutoclearFeatures;
use qcow2_format::image_header::ImageHeader;
use qcow2_io::Backend;

use super::refcount::MetaIo;
use crate::error::{Error, Result};

/// Largest bitmap table read (bytes): 8 Mi entries, far beyond what any real bitmap needs (a 64 KiB
/// granularity bitmap of 16 TiB has 256 Ki bits = 4 clusters' worth of table at 64 KiB clusters).
const MAX_BITMAP_TABLE_BYTES: u64 = 64 << 20;
/// Offset bits of a bitmap table entry (bits 9-55).
const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

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
