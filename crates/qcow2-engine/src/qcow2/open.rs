//! Opening a qcow2 layer: reading and validating the header cluster, loading the L1 table and sizing
//! the L2 slice cache.
//!
//! Spec: qcow2.txt, "Header" and "Header extensions"; limits as QEMU's `qcow2_do_open` (checked by the
//! format crate). The L1 table is at most 32 MiB (format crate limit), so loading it is bounded.

use std::sync::atomic::AtomicU64;

use bytes::BytesMut;
use qcow2_format::header::HEADER_MIN_READ;
use qcow2_format::image_header::ImageHeader;
use qcow2_io::Backend;
use tokio::sync::Mutex;

use super::{DataFile, Metadata, Qcow2Layer};
use crate::cache::LruCache;
use crate::error::{Error, Result};

/// QEMU's default maximum L2 cache size on Linux (`DEFAULT_L2_CACHE_MAX_SIZE`).
pub(crate) const DEFAULT_L2_CACHE_MAX: u64 = 32 * 1024 * 1024;
/// Slice size used when the cache cannot hold every L2 table of the image.
const SMALL_SLICE: u64 = 4096;

/// Reads `len` bytes at `offset` (zeros past the end of file).
async fn read_bytes<B: Backend>(
    file: &B,
    path: &str,
    what: &'static str,
    offset: u64,
    len: usize,
) -> Result<BytesMut> {
    let (res, buf) = file.read_at(crate::buf::io_buf(len), offset).await;
    res.map_err(Error::io(path, what, offset))?;
    Ok(buf)
}

/// Reads and validates the header cluster of the qcow2 image `file`, whose length is `file_len`.
pub(crate) async fn read_image_header<B: Backend>(
    file: &B,
    path: &str,
    file_len: u64,
) -> Result<ImageHeader> {
    let first_len =
        usize::try_from(file_len.min(HEADER_MIN_READ as u64)).unwrap_or(HEADER_MIN_READ);
    let first = read_bytes(file, path, "read header", 0, first_len).await?;
    // cluster_bits is the big-endian u32 at byte 20; when it is out of range or the file too short,
    // let the format crate produce the precise error from what we have.
    let cluster_bits = first
        .get(20..24)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .filter(|b| (9..=21).contains(b));
    let cluster0 = match cluster_bits {
        Some(bits) => {
            let len = (1u64 << bits).min(file_len) as usize; // <= 2 MiB
            read_bytes(file, path, "read header cluster", 0, len).await?
        }
        None => first,
    };
    ImageHeader::parse(&cluster0).map_err(Error::format(path))
}

impl<B: Backend> Qcow2Layer<B> {
    /// Builds the layer: loads the L1 table and sets up the L2 cache (`l2_cache_bytes`: `None` = cover
    /// the whole image up to 32 MiB).
    pub(crate) async fn new(
        name: String,
        file: B,
        file_len: u64,
        header: ImageHeader,
        data_file: Option<DataFile<B>>,
        l2_cache_bytes: Option<u64>,
    ) -> Result<Self> {
        let geom = header.geometry();
        let cs = geom.cluster_size();
        let h = &header.header;
        // QEMU counts whole sectors of a qcow2 image (`total_sectors = size / 512`): a header size that
        // is not a multiple of 512 is rounded down (qemu-img create rounds up before writing it).
        let virtual_size = h.size & !511;
        // The format crate bounds the L1 table to 32 MiB, so this fits in memory and in usize.
        let l1_bytes = u64::from(h.l1_size)
            .checked_mul(8)
            .filter(|&n| n <= 32 * 1024 * 1024)
            .ok_or_else(|| {
                Error::corrupt(
                    &name,
                    format!("L1 table of {} entries is too large", h.l1_size),
                )
            })?;
        let l1_raw = read_bytes(
            &file,
            &name,
            "read L1 table",
            h.l1_table_offset,
            l1_bytes as usize,
        )
        .await?;
        let l1: Vec<u64> = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();

        // Cache sizing as QEMU's read_cache_sizes: enough L2 entries to map the whole disk, capped.
        let clusters = virtual_size.div_ceil(cs);
        let whole = clusters
            .saturating_mul(geom.l2_entry_size())
            .div_ceil(cs)
            .saturating_mul(cs)
            .max(cs);
        let cache_bytes = l2_cache_bytes.unwrap_or(whole.min(DEFAULT_L2_CACHE_MAX));
        // Whole-table entries when the cache covers the image, else 4 KiB slices (less read
        // amplification per miss when the cache must evict).
        let slice_bytes = if cache_bytes >= whole {
            cs
        } else {
            SMALL_SLICE.min(cs)
        };
        let capacity = usize::try_from((cache_bytes / slice_bytes).max(2)).unwrap_or(usize::MAX);

        Ok(Qcow2Layer {
            name,
            file,
            data_file,
            geom,
            virtual_size,
            file_len: AtomicU64::new(file_len),
            slice_bytes,
            header,
            meta: Mutex::new(Metadata {
                l1,
                l2: LruCache::new(capacity),
                metadata_prealloc: None,
                w: None,
            }),
            shared: None,
        })
    }
}
