//! L2 table entries, standard (64-bit) and extended (128-bit with subcluster bitmaps).
//!
//! Spec: `docs/interop/qcow2.txt`, "Cluster mapping" (L2 table entry, standard cluster
//! descriptor) and "Extended L2 Entries". Bit 63: COPIED; bit 62: compressed; for standard
//! clusters bits 9-55 hold the host offset and bit 0 the "reads as zero" flag (unused with
//! extended L2, where the second 64-bit word holds the allocation bitmap in bits 0-31 and the
//! zero bitmap in bits 32-63).
//!
//! Decoding follows QEMU's `qcow2_get_cluster_type` / `qcow2_get_subcluster_type` and
//! `qcow2_get_host_offset`: reserved bits are ignored, an unaligned host offset of a cluster
//! that is used is corruption, and invalid bitmap combinations are errors
//! (QEMU's `QCOW2_SUBCLUSTER_INVALID`).

use crate::bytes::be64;
use crate::compressed::CompressedDescriptor;
use crate::error::{FormatError, Result};
use crate::types::{Geometry, HostOffset};

/// COPIED flag (refcount exactly 1).
pub const L2E_COPIED: u64 = 1 << 63;
/// Compressed flag.
pub const L2E_COMPRESSED: u64 = 1 << 62;
/// "Reads as zero" flag of standard L2 entries (v3 only; unused with extended L2).
pub const L2E_ZERO: u64 = 1;
/// Mask of the host cluster offset in a standard cluster descriptor.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard (uncompressed) entry.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// A decoded L2 entry (the first 64-bit word; see [`SubclusterBitmap`] for the second word of
/// extended entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L2Entry {
    /// No host cluster (reads from the backing file, or zeros).
    Unallocated,
    /// Reads as zeros (standard L2 only), optionally with a preallocated host cluster.
    Zero {
        /// Host cluster kept allocated, if any.
        preallocated: Option<HostOffset>,
        /// COPIED flag.
        copied: bool,
    },
    /// Data in a host cluster.
    Normal {
        /// Host cluster offset (cluster-aligned; may be 0 with an external data file).
        host: HostOffset,
        /// COPIED flag.
        copied: bool,
    },
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

/// The subcluster bitmaps of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubclusterBitmap {
    /// Bit i: subcluster i is allocated (bits 0-31 of the second word).
    pub alloc: u32,
    /// Bit i: subcluster i reads as zeros (bits 32-63).
    pub zero: u32,
}

impl SubclusterBitmap {
    /// Decodes the second word of an extended L2 entry.
    pub fn decode(raw: u64) -> SubclusterBitmap {
        SubclusterBitmap {
            alloc: raw as u32,
            zero: (raw >> 32) as u32,
        }
    }

    /// Encodes the second word.
    pub fn encode(&self) -> u64 {
        u64::from(self.alloc) | (u64::from(self.zero) << 32)
    }
}

/// The state of one subcluster (or of the whole cluster without extended L2), as QEMU's
/// `QCow2SubclusterType`. `host` is the host offset of the *cluster*; add the offset within the
/// cluster to get the byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubclusterState {
    /// Data at the host cluster.
    Normal {
        /// Host cluster offset.
        host: HostOffset,
    },
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster allocated.
    ZeroAlloc {
        /// Host cluster offset.
        host: HostOffset,
    },
    /// Unallocated (backing file or zeros), no host cluster.
    UnallocatedPlain,
    /// Unallocated (backing file or zeros) although the cluster has a host cluster.
    UnallocatedAlloc {
        /// Host cluster offset.
        host: HostOffset,
    },
    /// Compressed cluster.
    Compressed(CompressedDescriptor),
}

impl SubclusterState {
    /// Whether the guest data comes from this layer's host cluster (Normal or Compressed).
    pub fn has_data(&self) -> bool {
        matches!(
            self,
            SubclusterState::Normal { .. } | SubclusterState::Compressed(_)
        )
    }

    /// Whether it reads as zeros regardless of the backing file.
    pub fn is_zero(&self) -> bool {
        matches!(
            self,
            SubclusterState::ZeroPlain | SubclusterState::ZeroAlloc { .. }
        )
    }

