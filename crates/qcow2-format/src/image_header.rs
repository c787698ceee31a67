//! The whole header cluster: fixed header, header extensions and backing file name, validated
//! with QEMU 10's limits in the order QEMU's `qcow2_do_open` checks them.
//!
//! Spec: `docs/interop/qcow2.txt`, "Header", "Header extensions"; limits from QEMU's
//! `block/qcow2.h` (`QCOW_MAX_L1_SIZE`, `QCOW_MAX_REFTABLE_SIZE`, `QCOW_MAX_SNAPSHOTS`) and
//! `block/qcow2.c`.

use crate::bytes::slice;
use crate::error::{FormatError, Result};
use crate::extensions::{
    parse_extensions, serialize_extensions, ExtensionContext, FeatureKind, FeatureName,
    HeaderExtension, EXT_END, EXT_FEATURE_TABLE, FEATURE_ENTRY_SIZE,
};
use crate::header::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, Header, IncompatibleFeatures, Version,
};
use crate::l1::{L1E_SIZE, MAX_L1_SIZE_BYTES};
use crate::refcount::{RefcountOrder, MAX_REFTABLE_SIZE_BYTES};
use crate::snapshot::{MAX_SNAPSHOTS, SNAPSHOT_HEADER_SIZE};
use crate::types::{Geometry, HostOffset};

/// QEMU's maximum backing file name length.
pub const MAX_BACKING_FILE_NAME: u64 = 1023;

/// The parsed and validated header cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageHeader {
    /// The fixed header fields.
    pub header: Header,
    /// Header extensions in on-disk order (unknown ones included; no end marker).
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, if any (`None` also for an empty name, as QEMU then has no
    /// backing file).
    pub backing_file: Option<String>,
}

/// QEMU's `qcow2_validate_table`.
fn validate_table(
    table: &'static str,
    offset: u64,
    entries: u64,
    entry_size: u64,
    max_bytes: u64,
    geom: Geometry,
) -> Result<()> {
    if entries > max_bytes / entry_size {
        return Err(FormatError::TableTooLarge {
            table,
            entries,
            entry_size,
            max_bytes,
        });
    }
    // entries * entry_size <= max_bytes (<= 64 MiB * 40), no overflow.
    let size = entries * entry_size;
    if (i64::MAX as u64) - size < offset || !geom.is_cluster_aligned(offset) {
        return Err(FormatError::TableOffsetInvalid { table, offset });
    }
    Ok(())
}

/// Scans the extension area for the feature name table without failing (QEMU ignores errors
/// in this scan, which only serves the "unsupported feature" message).
fn scan_feature_table(buf: &[u8], start: u64, end: u64) -> Vec<FeatureName> {
    let mut off = start;
    while off < end {
        let Some(hdr_end) = off.checked_add(8) else {
            break;
        };
        let (Ok(o), Ok(he)) = (usize::try_from(off), usize::try_from(hdr_end)) else {
            break;
        };
        let Some(h) = buf.get(o..he) else {
            break;
        };
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let len = u64::from(u32::from_be_bytes([h[4], h[5], h[6], h[7]]));
        if hdr_end > end || len > end - hdr_end || magic == EXT_END {
            break;
        }
        if magic == EXT_FEATURE_TABLE {
            let data = buf.get(he..).unwrap_or(&[]);
            let data = &data[..data.len().min(len as usize)];
            let mut t = Vec::new();
            for e in data.chunks_exact(FEATURE_ENTRY_SIZE) {
                t.push(FeatureName {
                    kind: FeatureKind::from_value(e[0]),
                    bit: e[1],
                    name: {
                        let n = &e[2..];
                        let n = &n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())];
                        String::from_utf8_lossy(n).into_owned()
                    },
                });
            }
            return t;
        }
        off = hdr_end + ((len + 7) & !7);
    }
    Vec::new()
}

/// Builds the "unsupported features" error as QEMU's `report_unsupported_feature` does: the
/// names of incompatible-feature table entries (up to the first entry with an empty name) whose
/// bits are among `mask`, then the remaining bits as a hex number.
fn unsupported_features(table: &[FeatureName], mask: u64) -> FormatError {
    let mut remaining = mask;
    let mut names = Vec::new();
    for f in table {
        if f.name.is_empty() {
            break;
        }
        if f.kind == FeatureKind::Incompatible && f.bit < 64 && remaining & (1u64 << f.bit) != 0 {
            names.push(f.name.clone());
            remaining &= !(1u64 << f.bit);
        }
    }
    FormatError::UnsupportedIncompatibleFeatures {
        bits: mask,
        names,
        unnamed: remaining,
    }
}

