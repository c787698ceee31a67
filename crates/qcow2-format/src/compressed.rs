//! Compressed clusters (spec: `docs/interop/qcow2.txt`, "Compressed Clusters Descriptor", and
//! the "Compression type" header field).
//!
//! In a compressed L2 entry (bit 62 set), with `x = 62 - (cluster_bits - 8)`, bits `0..x` hold
//! the host byte offset of the compressed data and bits `x..62` the number of additional
//! 512-byte sectors. The data may start anywhere inside a sector; its length is
//! `nb_sectors * 512 - (offset & 511)`, which may run past the end of the file or into the next
//! compressed cluster's bytes: decompression stops once one whole cluster has been produced.
//!
//! zlib clusters are raw deflate streams (no zlib header). zstd clusters are one or more bare
//! zstd frames (no size prefix).

use crate::error::{FormatError, Result};
use crate::header::CompressionType;
use crate::types::{Geometry, HostOffset};

/// Sector size that compressed lengths are counted in.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;
/// Largest zstd window (log2) accepted when decompressing: bounds decoder memory while
/// covering every frame that compresses at most one 2 MiB cluster.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// The descriptor of a compressed cluster, decoded from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedDescriptor {
    /// Host byte offset where the compressed data starts (not necessarily aligned).
    pub host_offset: u64,
    /// Number of 512-byte sectors the data touches (the field value + 1).
    pub nb_sectors: u64,
}

/// Bit position of the sector count in a compressed L2 entry (QEMU's `csize_shift`).
pub fn csize_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits.clamp(9, 21) - 8)
}

/// Mask of the sector count field after shifting (QEMU's `csize_mask`).
pub fn csize_mask(cluster_bits: u32) -> u64 {
    (1u64 << (cluster_bits.clamp(9, 21) - 8)) - 1
}

/// Mask of the host offset in a compressed L2 entry (QEMU's `cluster_offset_mask`).
pub fn offset_mask(cluster_bits: u32) -> u64 {
    (1u64 << csize_shift(cluster_bits)) - 1
}

impl CompressedDescriptor {
    /// Decodes the descriptor from a raw L2 entry (flag bits 62 and 63 are ignored).
    pub fn decode(raw: u64, geom: Geometry) -> CompressedDescriptor {
        let cb = geom.cluster_bits;
        CompressedDescriptor {
            host_offset: raw & offset_mask(cb),
            nb_sectors: ((raw >> csize_shift(cb)) & csize_mask(cb)) + 1,
        }
    }

    /// Encodes the descriptor into a raw L2 entry, including the compressed flag (bit 62).
    ///
    /// Errors when the offset or the sector count does not fit the fields for this cluster
    /// size.
    pub fn encode(&self, geom: Geometry) -> Result<u64> {
        let cb = geom.cluster_bits;
        if self.host_offset & !offset_mask(cb) != 0 {
            return Err(FormatError::Serialize {
                what: "compressed cluster descriptor",
                detail: format!(
                    "host offset {:#x} does not fit {} bits",
                    self.host_offset,
                    csize_shift(cb)
                ),
            });
        }
        if self.nb_sectors == 0 || self.nb_sectors - 1 > csize_mask(cb) {
            return Err(FormatError::Serialize {
                what: "compressed cluster descriptor",
                detail: format!(
                    "sector count {} outside 1..={}",
                    self.nb_sectors,
                    csize_mask(cb) + 1
                ),
            });
        }
        Ok(crate::l2::L2E_COMPRESSED
            | ((self.nb_sectors - 1) << csize_shift(cb))
            | self.host_offset)
    }

    /// Builds the descriptor for `len` bytes of compressed data stored at `host_offset`.
    pub fn for_data(host_offset: u64, len: u64, geom: Geometry) -> Result<CompressedDescriptor> {
        let end = host_offset.checked_add(len).ok_or(FormatError::Serialize {
            what: "compressed cluster descriptor",
            detail: "offset + length overflows".into(),
        })?;
        let first = host_offset / COMPRESSED_SECTOR_SIZE;
        let last = end.div_ceil(COMPRESSED_SECTOR_SIZE);
        let d = CompressedDescriptor {
            host_offset,
            nb_sectors: (last - first).max(1),
        };
        d.encode(geom)?;
        Ok(d)
    }