    /// Whether this layer defers to the backing file.
    pub fn is_unallocated(&self) -> bool {
        matches!(
            self,
            SubclusterState::UnallocatedPlain | SubclusterState::UnallocatedAlloc { .. }
        )
    }

    /// The host cluster offset, when this layer has one (not for compressed clusters).
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match self {
            SubclusterState::Normal { host }
            | SubclusterState::ZeroAlloc { host }
            | SubclusterState::UnallocatedAlloc { host } => Some(*host),
            _ => None,
        }
    }

    /// Whether two states are the same kind (ignoring offsets), for merging runs.
    fn same_kind(&self, other: &SubclusterState) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

fn unaligned(raw: u64, off: u64, geom: Geometry) -> FormatError {
    FormatError::InvalidL2Entry {
        raw,
        detail: format!(
            "Cluster allocation offset {off:#x} unaligned (cluster size {})",
            geom.cluster_size()
        ),
    }
}

/// Decodes one L2 entry from its raw words. `bitmap` is the second word for extended L2 (it is
/// ignored without extended L2). `external_data_file` selects QEMU's rule that with an external
/// data file an entry with offset 0 and COPIED set is a normal cluster at host offset 0, and
/// that compressed clusters are corruption.
///
/// Returns the entry and, for extended L2, its bitmap. Errors: an unaligned host offset of a
/// normal or preallocated zero cluster; a compressed entry with an external data file.
pub fn decode_l2_entry(
    raw: u64,
    bitmap: Option<u64>,
    geom: Geometry,
    external_data_file: bool,
) -> Result<(L2Entry, Option<SubclusterBitmap>)> {
    let bm = if geom.extended_l2 {
        Some(SubclusterBitmap::decode(bitmap.unwrap_or(0)))
    } else {
        None
    };
    let copied = raw & L2E_COPIED != 0;
    if raw & L2E_COMPRESSED != 0 {
        if external_data_file {
            return Err(FormatError::InvalidL2Entry {
                raw,
                detail: "Compressed cluster entry found in image with external data file".into(),
            });
        }
        return Ok((
            L2Entry::Compressed(CompressedDescriptor::decode(raw, geom)),
            bm,
        ));
    }
    let off = raw & L2E_OFFSET_MASK;
    if raw & L2E_ZERO != 0 && !geom.extended_l2 {
        if off == 0 {
            return Ok((
                L2Entry::Zero {
                    preallocated: None,
                    copied,
                },
                bm,
            ));
        }
        if !geom.is_cluster_aligned(off) {
            return Err(unaligned(raw, off, geom));
        }
        return Ok((
            L2Entry::Zero {
                preallocated: Some(HostOffset(off)),
                copied,
            },
            bm,
        ));
    }
    if off == 0 && !(external_data_file && copied) {
        return Ok((L2Entry::Unallocated, bm));
    }
    if !geom.is_cluster_aligned(off) {
        return Err(unaligned(raw, off, geom));
    }
    Ok((
        L2Entry::Normal {
            host: HostOffset(off),
            copied,
        },
        bm,
    ))
}

/// Reads the raw words of entry `index` of an L2 table (or slice) buffer: the entry, and the
/// bitmap for extended L2.
pub fn raw_l2_entry(table: &[u8], index: usize, geom: Geometry) -> Result<(u64, Option<u64>)> {
    let esize = geom.l2_entry_size() as usize;
    let off = index
        .checked_mul(esize)
        .ok_or(FormatError::IndexOutOfRange {
            what: "L2 table",
            index: index as u64,
            len: (table.len() / esize) as u64,
        })?;
    let oob = || FormatError::IndexOutOfRange {
        what: "L2 table",
        index: index as u64,
        len: (table.len() / esize) as u64,
    };
    let raw = be64(table, off, "L2 table").map_err(|_| oob())?;
    let bm = if geom.extended_l2 {
        Some(be64(table, off + 8, "L2 table").map_err(|_| oob())?)
    } else {
        None
    };
    Ok((raw, bm))
}

/// Decodes entry `index` of an L2 table (or slice) buffer, for an image without an external
/// data file. See [`decode_l2_entry`].
pub fn decode_l2(
    table: &[u8],
    index: usize,
    geom: Geometry,
) -> Result<(L2Entry, Option<SubclusterBitmap>)> {
    decode_l2_with(table, index, geom, false)
}

