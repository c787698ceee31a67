//! The fixed part of the qcow2 header (spec: `docs/interop/qcow2.txt`, "Header").
//!
//! [`Header::parse`] decodes the fields structurally (magic, version, enough bytes, known
//! compression type); range and consistency checks against QEMU's limits are done by
//! [`crate::image_header::ImageHeader::parse`], in QEMU's order.

use crate::bytes::{be32, be64, slice, u8_at};
use crate::error::{FormatError, Result};
use crate::types::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Size of a version 2 header (and where its extensions start).
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum `header_length` of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// `header_length` QEMU writes for version 3 (fields up to the compression type, padded to 8).
pub const V3_HEADER_LENGTH: u32 = 112;
/// Offset of the compression type byte.
pub const COMPRESSION_TYPE_OFFSET: usize = 104;
/// Bytes to read first: enough for every fixed field of either version, so that the cluster size
/// and `header_length` are known before reading the rest of the header cluster.
pub const HEADER_MIN_READ: usize = 112;

/// Whether `buf` starts with the qcow2 magic (for probing the image format).
pub fn has_qcow2_magic(buf: &[u8]) -> bool {
    be32(buf, 0, "qcow2 magic").is_ok_and(|m| m == QCOW2_MAGIC)
}

/// Learns the cluster size from the first bytes of an image (at least 24), with QEMU's first
/// checks (magic, version, cluster_bits 9..=21), so that the caller knows how much of the header
/// cluster to read for [`crate::image_header::ImageHeader::parse`]: `min(1 << cluster_bits,
/// file length)` bytes.
pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32> {
    let magic = be32(buf, 0, "qcow2 header")?;
    if magic != QCOW2_MAGIC {
        return Err(FormatError::BadMagic { found: magic });
    }
    let version = be32(buf, 4, "qcow2 header")?;
    if !(2..=3).contains(&version) {
        return Err(FormatError::UnsupportedVersion { version });
    }
    let cluster_bits = be32(buf, 20, "qcow2 header")?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(FormatError::UnsupportedClusterSize { cluster_bits });
    }
    Ok(cluster_bits)
}

/// Header format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Version 2 (compat 0.10).
    V2,
    /// Version 3 (compat 1.1).
    V3,
}

impl Version {
    /// The on-disk number.
    pub fn number(self) -> u32 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    /// qemu-img's "compat" string: "0.10" or "1.1".
    pub fn compat(self) -> &'static str {
        match self {
            Version::V2 => "0.10",
            Version::V3 => "1.1",
        }
    }
}

/// Compression algorithm of compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// 0: raw deflate (zlib without header), the default.
    #[default]
    Zlib,
    /// 1: zstd frames.
    Zstd,
}