impl ImageHeader {
    /// Parses and validates the header cluster.
    ///
    /// `cluster0` is the first `min(cluster_size, file length)` bytes of the image (at least
    /// [`crate::header::HEADER_MIN_READ`] bytes are needed to learn the cluster size, unless
    /// the file is shorter). Checks, in QEMU's order: magic; version; cluster_bits 9..=21;
    /// header_length (v3 >= 104, <= cluster size); backing_file_offset <= cluster size;
    /// compression type; unknown incompatible bits (named from the feature name table);
    /// subcluster size >= 512; refcount_order <= 6; encryption (refused); refcount table
    /// present, <= 8 MiB, aligned; snapshot table <= 65536 entries, aligned; L1 table <= 32 MiB,
    /// aligned, and covering the virtual size; header extensions (inside the header cluster,
    /// before the backing file name); data-file-raw only with a data file; backing file name
    /// <= 1023 bytes and inside the first cluster.
    pub fn parse(cluster0: &[u8]) -> Result<ImageHeader> {
        let header = Header::parse(cluster0)?;
        let cluster_size = 1u64 << header.cluster_bits;
        let ext_start = header.extensions_offset();
        let ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset
        } else {
            cluster_size
        };

        let unknown = header.incompatible.unknown().0;
        if unknown != 0 {
            let table = scan_feature_table(cluster0, ext_start, ext_end);
            return Err(unsupported_features(&table, unknown));
        }

        let geom = Geometry {
            cluster_bits: header.cluster_bits,
            extended_l2: header
                .incompatible
                .contains(IncompatibleFeatures::EXTENDED_L2),
        };
        if geom.subcluster_size() < 512 {
            return Err(FormatError::UnsupportedSubclusterSize {
                subcluster_size: geom.subcluster_size(),
            });
        }
        RefcountOrder::new(header.refcount_order)?;
        if header.crypt_method != 0 {
            return Err(FormatError::EncryptionUnsupported {
                method: header.crypt_method,
            });
        }
        if header.refcount_table_clusters == 0 {
            return Err(FormatError::NoRefcountTable);
        }
        validate_table(
            "Reference count table",
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_SIZE_BYTES,
            geom,
        )?;
        validate_table(
            "Snapshot table",
            header.snapshots_offset,
            u64::from(header.nb_snapshots),
            SNAPSHOT_HEADER_SIZE,
            SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
            geom,
        )?;
        validate_table(
            "Active L1 table",
            header.l1_table_offset,
            u64::from(header.l1_size),
            L1E_SIZE,
            MAX_L1_SIZE_BYTES,
            geom,
        )?;
        let needed = geom.l1_entries_for(header.size)?;
        if u64::from(header.l1_size) < needed {
            return Err(FormatError::L1TooSmall {
                l1_size: u64::from(header.l1_size),
                needed,
            });
        }

        let ctx = ExtensionContext {
            cluster_size,
            crypt_method: header.crypt_method,
            autoclear_bitmaps: header.autoclear.contains(AutoclearFeatures::BITMAPS),
        };
        let extensions = parse_extensions(cluster0, ext_start, ext_end, &ctx)?;

        if !header
            .incompatible
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
            && header.autoclear.contains(AutoclearFeatures::RAW_EXTERNAL)
        {
            return Err(FormatError::DataFileRawWithoutDataFile);
        }

