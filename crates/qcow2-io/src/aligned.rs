//! Aligned bounce buffers for `O_DIRECT` I/O.
//!
//! With `O_DIRECT` the kernel requires the file offset, the length and the memory address of every
//! transfer to be multiples of the device's logical block size. The backends use [`DIRECT_ALIGN`]
//! (4096, which covers 512-byte and 4 KiB devices) for all three and bounce the caller's buffers through
//! an [`AlignedBuf`] when they do not qualify.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;

use crate::sys::check_range;

/// Alignment of offsets, lengths and memory used for `O_DIRECT` transfers.
pub const DIRECT_ALIGN: usize = 4096;

/// [`DIRECT_ALIGN`] as `u64`.
pub(crate) const DIRECT_ALIGN_U64: u64 = DIRECT_ALIGN as u64;

/// A zero-initialised heap buffer whose start is aligned to [`DIRECT_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no interior mutability.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reading the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`DIRECT_ALIGN`]; fails (rather than aborting) when the
    /// allocation cannot be made.
    pub fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        // A zero-size allocation is not allowed; allocate one block and expose `len` bytes.
        let size = len.max(DIRECT_ALIGN);
        let layout = Layout::from_size_align(size, DIRECT_ALIGN).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("aligned buffer of {len} bytes is too large"),
            )
        })?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate an aligned buffer of {len} bytes"),
            )
        })?;
        Ok(AlignedBuf { ptr, len, layout })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to at least `len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the pointer is stable for the buffer's lifetime (heap allocation never moved) and all `len`
// bytes are initialised.
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len
    }

    fn bytes_total(&self) -> usize {
        self.len
    }
}

// SAFETY: as above; every byte is always initialised, so `set_init` has nothing to record.
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    unsafe fn set_init(&mut self, _pos: usize) {}
}

/// The block-aligned range `[start, end)` that covers `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AlignedRange {
    /// `offset` rounded down to [`DIRECT_ALIGN`].
    pub start: u64,
    /// `offset + len` rounded up to [`DIRECT_ALIGN`].
    pub end: u64,
}

impl AlignedRange {
    /// Computes the covering range, failing when it does not fit in a file offset or in memory.
    pub(crate) fn cover(offset: u64, len: usize) -> io::Result<AlignedRange> {
        let end = check_range(offset, crate::sys::len64(len))?;
        let start = offset - offset % DIRECT_ALIGN_U64;
        let rem = end % DIRECT_ALIGN_U64;
        let end = if rem == 0 {
            end
        } else {
            check_range(end - rem, DIRECT_ALIGN_U64)?
        };
        // The span must fit a buffer: it is at most len + 2 blocks.
        usize::try_from(end - start).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "aligned span does not fit in memory",
            )
        })?;
        Ok(AlignedRange { start, end })
    }

    /// Length of the range in bytes (fits `usize`, checked in [`AlignedRange::cover`]).
    pub(crate) fn len(&self) -> usize {
        // Checked to fit in `cover`.
        (self.end - self.start) as usize
    }
}

/// A zeroed `BytesMut` of `len` bytes whose start is aligned to [`DIRECT_ALIGN`], for the owned-buffer
/// reads of [`crate::Backend::read_at`]: with `O_DIRECT`, a request whose offset and length are multiples
/// of [`DIRECT_ALIGN`] then goes to the kernel without a bounce copy. Costs at most `DIRECT_ALIGN - 1`
/// bytes of unused capacity in front of the data.
pub fn aligned_bytes_mut(len: usize) -> bytes::BytesMut {
    let mut b = bytes::BytesMut::with_capacity(len.saturating_add(DIRECT_ALIGN - 1));
    // `align_offset` of a byte pointer is always < DIRECT_ALIGN in practice; the `min` keeps the
    // reserved capacity sufficient whatever it answers.
    let skew = b.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN - 1);
    b.resize(skew + len, 0);
    // O(1): the front `skew` bytes are split off and dropped; the rest keeps the allocation.
    let _ = b.split_to(skew);
    b
}

/// True when a transfer of `len` bytes at `offset` from memory at `ptr` can go to an `O_DIRECT` file
/// without bouncing.
pub(crate) fn is_direct_ready(ptr: *const u8, len: usize, offset: u64) -> bool {
    (ptr as usize).is_multiple_of(DIRECT_ALIGN)
        && len.is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN_U64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_bytes_mut_is_aligned_and_zeroed() {
        for len in [0usize, 1, 512, 4096, 65536, 65536 + 3] {
            let b = aligned_bytes_mut(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
                assert!(is_direct_ready(b.as_ptr(), len - len % DIRECT_ALIGN, 0));
            }
        }
    }
}