impl CompressionType {
    /// The on-disk value.
    pub fn value(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// Decodes the on-disk value.
    pub fn from_value(value: u8) -> Result<CompressionType> {
        match value {
            0 => Ok(CompressionType::Zlib),
            1 => Ok(CompressionType::Zstd),
            _ => Err(FormatError::UnknownCompressionType { value }),
        }
    }

    /// qemu-img's name: "zlib" or "zstd".
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

macro_rules! features {
    ($(#[$m:meta])* $name:ident { $($(#[$cm:meta])* $c:ident = $bit:expr),* $(,)? } known = $known:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            $($(#[$cm])* pub const $c: $name = $name(1 << $bit);)*
            /// Every bit this implementation knows.
            pub const KNOWN: $name = $name($known);

            /// Whether all bits of `other` are set.
            pub fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// The bits this implementation does not know.
            pub fn unknown(self) -> $name {
                $name(self.0 & !Self::KNOWN.0)
            }

            /// Returns a copy with the bits of `other` set or cleared.
            #[must_use]
            pub fn with(self, other: $name, on: bool) -> $name {
                if on {
                    $name(self.0 | other.0)
                } else {
                    $name(self.0 & !other.0)
                }
            }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }
    };
}

features!(
    /// Incompatible feature bits (header offset 72).
    IncompatibleFeatures {
        /// Bit 0: refcounts may be inconsistent (lazy refcounts in use).
        DIRTY = 0,
        /// Bit 1: the image is known to be corrupt.
        CORRUPT = 1,
        /// Bit 2: an external data file is used.
        EXTERNAL_DATA_FILE = 2,
        /// Bit 3: the compression type field is not zlib.
        COMPRESSION_TYPE = 3,
        /// Bit 4: L2 entries are extended (subclusters).
        EXTENDED_L2 = 4,
    } known = 0x1f
);

features!(
    /// Compatible feature bits (header offset 80).
    CompatibleFeatures {
        /// Bit 0: lazy refcounts.
        LAZY_REFCOUNTS = 0,
    } known = 0x1
);

features!(
    /// Autoclear feature bits (header offset 88).
    AutoclearFeatures {
        /// Bit 0: the bitmaps extension is consistent.
        BITMAPS = 0,
        /// Bit 1: the external data file is a valid raw image.
        RAW_EXTERNAL = 1,
    } known = 0x3
);

/// The fixed header fields.
///
/// For version 2 images the v3 fields hold their implied values: no features,
/// `refcount_order` 4, `header_length` 72, zlib compression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// Format version.
    pub version: Version,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Number of clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: IncompatibleFeatures,
    /// Compatible feature bits.
    pub compatible: CompatibleFeatures,
    /// Autoclear feature bits.
    pub autoclear: AutoclearFeatures,
    /// Refcount width is `1 << refcount_order` bits.
    pub refcount_order: u32,
    /// Length of the header (v3); 72 for v2.
    pub header_length: u32,
    /// Compression type (byte 104 when `header_length > 104`, else zlib).
    pub compression_type: CompressionType,
    /// Bytes from offset 112 up to `header_length` (fields this implementation does not know),
    /// kept so that a rewrite preserves them. Empty when `header_length <= 112`.
    pub unknown_trailing: Vec<u8>,
}

impl Header {
    /// Creates a default version 3 header for a new image (no tables placed yet).
    pub fn new_v3(cluster_bits: u32, size: u64) -> Header {
        Header {
            version: Version::V3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: IncompatibleFeatures::default(),
            compatible: CompatibleFeatures::default(),
            autoclear: AutoclearFeatures::default(),
            refcount_order: 4,
            header_length: V3_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            unknown_trailing: Vec::new(),
        }
    }

    /// Offset where header extensions start (`header_length`; 72 for v2).
    pub fn extensions_offset(&self) -> u64 {
        match self.version {
            Version::V2 => u64::from(V2_HEADER_LENGTH),
            Version::V3 => u64::from(self.header_length),
        }
    }