/// Decodes entry `index` of an L2 table (or slice) buffer; `external_data_file` as in
/// [`decode_l2_entry`].
pub fn decode_l2_with(
    table: &[u8],
    index: usize,
    geom: Geometry,
    external_data_file: bool,
) -> Result<(L2Entry, Option<SubclusterBitmap>)> {
    let (raw, bm) = raw_l2_entry(table, index, geom)?;
    decode_l2_entry(raw, bm, geom, external_data_file)
}

/// Checks an extended entry's bitmap against its entry, as QEMU does: for an allocated
/// (normal) cluster no subcluster may be both allocated and zero; for an unallocated cluster no
/// allocation bit may be set. Compressed entries and standard L2 are always valid.
pub fn validate_bitmap(entry: &L2Entry, bitmap: Option<SubclusterBitmap>, raw: u64) -> Result<()> {
    let Some(bm) = bitmap else {
        return Ok(());
    };
    match entry {
        L2Entry::Normal { .. } if bm.alloc & bm.zero != 0 => {
            Err(FormatError::InvalidSubclusterBitmap {
                raw,
                bitmap: bm.encode(),
                detail: "subclusters marked both allocated and zero",
            })
        }
        L2Entry::Unallocated if bm.alloc != 0 => Err(FormatError::InvalidSubclusterBitmap {
            raw,
            bitmap: bm.encode(),
            detail: "allocated subclusters in a cluster without host offset",
        }),
        _ => Ok(()),
    }
}

/// The state of subcluster `sc` (0..geom.subclusters()) of a decoded entry.
///
/// Without extended L2 (`bitmap` None) the subcluster index must be 0 and the state is the
/// cluster's. With extended L2 an invalid bitmap is [`FormatError::InvalidSubclusterBitmap`].
pub fn subcluster_state(
    entry: &L2Entry,
    bitmap: Option<SubclusterBitmap>,
    sc: u32,
) -> Result<SubclusterState> {
    let limit = if bitmap.is_some() { 32 } else { 1 };
    if sc >= limit {
        return Err(FormatError::IndexOutOfRange {
            what: "subcluster",
            index: u64::from(sc),
            len: u64::from(limit),
        });
    }
    let Some(bm) = bitmap else {
        return Ok(cluster_state(entry));
    };
    let raw_for_err = entry_raw_hint(entry);
    validate_bitmap(entry, bitmap, raw_for_err)?;
    let bit = 1u32 << sc;
    Ok(match *entry {
        L2Entry::Compressed(_) => cluster_state(entry),
        L2Entry::Normal { host, .. } => {
            if bm.zero & bit != 0 {
                SubclusterState::ZeroAlloc { host }
            } else if bm.alloc & bit != 0 {
                SubclusterState::Normal { host }
            } else {
                SubclusterState::UnallocatedAlloc { host }
            }
        }
        L2Entry::Unallocated => {
            if bm.zero & bit != 0 {
                SubclusterState::ZeroPlain
            } else {
                SubclusterState::UnallocatedPlain
            }
        }
        // Not produced by the decoder with extended L2 (the zero flag is unused there); treat a
        // hand-made value by its zero semantics.
        L2Entry::Zero { .. } => cluster_state(entry),
    })
}

/// The state of every subcluster of `entry` when no subcluster bitmap applies (standard L2 entries,
/// and the compressed and zero entries of extended L2, which the bitmap does not refine).
fn cluster_state(entry: &L2Entry) -> SubclusterState {
    match *entry {
        L2Entry::Unallocated => SubclusterState::UnallocatedPlain,
        L2Entry::Zero {
            preallocated: None, ..
        } => SubclusterState::ZeroPlain,
        L2Entry::Zero {
            preallocated: Some(host),
            ..
        } => SubclusterState::ZeroAlloc { host },
        L2Entry::Normal { host, .. } => SubclusterState::Normal { host },
        L2Entry::Compressed(d) => SubclusterState::Compressed(d),
    }
}

/// The state of subcluster `first` and the number of consecutive subclusters from `first` to
/// the end of the cluster that have the same kind of state (QEMU's
/// `qcow2_get_subcluster_range_type`). Without extended L2 the run is the whole cluster (1).
pub fn subcluster_run(
    entry: &L2Entry,
    bitmap: Option<SubclusterBitmap>,
    first: u32,
) -> Result<(SubclusterState, u32)> {
    let st = subcluster_state(entry, bitmap, first)?;
    let total = if bitmap.is_some() { 32 } else { 1 };
    let mut n = 1;
    while first + n < total {
        let next = subcluster_state(entry, bitmap, first + n)?;
        if !next.same_kind(&st) {
            break;
        }
        n += 1;
    }
    Ok((st, n))
}

