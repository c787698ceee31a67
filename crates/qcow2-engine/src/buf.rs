//! Owned I/O buffers for the backends, aligned and pooled.
//!
//! Buffers handed to a backend are aligned to [`qcow2_io::DIRECT_ALIGN`], so that with `O_DIRECT` an
//! aligned request goes to the kernel without a bounce copy (the alignment costs at most 4 KiB of unused
//! capacity; `split_to` is O(1)).
//!
//! Data reads go through a small process-wide pool ([`take`] / [`give`]): the read path copies the data
//! into the caller's buffer and gives the owned buffer back, so that steady-state reads neither allocate
//! nor zero-fill (a fresh allocation must be zero-filled, since the backends take initialised buffers and
//! this crate forbids `unsafe`). Buffers are pooled by power-of-two size class from 4 KiB to 4 MiB, and
//! the pool holds at most [`POOL_MAX_BYTES`] in total, so its memory is bounded.

use std::sync::Mutex;

use bytes::BytesMut;
use qcow2_io::DIRECT_ALIGN;

/// Smallest pooled class (2^12 = 4 KiB).
const MIN_CLASS_BITS: u32 = 12;
/// Largest pooled class (2^22 = 4 MiB); larger buffers are not pooled.
const MAX_CLASS_BITS: u32 = 22;
const CLASSES: usize = (MAX_CLASS_BITS - MIN_CLASS_BITS + 1) as usize;
/// Upper bound on the bytes held by the pool.
pub(crate) const POOL_MAX_BYTES: usize = 32 * 1024 * 1024;

struct Pool {
    free: [Vec<BytesMut>; CLASSES],
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    bytes: 0,
});

/// A zeroed buffer of `len` bytes whose start is aligned to `DIRECT_ALIGN` (not pooled).
pub(crate) fn io_buf(len: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(len.saturating_add(DIRECT_ALIGN - 1));
    let skew = b.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN - 1);
    b.resize(skew + len, 0);
    let _ = b.split_to(skew);
    b
}

/// The size class of `len`, if pooled.
fn class_of(len: usize) -> Option<usize> {
    let bits = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS_BITS);
    (bits <= MAX_CLASS_BITS).then(|| (bits - MIN_CLASS_BITS) as usize)
}

/// A buffer of `len` bytes for a backend read (contents unspecified: the backend overwrites all of it,
/// zero-filling past the end of the file). Aligned to `DIRECT_ALIGN`.
pub(crate) fn take(len: usize) -> BytesMut {
    let Some(class) = class_of(len) else {
        return io_buf(len);
    };
    let pooled = match POOL.lock() {
        Ok(mut p) => {
            let b = p.free[class].pop();
            if let Some(b) = &b {
                p.bytes -= b.capacity();
            }
            b
        }
        Err(_) => None,
    };
    match pooled {
        Some(mut b) => {
            // Pooled buffers of this class have a length of the full class size, so this only
            // shortens (no zero-fill, no reallocation).
            b.truncate(len);
            b
        }
        None => {
            let mut b = io_buf(1 << (class as u32 + MIN_CLASS_BITS));
            b.truncate(len);
            b
        }
    }
}

/// Returns a buffer obtained from [`take`] to the pool (dropped when the pool is full or the buffer
/// is not poolable).
pub(crate) fn give(mut b: BytesMut) {
    let cap = b.capacity();
    if cap == 0 || b.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
        return;
    }
    // The largest class that fits the capacity (floor of log2).
    let bits = usize::BITS - 1 - cap.leading_zeros();
    if !(MIN_CLASS_BITS..=MAX_CLASS_BITS).contains(&bits) {
        return;
    }
    let class = (bits - MIN_CLASS_BITS) as usize;
    let class_len = 1usize << bits;
    let Ok(mut p) = POOL.lock() else { return };
    if p.bytes + b.capacity() > POOL_MAX_BYTES || p.free[class].len() >= 64 {
        return;
    }
    // Restore the full class length; within capacity, so no reallocation, and only bytes beyond the
    // previous length are zero-filled (none when the buffer was used at full size).
    b.resize(class_len, 0);
    p.bytes += b.capacity();
    p.free[class].push(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 65536 + 3] {
            let b = io_buf(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
            }
        }
    }

    #[test]
    fn pool_reuses_aligned_buffers() {
        let b = take(65536);
        assert_eq!(b.len(), 65536);
        let p = b.as_ptr();
        give(b);
        let b = take(60000);
        assert_eq!(b.len(), 60000);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        // Usually the same buffer (other tests may race on the shared pool).
        let _ = p;
        give(b);
        let big = take(8 << 20);
        assert_eq!(big.len(), 8 << 20);
        give(big); // not pooled
        assert!(POOL.lock().unwrap().bytes <= POOL_MAX_BYTES);
    }
}
