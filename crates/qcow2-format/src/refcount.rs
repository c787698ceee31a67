//! Refcount table entries and refcount blocks (spec: `docs/interop/qcow2.txt`,
//! "Host cluster management").
//!
//! The refcount table holds 64-bit offsets of refcount blocks (bits 9-63; bits 0-8 reserved,
//! 0 = block not allocated). A refcount block is one cluster of `refcount_bits`-wide entries,
//! `refcount_bits = 1 << refcount_order` (1..=64). Entries of 8 bits and more are big-endian;
//! narrower entries are packed into bytes starting at the least significant bit (as QEMU's
//! `get_refcount_ro0..2`).

use crate::bytes::be64;
use crate::error::{FormatError, Result};
use crate::types::{Geometry, HostOffset};

/// Mask of the refcount block offset in a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
/// QEMU's maximum refcount table size in bytes (8 MiB).
pub const MAX_REFTABLE_SIZE_BYTES: u64 = 8 << 20;

/// The refcount order: refcount width is `1 << order` bits, order 0..=6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefcountOrder(pub u32);

impl Default for RefcountOrder {
    fn default() -> Self {
        RefcountOrder(4)
    }
}

impl RefcountOrder {
    /// Validates an order (0..=6).
    pub fn new(order: u32) -> Result<RefcountOrder> {
        if order > 6 {
            return Err(FormatError::RefcountOrderTooLarge { order });
        }
        Ok(RefcountOrder(order))
    }

    /// The order clamped into 0..=6 (methods stay panic-free on a hand-made value).
    fn o(self) -> u32 {
        self.0.min(6)
    }

    /// Refcount width in bits (1, 2, 4, 8, 16, 32 or 64).
    pub fn refcount_bits(self) -> u32 {
        1 << self.o()
    }

    /// Largest refcount value representable.
    pub fn max_refcount(self) -> u64 {
        if self.o() == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Number of refcount entries in one refcount block of `1 << cluster_bits` bytes.
    pub fn entries_per_block(self, cluster_bits: u32) -> u64 {
        let cb = cluster_bits.clamp(9, 21);
        1u64 << (cb + 3 - self.o())
    }
}

fn check_index(block: &[u8], index: usize, order: RefcountOrder) -> Result<()> {
    let bits = order.refcount_bits() as u128;
    let entries = (block.len() as u128 * 8) / bits;
    if (index as u128) >= entries {
        return Err(FormatError::IndexOutOfRange {
            what: "refcount block",
            index: index as u64,
            len: entries as u64,
        });
    }
    Ok(())
}

/// Reads refcount `index` from a refcount block buffer.
pub fn get_refcount(block: &[u8], index: usize, order: RefcountOrder) -> Result<u64> {
    check_index(block, index, order)?;
    // check_index guarantees every byte accessed below is inside `block`.
    Ok(match order.o() {
        o @ 0..=2 => {
            let bits = 1usize << o;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[2 * index], block[2 * index + 1]])),
        5 => {
            let i = 4 * index;
            u64::from(u32::from_be_bytes([
                block[i],
                block[i + 1],
                block[i + 2],
                block[i + 3],
            ]))
        }
        _ => be64(block, 8 * index, "refcount block")?,
    })
}

/// Writes refcount `index` into a refcount block buffer. A value wider than the refcount width
/// is [`FormatError::RefcountOverflow`] (never truncated).
pub fn set_refcount(
    block: &mut [u8],
    index: usize,
    order: RefcountOrder,
    value: u64,
) -> Result<()> {
    check_index(block, index, order)?;
    if value > order.max_refcount() {
        return Err(FormatError::RefcountOverflow {
            value,
            bits: order.refcount_bits(),
        });
    }
    // check_index guarantees every byte accessed below is inside `block`; value fits the width.
    match order.o() {
        o @ 0..=2 => {
            let bits = 1usize << o;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[index / per_byte];
            *b = (*b & !mask) | ((value as u8) << shift);
        }
        3 => block[index] = value as u8,
        4 => block[2 * index..2 * index + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * index..4 * index + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * index..8 * index + 8].copy_from_slice(&value.to_be_bytes()),
    }
    Ok(())
}

