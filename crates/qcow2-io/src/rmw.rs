//! The `O_DIRECT` write planning and `fallocate` emulations shared by the std and io_uring backends.
//!
//! Both backends bounce unaligned `O_DIRECT` writes through an aligned buffer, reading the partial
//! blocks at its ends first (read-modify-write), and emulate `FALLOC_FL_ZERO_RANGE` and
//! `FALLOC_FL_PUNCH_HOLE` with writes of zeros where the host lacks them. The arithmetic lives here once;
//! each backend only does the I/O its own way (blocking calls or io_uring operations).

use std::fs::File;
use std::io;
use std::ops::Range;

use crate::aligned::{AlignedRange, DIRECT_ALIGN, DIRECT_ALIGN_U64};
use crate::sys::{self, check_range, len64, HostLen};

/// Copies `parts` back to back into `dst` (exactly their total length).
pub(crate) fn copy_parts<P: AsRef<[u8]>>(dst: &mut [u8], parts: &[P]) {
    let mut at = 0usize;
    for p in parts {
        let p = p.as_ref();
        dst[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
}

/// Total length of `parts`, failing when it overflows `usize`.
pub(crate) fn total_len<P: AsRef<[u8]>>(parts: &[P]) -> io::Result<usize> {
    parts
        .iter()
        .try_fold(0usize, |acc, p| acc.checked_add(p.as_ref().len()))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffers too large"))
}

/// How to write `total` bytes at `offset` to an `O_DIRECT` file through an aligned bounce buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirectWrite {
    /// The block-aligned file range the bounce buffer covers.
    pub(crate) range: AlignedRange,
    /// End of the data (`offset + total`).
    pub(crate) end: u64,
    /// Where the data goes in the bounce buffer.
    pub(crate) data: Range<usize>,
}

impl DirectWrite {
    /// Plans the write of `total` bytes at `offset`.
    pub(crate) fn plan(offset: u64, total: usize) -> io::Result<DirectWrite> {
        let end = check_range(offset, len64(total))?;
        let range = AlignedRange::cover(offset, total)?;
        // `offset - range.start` < DIRECT_ALIGN.
        let skip = (offset - range.start) as usize;
        Ok(DirectWrite {
            range,
            end,
            data: skip..skip + total,
        })
    }

    /// Length of the bounce buffer.
    pub(crate) fn span(&self) -> usize {
        self.range.len()
    }

    /// True when the data covers whole blocks, so nothing needs reading first.
    pub(crate) fn is_aligned(&self) -> bool {
        self.data.start == 0 && self.range.end == self.end
    }

    /// The partial blocks to read before copying the data in: `(part of the bounce buffer, file
    /// offset)` for the head block and then the tail block, each at most once.
    pub(crate) fn reads(&self) -> Vec<(Range<usize>, u64)> {
        let span = self.span();
        let mut out = Vec::with_capacity(2);
        let head_partial = self.data.start != 0;
        if head_partial {
            out.push((0..DIRECT_ALIGN, self.range.start));
        }
        let tail_start = self.range.end - DIRECT_ALIGN_U64;
        if self.end != self.range.end && !(head_partial && tail_start == self.range.start) {
            out.push((span - DIRECT_ALIGN..span, tail_start));
        }
        out
    }

    /// How much of the bounce buffer to write back given the length `old` from before the write (see
    /// [`sys::direct_write_span`]).
    pub(crate) fn write_len(&self, old: HostLen) -> usize {
        sys::direct_write_span(old, self.range.start, self.end, self.span())
    }

    /// After the bounce buffer is written: trims the file back if the aligned write extended it past
    /// both its old length and the end of the data (never a block device).
    pub(crate) fn finish(&self, file: &File, old: HostLen) -> io::Result<()> {
        let want = old.len.max(self.end);
        if self.range.end > want {
            sys::trim_after_direct_write(file, old, want)?;
        }
        Ok(())
    }
}

/// The chunks `(offset, length)` in which to write zeros over `len` bytes at `offset` (the emulation
/// of `fallocate`): at most [`sys::ZERO_CHUNK`] bytes each, the first one stopping at a chunk boundary
/// so that later ones are aligned.
pub(crate) fn zero_chunks(offset: u64, len: u64) -> io::Result<impl Iterator<Item = (u64, usize)>> {
    let end = check_range(offset, len)?;
    let chunk_max = len64(sys::ZERO_CHUNK);
    let mut pos = offset;
    Ok(std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        // n <= ZERO_CHUNK, so it fits usize.
        let n = (end - pos).min(chunk_max - pos % chunk_max) as usize;
        let at = pos;
        pos += len64(n);
        Some((at, n))
    }))
}

/// Size of the zero buffer for writing `len` bytes of zeros in [`zero_chunks`].
pub(crate) fn zero_buf_len(len: u64) -> usize {
    sys::ZERO_CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX))
}

/// The part of `[offset, end)` that the hole-punch emulation zeroes: the part inside the file of
/// length `file_len`, as `(offset, len)`, or `None` when it lies past the end.
pub(crate) fn punch_range(offset: u64, end: u64, file_len: u64) -> Option<(u64, u64)> {
    let end = end.min(file_len);
    (offset < end).then(|| (offset, end - offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_reads_of_partial_blocks() {
        let a = DIRECT_ALIGN_U64;
        let w = DirectWrite::plan(a, DIRECT_ALIGN).unwrap();
        assert!(w.is_aligned() && w.reads().is_empty());
        let w = DirectWrite::plan(a + 1, 10).unwrap();
        assert!(!w.is_aligned());
        assert_eq!(w.reads(), vec![(0..DIRECT_ALIGN, a)]);
        assert_eq!(w.data, 1..11);
        let w = DirectWrite::plan(a + 1, DIRECT_ALIGN).unwrap();
        assert_eq!(
            w.reads(),
            vec![
                (0..DIRECT_ALIGN, a),
                (DIRECT_ALIGN..2 * DIRECT_ALIGN, 2 * a)
            ]
        );
        let w = DirectWrite::plan(0, 10).unwrap();
        assert_eq!(w.reads(), vec![(0..DIRECT_ALIGN, 0)]);
        assert!(DirectWrite::plan(u64::MAX - 3, 10).is_err());
    }

    #[test]
    fn zero_chunks_cover_the_range() {
        let c = len64(sys::ZERO_CHUNK);
        let got: Vec<_> = zero_chunks(c - 5, c + 10).unwrap().collect();
        assert_eq!(got, vec![(c - 5, 5), (c, sys::ZERO_CHUNK), (2 * c, 5)]);
        assert_eq!(zero_chunks(7, 0).unwrap().count(), 0);
        assert!(zero_chunks(u64::MAX, 2).is_err());
        assert_eq!(punch_range(10, 100, 50), Some((10, 40)));
        assert_eq!(punch_range(60, 100, 50), None);
    }
}