/// A best-effort raw value for error messages built from a decoded entry.
fn entry_raw_hint(entry: &L2Entry) -> u64 {
    match entry {
        L2Entry::Unallocated => 0,
        L2Entry::Zero {
            preallocated,
            copied,
        } => preallocated.map_or(0, |h| h.0) | L2E_ZERO | if *copied { L2E_COPIED } else { 0 },
        L2Entry::Normal { host, copied } => host.0 | if *copied { L2E_COPIED } else { 0 },
        L2Entry::Compressed(d) => d.host_offset | L2E_COMPRESSED,
    }
}

impl L2Entry {
    /// The COPIED flag (always false for unallocated and compressed entries).
    pub fn copied(&self) -> bool {
        match self {
            L2Entry::Zero { copied, .. } | L2Entry::Normal { copied, .. } => *copied,
            _ => false,
        }
    }

    /// The host cluster this entry keeps allocated: a normal cluster's, or a preallocated zero
    /// cluster's. `None` for unallocated, plain zero and compressed entries.
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match self {
            L2Entry::Normal { host, .. } => Some(*host),
            L2Entry::Zero { preallocated, .. } => *preallocated,
            _ => None,
        }
    }

    /// Encodes the first word of the entry.
    ///
    /// Errors: a host offset that is unaligned or does not fit bits 9-55; a compressed
    /// descriptor that does not fit (see [`CompressedDescriptor::encode`]); a `Zero` entry with
    /// extended L2 (zeros are expressed with the bitmap there).
    pub fn encode(&self, geom: Geometry) -> Result<u64> {
        let check = |off: u64| -> Result<u64> {
            if off & !L2E_OFFSET_MASK != 0 || !geom.is_cluster_aligned(off) {
                return Err(FormatError::Serialize {
                    what: "L2 entry",
                    detail: format!("host offset {off:#x} unaligned or beyond bit 55"),
                });
            }
            Ok(off)
        };
        let copied_bit = |c: bool| if c { L2E_COPIED } else { 0 };
        match *self {
            L2Entry::Unallocated => Ok(0),
            L2Entry::Zero {
                preallocated,
                copied,
            } => {
                if geom.extended_l2 {
                    return Err(FormatError::Serialize {
                        what: "L2 entry",
                        detail: "the zero flag is not used with extended L2; use the zero bitmap"
                            .into(),
                    });
                }
                let off = match preallocated {
                    Some(h) => check(h.0)?,
                    None => 0,
                };
                Ok(off | L2E_ZERO | copied_bit(copied))
            }
            L2Entry::Normal { host, copied } => Ok(check(host.0)? | copied_bit(copied)),
            L2Entry::Compressed(d) => d.encode(geom),
        }
    }
}