/// Decodes a refcount table entry: `None` if the block is not allocated. Reserved bits are
/// ignored as QEMU does; an offset not aligned to the cluster size is an error (QEMU:
/// "Refblock offset ... unaligned", corruption).
pub fn decode_reftable_entry(raw: u64, geom: Geometry) -> Result<Option<HostOffset>> {
    let off = raw & REFT_OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if !geom.is_cluster_aligned(off) {
        return Err(FormatError::InvalidRefcountTableEntry {
            raw,
            detail: format!(
                "Refblock offset {off:#x} unaligned (cluster size {})",
                geom.cluster_size()
            ),
        });
    }
    Ok(Some(HostOffset(off)))
}

/// Encodes a refcount table entry.
pub fn encode_reftable_entry(block: Option<HostOffset>, geom: Geometry) -> Result<u64> {
    match block {
        None => Ok(0),
        Some(o) if o.0 != 0 && geom.is_cluster_aligned(o.0) => Ok(o.0),
        Some(o) => Err(FormatError::Serialize {
            what: "refcount table entry",
            detail: format!("refcount block offset {:#x} is zero or unaligned", o.0),
        }),
    }
}

/// Decodes a big-endian refcount table into raw entries.
pub fn parse_reftable(table: &[u8]) -> Vec<u64> {
    crate::l1::parse_l1_table(table)
}

/// Serialises raw refcount table entries.
pub fn serialize_reftable(entries: &[u64]) -> Vec<u8> {
    crate::l1::serialize_l1_table(entries)
}

/// Where the refcount of host cluster `cluster` lives: (refcount table index, index in block).
pub fn refcount_location(cluster: u64, order: RefcountOrder, cluster_bits: u32) -> (u64, u64) {
    let per_block = order.entries_per_block(cluster_bits);
    (cluster / per_block, cluster % per_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_orders() {
        for o in 0..=6u32 {
            let order = RefcountOrder::new(o).unwrap();
            let mut block = vec![0u8; 512];
            let n = order.entries_per_block(9) as usize;
            assert_eq!(n, 512 * 8 / (1 << o));
            let max = order.max_refcount();
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                set_refcount(&mut block, i, order, v).unwrap();
            }
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                assert_eq!(
                    get_refcount(&block, i, order).unwrap(),
                    v,
                    "order {o} index {i}"
                );
            }
            assert!(get_refcount(&block, n, order).is_err());
            assert!(set_refcount(&mut block, n, order, 0).is_err());
            if o < 6 {
                assert!(matches!(
                    set_refcount(&mut block, 0, order, max + 1),
                    Err(FormatError::RefcountOverflow { .. })
                ));
            }
        }
        assert!(RefcountOrder::new(7).is_err());
    }

    #[test]
    fn sub_byte_layout_is_lsb_first() {
        let mut b = [0u8; 1];
        set_refcount(&mut b, 1, RefcountOrder(0), 1).unwrap();
        assert_eq!(b[0], 0b10);
        let mut b = [0u8; 1];
        set_refcount(&mut b, 1, RefcountOrder(2), 0xa).unwrap();
        assert_eq!(b[0], 0xa0);
        let mut b = [0u8; 2];
        set_refcount(&mut b, 0, RefcountOrder(4), 0x1234).unwrap();
        assert_eq!(b, [0x12, 0x34]);
    }

    #[test]
    fn reftable() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
        };
        assert_eq!(decode_reftable_entry(0, g).unwrap(), None);
        assert_eq!(
            decode_reftable_entry(0x20000, g).unwrap(),
            Some(HostOffset(0x20000))
        );
        assert_eq!(
            decode_reftable_entry(0x20001, g).unwrap(),
            Some(HostOffset(0x20000))
        );
        assert!(decode_reftable_entry(0x20200, g).is_err());
        assert_eq!(
            encode_reftable_entry(Some(HostOffset(0x20000)), g).unwrap(),
            0x20000
        );
        assert!(encode_reftable_entry(Some(HostOffset(0x200)), g).is_err());
        assert_eq!(
            refcount_location(40000, RefcountOrder(4), 16),
            (1, 40000 - 32768)
        );
    }
}
