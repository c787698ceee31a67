//! Offset and index newtypes, and the cluster geometry of an image.
//!
//! Spec: `docs/interop/qcow2.txt`, "Host cluster management" and "Cluster mapping"
//! (guest offset = L1 index, L2 index, offset in cluster; extended L2 entries, subclusters).

use crate::error::{FormatError, Result};

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

newtype!(
    /// A byte offset in the guest (virtual disk) address space.
    GuestOffset
);
newtype!(
    /// A byte offset in the image file (or external data file).
    HostOffset
);
newtype!(
    /// A guest cluster index (guest offset >> cluster_bits).
    GuestCluster
);
newtype!(
    /// A host cluster index (host offset >> cluster_bits).
    HostCluster
);
newtype!(
    /// An index into the L1 table.
    L1Index
);
newtype!(
    /// An index into one L2 table.
    L2Index
);

/// Smallest supported cluster_bits (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// Largest number of L1 entries QEMU accepts for a virtual size (`INT_MAX`).
pub const MAX_L1_ENTRIES_FOR_SIZE: u64 = i32::MAX as u64;

/// Cluster geometry: everything derived from `cluster_bits` and the extended-L2 feature.
///
/// Construct with [`Geometry::new`] to get validation; the fields are public so that a literal
/// can be written, and every method stays panic-free (and arithmetic-safe) for `cluster_bits`
/// in 9..=21. For other values the methods still do not panic but the results are meaningless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Whether L2 entries are extended (128-bit, with subcluster bitmaps).
    pub extended_l2: bool,
}

impl Geometry {
    /// Creates a validated geometry: cluster_bits 9..=21, and with extended L2 a subcluster size
    /// of at least 512 bytes (cluster_bits >= 14), as QEMU requires.
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Result<Geometry> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::UnsupportedClusterSize { cluster_bits });
        }
        let g = Geometry {
            cluster_bits,
            extended_l2,
        };
        if g.subcluster_size() < 512 {
            return Err(FormatError::UnsupportedSubclusterSize {
                subcluster_size: g.subcluster_size(),
            });
        }
        Ok(g)
    }

    /// cluster_bits clamped into a range where shifts cannot overflow.
    fn cb(&self) -> u32 {
        self.cluster_bits.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cb()
    }

    /// Size of one L2 entry in bytes: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries in one L2 table: cluster_bits - 3 (or - 4 with extended L2).
    pub fn l2_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cb() - 4
        } else {
            self.cb() - 3
        }
    }

    /// Number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        1u64 << self.l2_bits()
    }

    /// Bytes of guest address space mapped by one L2 table (one L1 entry).
    pub fn l1_entry_coverage(&self) -> u64 {
        1u64 << (self.l2_bits() + self.cb())
    }

    /// The L1 index of a guest offset.
    pub fn l1_index(&self, off: GuestOffset) -> L1Index {
        L1Index(off.0 >> (self.l2_bits() + self.cb()))
    }

    /// The L2 index of a guest offset within its L2 table.
    pub fn l2_index(&self, off: GuestOffset) -> L2Index {
        L2Index((off.0 >> self.cb()) & (self.l2_entries() - 1))
    }

    /// The guest cluster index of a guest offset.
    pub fn guest_cluster(&self, off: GuestOffset) -> GuestCluster {
        GuestCluster(off.0 >> self.cb())
    }

    /// The host cluster index of a host offset.
    pub fn host_cluster(&self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cb())
    }

    /// The byte offset within its cluster of any offset.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// Whether an offset is a multiple of the cluster size.
    pub fn is_cluster_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }

    /// Number of subclusters per cluster: 32 with extended L2, else 1.
    pub fn subclusters(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS_PER_CLUSTER
        } else {
            1
        }
    }

    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }

    /// log2 of the subcluster size.
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cb() - 5
        } else {
            self.cb()
        }
    }

    /// Index of the subcluster containing a guest offset, within its cluster (0..subclusters()).
    pub fn subcluster_index(&self, off: GuestOffset) -> u32 {
        // Result < 32 because offset_in_cluster < cluster_size = 32 << subcluster_bits.
        (self.offset_in_cluster(off.0) >> self.subcluster_bits()) as u32
    }

    /// Number of L1 entries needed to map `virtual_size` bytes (QEMU's `size_to_l1`).
    ///
    /// Errors with [`FormatError::ImageTooBig`] when more than `i32::MAX` entries would be needed,
    /// as QEMU does.
    pub fn l1_entries_for(&self, virtual_size: u64) -> Result<u64> {
        let n = virtual_size.div_ceil(self.l1_entry_coverage());
        if n > MAX_L1_ENTRIES_FOR_SIZE {
            return Err(FormatError::ImageTooBig {
                size: virtual_size,
                l1_entries: n,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_64k() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_bits(), 13);
        assert_eq!(g.l1_index(GuestOffset(1 << 29)), L1Index(1));
        assert_eq!(
            g.l2_index(GuestOffset((1 << 29) + 3 * 65536 + 5)),
            L2Index(3)
        );
        assert_eq!(g.subclusters(), 1);
        assert_eq!(g.subcluster_size(), 65536);
        assert_eq!(g.l1_entries_for(0).unwrap(), 0);
        assert_eq!(g.l1_entries_for(1).unwrap(), 1);
        assert_eq!(g.l1_entries_for(1 << 29).unwrap(), 1);
        assert_eq!(g.l1_entries_for((1 << 29) + 1).unwrap(), 2);
        assert_eq!(g.l1_entries_for(1 << 50).unwrap(), 1 << 21);
        assert!(g.l1_entries_for(u64::MAX).is_err());
    }

    #[test]
    fn geometry_extended() {
        let g = Geometry::new(16, true).unwrap();
        assert_eq!(g.l2_entry_size(), 16);
        assert_eq!(g.l2_bits(), 12);
        assert_eq!(g.subclusters(), 32);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.subcluster_index(GuestOffset(65536 + 2048 * 5 + 1)), 5);
        assert!(matches!(
            Geometry::new(13, true),
            Err(FormatError::UnsupportedSubclusterSize {
                subcluster_size: 256
            })
        ));
        assert!(Geometry::new(14, true).is_ok());
    }

    #[test]
    fn geometry_limits() {
        assert!(matches!(
            Geometry::new(8, false),
            Err(FormatError::UnsupportedClusterSize { cluster_bits: 8 })
        ));
        assert!(Geometry::new(22, false).is_err());
        let g = Geometry::new(9, false).unwrap();
        assert!(matches!(
            g.l1_entries_for(u64::MAX),
            Err(FormatError::ImageTooBig { .. })
        ));
        // Out-of-range literal geometries never panic.
        let bad = Geometry {
            cluster_bits: 200,
            extended_l2: true,
        };
        let _ = bad.l1_index(GuestOffset(u64::MAX));
        let _ = bad.l1_entries_for(u64::MAX);
    }
}
