//! Small big-endian read/write helpers over byte slices that never panic.

use crate::error::{FormatError, Result};

/// Returns `buf[off..off + len]` or a [`FormatError::Truncated`] naming `what`.
pub(crate) fn slice<'a>(
    buf: &'a [u8],
    off: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8]> {
    let end = off.checked_add(len).ok_or(FormatError::Truncated {
        what,
        needed: u64::MAX,
        got: buf.len() as u64,
    })?;
    buf.get(off..end).ok_or(FormatError::Truncated {
        what,
        needed: end as u64,
        got: buf.len() as u64,
    })
}

/// Reads a big-endian u64 at `off`.
pub(crate) fn be64(buf: &[u8], off: usize, what: &'static str) -> Result<u64> {
    let s = slice(buf, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_be_bytes(a))
}

/// Reads a big-endian u32 at `off`.
pub(crate) fn be32(buf: &[u8], off: usize, what: &'static str) -> Result<u32> {
    let s = slice(buf, off, 4, what)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Ok(u32::from_be_bytes(a))
}

/// Reads a big-endian u16 at `off`.
pub(crate) fn be16(buf: &[u8], off: usize, what: &'static str) -> Result<u16> {
    let s = slice(buf, off, 2, what)?;
    let mut a = [0u8; 2];
    a.copy_from_slice(s);
    Ok(u16::from_be_bytes(a))
}

/// Reads one byte at `off`.
pub(crate) fn u8_at(buf: &[u8], off: usize, what: &'static str) -> Result<u8> {
    Ok(slice(buf, off, 1, what)?[0])
}

/// Rounds `v` up to a multiple of 8, checked.
pub(crate) fn align8(v: usize) -> Option<usize> {
    v.checked_add(7).map(|x| x & !7)
}