/// Writes entry `index` (and its bitmap for extended L2; `None` writes a zero bitmap) into an
/// L2 table buffer.
pub fn encode_l2(
    table: &mut [u8],
    index: usize,
    geom: Geometry,
    entry: &L2Entry,
    bitmap: Option<SubclusterBitmap>,
) -> Result<()> {
    let raw = entry.encode(geom)?;
    let esize = geom.l2_entry_size() as usize;
    let len = table.len() / esize;
    let off =
        index
            .checked_mul(esize)
            .filter(|_| index < len)
            .ok_or(FormatError::IndexOutOfRange {
                what: "L2 table",
                index: index as u64,
                len: len as u64,
            })?;
    // index < len guarantees off + esize <= table.len().
    table[off..off + 8].copy_from_slice(&raw.to_be_bytes());
    if geom.extended_l2 {
        let bm = bitmap.unwrap_or_default().encode();
        table[off + 8..off + 16].copy_from_slice(&bm.to_be_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
    };
    const X: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: true,
    };

    #[test]
    fn standard_kinds() {
        let d = |raw| decode_l2_entry(raw, None, G, false).unwrap().0;
        assert_eq!(d(0), L2Entry::Unallocated);
        assert_eq!(
            d(L2E_COPIED),
            L2Entry::Unallocated,
            "offset 0 with COPIED is unallocated without a data file"
        );
        assert_eq!(
            d(0x8000_0000_0005_0000),
            L2Entry::Normal {
                host: HostOffset(0x50000),
                copied: true
            }
        );
        assert_eq!(
            d(1),
            L2Entry::Zero {
                preallocated: None,
                copied: false
            }
        );
        assert_eq!(
            d(0x8000_0000_0005_0001),
            L2Entry::Zero {
                preallocated: Some(HostOffset(0x50000)),
                copied: true
            }
        );
        assert!(decode_l2_entry(0x5_0200, None, G, false).is_err());
        assert!(decode_l2_entry(0x5_0201, None, G, false).is_err());
        assert!(matches!(d(L2E_COMPRESSED | 5), L2Entry::Compressed(_)));
    }

    #[test]
    fn data_file_rules() {
        let (e, _) = decode_l2_entry(L2E_COPIED, None, G, true).unwrap();
        assert_eq!(
            e,
            L2Entry::Normal {
                host: HostOffset(0),
                copied: true
            }
        );
        assert!(decode_l2_entry(L2E_COMPRESSED | 5, None, G, true).is_err());
    }

    #[test]
    fn extended_states() {
        let normal = L2Entry::Normal {
            host: HostOffset(0x10000),
            copied: true,
        };
        let bm = SubclusterBitmap {
            alloc: 0b0011,
            zero: 0b0100,
        };
        assert_eq!(
            subcluster_state(&normal, Some(bm), 0).unwrap(),
            SubclusterState::Normal {
                host: HostOffset(0x10000)
            }
        );
        assert_eq!(
            subcluster_state(&normal, Some(bm), 2).unwrap(),
            SubclusterState::ZeroAlloc {
                host: HostOffset(0x10000)
            }
        );
        assert_eq!(
            subcluster_state(&normal, Some(bm), 3).unwrap(),
            SubclusterState::UnallocatedAlloc {
                host: HostOffset(0x10000)
            }
        );
        assert_eq!(subcluster_run(&normal, Some(bm), 0).unwrap().1, 2);
        assert_eq!(subcluster_run(&normal, Some(bm), 3).unwrap().1, 29);
        let bad = SubclusterBitmap { alloc: 1, zero: 1 };
        assert!(matches!(
            subcluster_state(&normal, Some(bad), 5),
            Err(FormatError::InvalidSubclusterBitmap { .. })
        ));
        let un = L2Entry::Unallocated;
        assert!(subcluster_state(&un, Some(SubclusterBitmap { alloc: 1, zero: 0 }), 0).is_err());
        assert_eq!(
            subcluster_state(&un, Some(SubclusterBitmap { alloc: 0, zero: 2 }), 1).unwrap(),
            SubclusterState::ZeroPlain
        );
        assert!(subcluster_state(&un, Some(bm), 32).is_err());
        assert!(subcluster_state(&un, None, 1).is_err());
    }

    #[test]
    fn extended_zero_flag_ignored() {
        let (e, bm) = decode_l2_entry(1, Some(0), X, false).unwrap();
        assert_eq!(e, L2Entry::Unallocated);
        assert_eq!(bm, Some(SubclusterBitmap::default()));
    }

    #[test]
    fn table_roundtrip() {
        for g in [G, X] {
            let mut t = vec![0u8; g.cluster_size() as usize];
            let e = L2Entry::Normal {
                host: HostOffset(0x30000),
                copied: true,
            };
            let bm = g.extended_l2.then_some(SubclusterBitmap {
                alloc: 0xf0,
                zero: 0x0f,
            });
            encode_l2(&mut t, 7, g, &e, bm).unwrap();
            assert_eq!(decode_l2(&t, 7, g).unwrap(), (e, bm));
            let last = g.l2_entries() as usize;
            assert!(encode_l2(&mut t, last, g, &e, bm).is_err());
            assert!(decode_l2(&t, last, g).is_err());
            assert!(decode_l2(&t, usize::MAX, g).is_err());
        }
        let mut t = vec![0u8; 65536];
        let z = L2Entry::Zero {
            preallocated: None,
            copied: false,
        };
        assert!(encode_l2(&mut t, 0, X, &z, None).is_err());
    }
}