    /// Parses the fixed header from the start of the image.
    ///
    /// Does QEMU's first checks, in QEMU's order: magic, version, cluster_bits 9..=21,
    /// v3 `header_length` >= 104 and <= cluster size, `backing_file_offset` <= cluster size,
    /// compression type known and consistent with its incompatible bit. The buffer must hold
    /// the fixed fields and, for v3, all `header_length` bytes ([`FormatError::Truncated`]
    /// otherwise). The remaining checks are done by
    /// [`crate::image_header::ImageHeader::parse`].
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let magic = be32(buf, 0, "qcow2 header")?;
        if magic != QCOW2_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version_num = be32(buf, 4, "qcow2 header")?;
        let version = match version_num {
            2 => Version::V2,
            3 => Version::V3,
            v => return Err(FormatError::UnsupportedVersion { version: v }),
        };
        let need = match version {
            Version::V2 => V2_HEADER_LENGTH as usize,
            Version::V3 => V3_MIN_HEADER_LENGTH as usize,
        };
        slice(buf, 0, need, "qcow2 header")?;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8, "qcow2 header")?,
            backing_file_size: be32(buf, 16, "qcow2 header")?,
            cluster_bits: be32(buf, 20, "qcow2 header")?,
            size: be64(buf, 24, "qcow2 header")?,
            crypt_method: be32(buf, 32, "qcow2 header")?,
            l1_size: be32(buf, 36, "qcow2 header")?,
            l1_table_offset: be64(buf, 40, "qcow2 header")?,
            refcount_table_offset: be64(buf, 48, "qcow2 header")?,
            refcount_table_clusters: be32(buf, 56, "qcow2 header")?,
            nb_snapshots: be32(buf, 60, "qcow2 header")?,
            snapshots_offset: be64(buf, 64, "qcow2 header")?,
            incompatible: IncompatibleFeatures(0),
            compatible: CompatibleFeatures(0),
            autoclear: AutoclearFeatures(0),
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: CompressionType::Zlib,
            unknown_trailing: Vec::new(),
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(FormatError::UnsupportedClusterSize {
                cluster_bits: h.cluster_bits,
            });
        }
        let cluster_size = 1u64 << h.cluster_bits;
        let mut compression_value = 0u8;
        if version == Version::V3 {
            h.incompatible = IncompatibleFeatures(be64(buf, 72, "qcow2 header")?);
            h.compatible = CompatibleFeatures(be64(buf, 80, "qcow2 header")?);
            h.autoclear = AutoclearFeatures(be64(buf, 88, "qcow2 header")?);
            h.refcount_order = be32(buf, 96, "qcow2 header")?;
            h.header_length = be32(buf, 100, "qcow2 header")?;
            if h.header_length < V3_MIN_HEADER_LENGTH {
                return Err(FormatError::HeaderTooShort {
                    header_length: h.header_length,
                });
            }
        }
        if u64::from(h.header_length) > cluster_size {
            return Err(FormatError::HeaderExceedsCluster {
                header_length: h.header_length,
                cluster_size,
            });
        }
        if version == Version::V3 {
            let len = h.header_length as usize;
            if len > COMPRESSION_TYPE_OFFSET {
                compression_value = u8_at(
                    buf,
                    COMPRESSION_TYPE_OFFSET,
                    "qcow2 header (compression type)",
                )?;
            }
            if len > V3_HEADER_LENGTH as usize {
                let extra = slice(
                    buf,
                    V3_HEADER_LENGTH as usize,
                    len - V3_HEADER_LENGTH as usize,
                    "qcow2 header (fields beyond 112 bytes)",
                )?;
                h.unknown_trailing = extra.to_vec();
            }
        }
        if h.backing_file_offset > cluster_size {
            return Err(FormatError::InvalidBackingFileOffset {
                offset: h.backing_file_offset,
                cluster_size,
            });
        }
        h.compression_type = CompressionType::from_value(compression_value)?;
        let bit = h
            .incompatible
            .contains(IncompatibleFeatures::COMPRESSION_TYPE);
        match (h.compression_type, bit) {
            (CompressionType::Zlib, true) | (CompressionType::Zstd, false) => {
                return Err(FormatError::CompressionTypeBitMismatch {
                    must_be_set: !bit,
                    compression_type: compression_value,
                })
            }
            _ => {}
        }
        Ok(h)
    }

    /// Serialises the header: 72 bytes for v2, `header_length` bytes for v3 (the compression
    /// type at 104 when `header_length > 104`, zero padding up to 112, then
    /// `unknown_trailing`).
    ///
    /// Errors when `header_length` (v3) is below 104, or is above 112 but does not equal
    /// `112 + unknown_trailing.len()` (or `unknown_trailing` is non-empty with a shorter
    /// header), or when the v3 fields are not at their implied values for a v2 header.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let len = match self.version {
            Version::V2 => {
                if self.incompatible.0 != 0
                    || self.compatible.0 != 0
                    || self.autoclear.0 != 0
                    || self.refcount_order != 4
                    || self.compression_type != CompressionType::Zlib
                    || !self.unknown_trailing.is_empty()
                {
                    return Err(FormatError::Serialize {
                        what: "qcow2 header",
                        detail: "version 2 headers have no feature bits, refcount_order 4, \
                                 zlib compression and no extra header fields"
                            .into(),
                    });
                }
                V2_HEADER_LENGTH as usize
            }
            Version::V3 => {
                let hl = self.header_length;
                if hl < V3_MIN_HEADER_LENGTH {
                    return Err(FormatError::Serialize {
                        what: "qcow2 header",
                        detail: format!("header_length {hl} is below 104"),
                    });
                }
                if self.compression_type != CompressionType::Zlib && hl <= 104 {
                    return Err(FormatError::Serialize {
                        what: "qcow2 header",
                        detail: "a non-zlib compression type needs header_length > 104".into(),
                    });
                }
                if !self.unknown_trailing.is_empty() || hl > V3_HEADER_LENGTH {
                    let want = (V3_HEADER_LENGTH as usize).checked_add(self.unknown_trailing.len());
                    if want != Some(hl as usize) {
                        return Err(FormatError::Serialize {
                            what: "qcow2 header",
                            detail: format!(
                                "header_length {hl} does not match 112 + {} unknown trailing bytes",
                                self.unknown_trailing.len()
                            ),
                        });
                    }
                }
                hl as usize
            }
        };
        let mut b = vec![0u8; len.max(V3_HEADER_LENGTH as usize)];
        b[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.number().to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == Version::V3 {
            b[72..80].copy_from_slice(&self.incompatible.0.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.0.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.0.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            b[104] = self.compression_type.value();
            b.truncate(V3_HEADER_LENGTH as usize);
            b.extend_from_slice(&self.unknown_trailing);
        }
        b.truncate(len);
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_roundtrip() {
        let mut h = Header::new_v3(16, 1 << 30);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.compression_type = CompressionType::Zstd;
        h.incompatible = IncompatibleFeatures::COMPRESSION_TYPE;
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), 112);
        assert_eq!(Header::parse(&b).unwrap(), h);
        h.incompatible = IncompatibleFeatures(0);
        let b = h.serialize().unwrap();
        assert!(matches!(
            Header::parse(&b),
            Err(FormatError::CompressionTypeBitMismatch {
                must_be_set: true,
                ..
            })
        ));
    }

    #[test]
    fn v3_unknown_trailing() {
        let mut h = Header::new_v3(16, 4096);
        h.unknown_trailing = vec![1, 2, 3, 4, 5, 6, 7, 8];
        h.header_length = 120;
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), 120);
        assert_eq!(Header::parse(&b).unwrap(), h);
        h.header_length = 112;
        assert!(h.serialize().is_err());
    }

    #[test]
    fn v3_short_header_length() {
        let mut h = Header::new_v3(16, 4096);
        h.header_length = 104;
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), 104);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p.compression_type, CompressionType::Zlib);
        assert_eq!(p, h);
    }

    #[test]
    fn v2_roundtrip() {
        let mut h = Header::new_v3(16, 4096);
        h.version = Version::V2;
        h.header_length = 72;
        let b = h.serialize().unwrap();
        assert_eq!(b.len(), 72);
        assert_eq!(Header::parse(&b).unwrap(), h);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            Header::parse(&[]),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            Header::parse(&[0u8; 112]),
            Err(FormatError::BadMagic { found: 0 })
        ));
        let mut b = Header::new_v3(16, 0).serialize().unwrap();
        b[7] = 4;
        assert!(matches!(
            Header::parse(&b),
            Err(FormatError::UnsupportedVersion { version: 4 })
        ));
        b[7] = 3;
        b[104] = 7;
        assert!(matches!(
            Header::parse(&b),
            Err(FormatError::UnknownCompressionType { value: 7 })
        ));
        b[104] = 0;
        b[103] = 100;
        assert!(matches!(
            Header::parse(&b),
            Err(FormatError::HeaderTooShort { header_length: 100 })
        ));
        b[103] = 200;
        assert!(matches!(
            Header::parse(&b),
            Err(FormatError::Truncated { .. })
        ));
        assert!(matches!(
            Header::parse(&b[..80]),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn peek() {
        let b = Header::new_v3(12, 0).serialize().unwrap();
        assert!(has_qcow2_magic(&b));
        assert!(!has_qcow2_magic(&b[..3]));
        assert_eq!(peek_cluster_bits(&b[..24]).unwrap(), 12);
        assert!(peek_cluster_bits(&b[..23]).is_err());
        assert!(peek_cluster_bits(&[0; 24]).is_err());
    }

    #[test]
    fn features() {
        let f = IncompatibleFeatures(0x21);
        assert!(f.contains(IncompatibleFeatures::DIRTY));
        assert!(!f.contains(IncompatibleFeatures::CORRUPT));
        assert_eq!(f.unknown(), IncompatibleFeatures(0x20));
        assert_eq!(
            f.with(IncompatibleFeatures::DIRTY, false),
            IncompatibleFeatures(0x20)
        );
    }
}