        let mut backing_file = None;
        if header.backing_file_offset != 0 {
            let len = u64::from(header.backing_file_size);
            // backing_file_offset <= cluster_size was checked by Header::parse.
            let max = MAX_BACKING_FILE_NAME.min(cluster_size - header.backing_file_offset);
            if len > max {
                return Err(FormatError::BackingFileNameTooLong {
                    len,
                    offset: header.backing_file_offset,
                    max,
                });
            }
            // Both values are <= cluster size (2 MiB) here.
            let raw = slice(
                cluster0,
                header.backing_file_offset as usize,
                len as usize,
                "backing file name",
            )?;
            let raw = &raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())];
            let name = String::from_utf8(raw.to_vec()).map_err(|_| FormatError::InvalidUtf8 {
                what: "backing file name",
            })?;
            if !name.is_empty() {
                backing_file = Some(name);
            }
        }

        Ok(ImageHeader {
            header,
            extensions,
            backing_file,
        })
    }

    /// Serialises the header cluster as QEMU's `qcow2_update_header` lays it out: the fixed
    /// header, the extensions in `self.extensions` order, the end marker, then the backing file
    /// name; `backing_file_offset`/`backing_file_size` are set accordingly. The result is
    /// exactly `cluster_size` bytes (zero-padded).
    ///
    /// Errors when `cluster_size` is not `1 << header.cluster_bits` (9..=21), when the result
    /// does not fit in one cluster, the name is over 1023 bytes, or a part cannot be serialised.
    pub fn serialize(&self, cluster_size: u64) -> Result<Vec<u8>> {
        let err = |detail: String| FormatError::Serialize {
            what: "header cluster",
            detail,
        };
        let geom = Geometry::new(self.header.cluster_bits, false)?;
        if cluster_size != geom.cluster_size() {
            return Err(err(format!(
                "cluster size {cluster_size} does not match cluster_bits {}",
                self.header.cluster_bits
            )));
        }
        let mut h = self.header.clone();
        let name = self.backing_file.as_deref().unwrap_or("");
        if name.len() as u64 > MAX_BACKING_FILE_NAME {
            return Err(err(format!(
                "backing file name of {} bytes is longer than {MAX_BACKING_FILE_NAME}",
                name.len()
            )));
        }
        let exts = serialize_extensions(&self.extensions)?;
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
        let fixed_len = h.serialize()?.len();
        let name_off = fixed_len + exts.len();
        if !name.is_empty() {
            h.backing_file_offset = name_off as u64;
            // name.len() <= 1023 checked above.
            h.backing_file_size = name.len() as u32;
        }
        let total = name_off + name.len();
        if total as u64 > cluster_size {
            return Err(err(format!(
                "header, extensions and backing file name need {total} bytes, cluster size is {cluster_size}"
            )));
        }
        let mut v = h.serialize()?;
        v.extend_from_slice(&exts);
        v.extend_from_slice(name.as_bytes());
        // cluster_size is 512 B..=2 MiB (checked above).
        v.resize(cluster_size as usize, 0);
        Ok(v)
    }

    /// Format version.
    pub fn version(&self) -> Version {
        self.header.version
    }

    /// Cluster geometry (cluster size and extended L2).
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.header.cluster_bits,
            extended_l2: self
                .header
                .incompatible
                .contains(IncompatibleFeatures::EXTENDED_L2),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geometry().cluster_size()
    }

    /// Virtual disk size in bytes, as stored.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Offset of the active L1 table.
    pub fn l1_table_offset(&self) -> HostOffset {
        HostOffset(self.header.l1_table_offset)
    }

    /// Number of active L1 entries.
    pub fn l1_size(&self) -> u64 {
        u64::from(self.header.l1_size)
    }

    /// Size of the active L1 table in bytes (at most 32 MiB after validation).
    pub fn l1_table_bytes(&self) -> u64 {
        u64::from(self.header.l1_size).saturating_mul(L1E_SIZE)
    }

    /// Offset of the refcount table.
    pub fn refcount_table_offset(&self) -> HostOffset {
        HostOffset(self.header.refcount_table_offset)
    }

    /// Size of the refcount table in bytes (at most 8 MiB after validation).
    pub fn refcount_table_bytes(&self) -> u64 {
        u64::from(self.header.refcount_table_clusters).saturating_mul(self.cluster_size())
    }

    /// The backing file name.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }

    /// The backing file format from the backing-format extension (the last one, as QEMU).
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|e| match e {
            HeaderExtension::BackingFormat(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The external data file name, when the image has an external data file (incompatible
    /// bit 2) and records its name. QEMU ignores the name without the bit.
    pub fn data_file(&self) -> Option<&str> {
        if !self.has_data_file() {
            return None;
        }
        self.extensions.iter().rev().find_map(|e| match e {
            HeaderExtension::ExternalDataFile(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The feature name table, if present.
    pub fn feature_table(&self) -> Option<&[FeatureName]> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::FeatureNameTable(t) => Some(t.as_slice()),
            _ => None,
        })
    }

    /// The bitmaps extension as (nb_bitmaps, directory size, directory offset), if present.
    pub fn bitmaps(&self) -> Option<(u32, u64, u64)> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps {
                nb_bitmaps,
                bitmap_directory_size,
                bitmap_directory_offset,
            } => Some((
                *nb_bitmaps,
                *bitmap_directory_size,
                *bitmap_directory_offset,
            )),
            _ => None,
        })
    }

    /// Compression type of compressed clusters.
    pub fn compression_type(&self) -> CompressionType {
        self.header.compression_type
    }

    /// Incompatible bit 0: refcounts may be stale (lazy refcounts in use).
    pub fn is_dirty(&self) -> bool {
        self.header
            .incompatible
            .contains(IncompatibleFeatures::DIRTY)
    }

    /// Incompatible bit 1: the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.header
            .incompatible
            .contains(IncompatibleFeatures::CORRUPT)
    }

    /// Incompatible bit 2: guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.header
            .incompatible
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    /// Autoclear bit 1: the external data file is kept a valid raw image.
    pub fn data_file_raw(&self) -> bool {
        self.header
            .autoclear
            .contains(AutoclearFeatures::RAW_EXTERNAL)
    }

    /// Compatible bit 0: lazy refcounts.
    pub fn lazy_refcounts(&self) -> bool {
        self.header
            .compatible
            .contains(CompatibleFeatures::LAZY_REFCOUNTS)
    }

    /// Incompatible bit 4: extended L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.header
            .incompatible
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    /// The refcount order.
    pub fn refcount_order(&self) -> RefcountOrder {
        RefcountOrder(self.header.refcount_order)
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        self.refcount_order().refcount_bits()
    }
}
