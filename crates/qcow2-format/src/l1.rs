//! L1 table entries (spec: `docs/interop/qcow2.txt`, "Cluster mapping", L1 table entry).
//!
//! Bits 9-55: offset of the L2 table (cluster-aligned, 0 = unallocated); bit 63: COPIED
//! (refcount of the L2 table is exactly 1); bits 0-8 and 56-62 are reserved.

use crate::bytes::be64;
use crate::error::{FormatError, Result};
use crate::types::{Geometry, HostOffset};

/// Mask of the L2 table offset in an L1 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The COPIED flag.
pub const L1E_COPIED: u64 = 1 << 63;
/// Reserved bits of an L1 entry.
pub const L1E_RESERVED_MASK: u64 = !(L1E_OFFSET_MASK | L1E_COPIED);
/// Size of one L1 entry.
pub const L1E_SIZE: u64 = 8;
/// QEMU's maximum L1 table size in bytes (32 MiB).
pub const MAX_L1_SIZE_BYTES: u64 = 32 << 20;

/// A decoded L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Entry {
    /// Offset of the L2 table, `None` if unallocated.
    pub l2_offset: Option<HostOffset>,
    /// COPIED flag: the L2 table's refcount is exactly 1 and it may be written in place.
    pub copied: bool,
}

impl L1Entry {
    /// An unallocated entry.
    pub const UNALLOCATED: L1Entry = L1Entry {
        l2_offset: None,
        copied: false,
    };

    /// Decodes an entry as QEMU's read path does: reserved bits are ignored (qemu-img check
    /// reports them; see [`L1Entry::reserved_bits`]); an L2 offset that is not aligned to
    /// `geom`'s cluster size is an error (QEMU: "L2 table offset ... unaligned", corruption).
    pub fn decode(raw: u64, geom: Geometry) -> Result<L1Entry> {
        let off = raw & L1E_OFFSET_MASK;
        if off != 0 && !geom.is_cluster_aligned(off) {
            return Err(FormatError::InvalidL1Entry {
                raw,
                detail: format!(
                    "L2 table offset {off:#x} unaligned (cluster size {})",
                    geom.cluster_size()
                ),
            });
        }
        Ok(L1Entry {
            l2_offset: (off != 0).then_some(HostOffset(off)),
            copied: raw & L1E_COPIED != 0,
        })
    }

    /// Like [`L1Entry::decode`] but also rejects reserved bits.
    pub fn decode_strict(raw: u64, geom: Geometry) -> Result<L1Entry> {
        if raw & L1E_RESERVED_MASK != 0 {
            return Err(FormatError::InvalidL1Entry {
                raw,
                detail: format!("reserved bits {:#x} set", raw & L1E_RESERVED_MASK),
            });
        }
        Self::decode(raw, geom)
    }

    /// The reserved bits set in a raw entry.
    pub fn reserved_bits(raw: u64) -> u64 {
        raw & L1E_RESERVED_MASK
    }

    /// Encodes the entry. Offset bits outside the offset mask are dropped; use
    /// [`L1Entry::try_encode`] to have them rejected.
    pub fn encode(&self) -> u64 {
        let mut v = self.l2_offset.map_or(0, |o| o.0 & L1E_OFFSET_MASK);
        if self.copied {
            v |= L1E_COPIED;
        }
        v
    }

    /// Encodes the entry, rejecting an offset that does not fit the offset field.
    pub fn try_encode(&self) -> Result<u64> {
        if let Some(o) = self.l2_offset {
            if o.0 & !L1E_OFFSET_MASK != 0 || o.0 == 0 {
                return Err(FormatError::Serialize {
                    what: "L1 entry",
                    detail: format!("L2 offset {:#x} does not fit bits 9-55 or is zero", o.0),
                });
            }
        }
        Ok(self.encode())
    }
}

/// Reads raw L1 entry `index` from a big-endian L1 table buffer.
pub fn raw_l1_entry(table: &[u8], index: usize) -> Result<u64> {
    let off = index.checked_mul(8).ok_or(FormatError::IndexOutOfRange {
        what: "L1 table",
        index: index as u64,
        len: (table.len() / 8) as u64,
    })?;
    be64(table, off, "L1 table")
}

/// Decodes a whole big-endian L1 table into raw entries.
pub fn parse_l1_table(table: &[u8]) -> Vec<u64> {
    table
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Serialises raw L1 entries into a big-endian table.
pub fn serialize_l1_table(entries: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len().saturating_mul(8));
    for e in entries {
        v.extend_from_slice(&e.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
    };

    #[test]
    fn decode_encode() {
        let e = L1Entry::decode(0x8000_0000_0003_0000, G).unwrap();
        assert_eq!(e.l2_offset, Some(HostOffset(0x30000)));
        assert!(e.copied);
        assert_eq!(e.encode(), 0x8000_0000_0003_0000);
        assert_eq!(L1Entry::decode(0, G).unwrap(), L1Entry::UNALLOCATED);
        // Reserved bits are ignored by decode, rejected by decode_strict.
        assert!(L1Entry::decode(0x0100_0000_0003_0001, G).is_ok());
        assert!(L1Entry::decode_strict(0x0100_0000_0003_0000, G).is_err());
        assert!(matches!(
            L1Entry::decode(0x0000_0000_0003_0200, G),
            Err(FormatError::InvalidL1Entry { .. })
        ));
    }

    #[test]
    fn table() {
        let t = serialize_l1_table(&[1, 2, 0x8000_0000_0001_0000]);
        assert_eq!(parse_l1_table(&t), vec![1, 2, 0x8000_0000_0001_0000]);
        assert_eq!(raw_l1_entry(&t, 2).unwrap(), 0x8000_0000_0001_0000);
        assert!(raw_l1_entry(&t, 3).is_err());
        assert!(raw_l1_entry(&t, usize::MAX).is_err());
    }
}