    /// The host byte range to read: `(offset, len)` with
    /// `len = nb_sectors * 512 - (offset & 511)` (QEMU's `csize`).
    pub fn host_range(&self) -> (HostOffset, u64) {
        // nb_sectors <= 2^13 so the product cannot overflow; offset & 511 < 512 <= product.
        let len = self.nb_sectors.saturating_mul(COMPRESSED_SECTOR_SIZE)
            - (self.host_offset & (COMPRESSED_SECTOR_SIZE - 1));
        (HostOffset(self.host_offset), len)
    }

    /// The host cluster (aligned offset) holding the first compressed byte.
    pub fn first_host_cluster(&self, geom: Geometry) -> HostOffset {
        HostOffset(self.host_offset & !(geom.cluster_size() - 1))
    }
}

/// Decompresses `input` until `out` is full.
///
/// zlib: a raw deflate stream; `out` must fill completely (QEMU accepts a stream that ends
/// exactly there or that still has data after it). zstd: bare frames, possibly several; the
/// frame that fills `out` must end there (as QEMU checks). Input left over after `out` is full
/// is ignored. Never allocates by a size taken from the data (the zstd window is bounded by
/// [`ZSTD_WINDOW_LOG_MAX`]).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let err = |detail: String| FormatError::Decompression {
        algorithm: "zlib",
        detail,
    };
    let mut d = Decompress::new(false);
    loop {
        let in_pos = usize::try_from(d.total_in()).unwrap_or(usize::MAX);
        let out_pos = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
        if out_pos >= out.len() {
            return Ok(());
        }
        let (Some(inp), Some(outp)) = (input.get(in_pos..), out.get_mut(out_pos..)) else {
            return Err(err("internal position out of range".into()));
        };
        let status = d
            .decompress(inp, outp, FlushDecompress::Finish)
            .map_err(|e| err(e.to_string()))?;
        let produced = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
        let consumed = usize::try_from(d.total_in()).unwrap_or(usize::MAX);
        if produced >= out.len() {
            return Ok(());
        }
        match status {
            Status::StreamEnd => {
                return Err(err(format!(
                    "stream ended after {produced} of {} bytes",
                    out.len()
                )))
            }
            Status::Ok | Status::BufError => {
                if produced == out_pos && consumed == in_pos {
                    return Err(err(format!(
                        "input exhausted after {produced} of {} bytes",
                        out.len()
                    )));
                }
            }
        }
    }
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let err = |detail: String| FormatError::Decompression {
        algorithm: "zstd",
        detail,
    };
    let mut dec = Decoder::new().map_err(|e| err(e.to_string()))?;
    dec.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(|e| err(e.to_string()))?;
    let total = out.len();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    let mut last_hint = 0usize;
    while outb.pos() < total {
        let (in_before, out_before) = (inb.pos(), outb.pos());
        last_hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| err(e.to_string()))?;
        if inb.pos() <= in_before && outb.pos() <= out_before {
            return Err(err(format!(
                "input exhausted after {} of {total} bytes",
                outb.pos()
            )));
        }
    }
    if last_hint != 0 {
        return Err(err(
            "the frame continues beyond the end of the cluster".into()
        ));
    }
    Ok(())
}

/// Compresses one cluster of data the way QEMU does (zlib: raw deflate with a 4 KiB window,
/// which QEMU's decompressor requires; zstd: one frame with the content size).
///
/// Returns `Ok(None)` when the result would not be smaller than `max_len` bytes (QEMU then
/// stores the cluster uncompressed).
pub fn compress(kind: CompressionType, input: &[u8], max_len: usize) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Zlib => {
            use flate2::{Compress, Compression, FlushCompress, Status};
            // QEMU inflates with a 4 KiB window (windowBits -12): a stream must not use more.
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            // Deflate never expands by more than a few bytes per 16 KiB block, so this bound
            // keeps the buffer sized by the input rather than by the caller's limit.
            let cap = max_len.min(
                input
                    .len()
                    .saturating_add(input.len() / 8)
                    .saturating_add(1024),
            );
            let mut out = vec![0u8; cap];
            let status = c
                .compress(input, &mut out, FlushCompress::Finish)
                .map_err(|e| FormatError::Compression {
                    algorithm: "zlib",
                    detail: e.to_string(),
                })?;
            if status != Status::StreamEnd {
                return Ok(None);
            }
            let n = usize::try_from(c.total_out()).unwrap_or(usize::MAX);
            out.truncate(n);
            out
        }
        CompressionType::Zstd => {
            let out =
                zstd::bulk::compress(input, zstd::DEFAULT_COMPRESSION_LEVEL).map_err(|e| {
                    FormatError::Compression {
                        algorithm: "zstd",
                        detail: e.to_string(),
                    }
                })?;
            if out.len() >= max_len {
                return Ok(None);
            }
            out
        }
    };
    if out.len() >= max_len {
        return Ok(None);
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_every_cluster_size() {
        for cb in 9..=21u32 {
            let g = Geometry {
                cluster_bits: cb,
                extended_l2: false,
            };
            let shift = 62 - (cb - 8);
            let max_sectors = 1u64 << (cb - 8);
            let off = (1u64 << shift) - 3;
            let d = CompressedDescriptor {
                host_offset: off,
                nb_sectors: max_sectors,
            };
            let raw = d.encode(g).unwrap();
            assert_eq!(raw >> 62, 1);
            assert_eq!(CompressedDescriptor::decode(raw, g), d);
            let (o, len) = d.host_range();
            assert_eq!(o.0, off);
            assert_eq!(len, max_sectors * 512 - (off & 511));
            let too_many = CompressedDescriptor {
                host_offset: 0,
                nb_sectors: max_sectors + 1,
            };
            assert!(too_many.encode(g).is_err());
            let bad_off = CompressedDescriptor {
                host_offset: 1 << shift,
                nb_sectors: 1,
            };
            assert!(bad_off.encode(g).is_err());
        }
    }

    #[test]
    fn qemu_layout_64k() {
        // cluster_bits 16: x = 54; sectors in bits 54..62.
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
        };
        let raw = (1u64 << 62) | (3u64 << 54) | 0x12345;
        let d = CompressedDescriptor::decode(raw, g);
        assert_eq!(d.host_offset, 0x12345);
        assert_eq!(d.nb_sectors, 4);
        assert_eq!(d.host_range().1, 4 * 512 - 0x145);
        let d2 = CompressedDescriptor::for_data(0x12345, 1000, g).unwrap();
        assert_eq!(d2.nb_sectors, 3);
    }

    #[test]
    fn roundtrip_both() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &data, data.len()).unwrap().unwrap();
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xaa; 700]); // trailing garbage is ignored
            let mut out = vec![0u8; data.len()];
            decompress(kind, &padded, &mut out).unwrap();
            assert_eq!(out, data);
            // Truncated input cannot fill the cluster.
            let mut out = vec![0u8; data.len()];
            assert!(decompress(kind, &c[..c.len() / 2], &mut out).is_err());
            // Garbage never panics.
            let _ = decompress(kind, &[0xff; 100], &mut out);
            let _ = decompress(kind, &[], &mut out);
        }
    }

    #[test]
    fn zstd_multiple_frames() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let mut input = zstd::bulk::compress(&a, 3).unwrap();
        input.extend(zstd::bulk::compress(&b, 3).unwrap());
        let mut out = vec![0u8; 8192];
        decompress(CompressionType::Zstd, &input, &mut out).unwrap();
        assert_eq!(&out[..4096], &a[..]);
        assert_eq!(&out[4096..], &b[..]);
        // A frame that would produce more than the cluster is an error.
        let mut small = vec![0u8; 2048];
        assert!(decompress(CompressionType::Zstd, &input, &mut small).is_err());
    }

    #[test]
    fn zlib_output_fits_qemu_4k_window() {
        // QEMU inflates with windowBits -12; our deflate stream must decode with that window.
        let data: Vec<u8> = (0..65536u32).map(|i| ((i * 7) % 5000 / 3) as u8).collect();
        let c = compress(CompressionType::Zlib, &data, data.len())
            .unwrap()
            .unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = vec![0u8; data.len()];
        d.decompress(&c, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn incompressible() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert_eq!(compress(kind, &data, data.len()).unwrap(), None);
        }
    }
}
