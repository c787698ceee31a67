//! The error type of the format crate.
//!
//! Every variant says which structure or field was wrong, the value found and what was expected.
//! Where QEMU has a well-known message for the same condition (`block/qcow2.c`, `qcow2_do_open`),
//! the message starts with QEMU's wording so that users and scripts recognise it.

use thiserror::Error;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, FormatError>;

/// An error found while parsing, validating or serialising qcow2 on-disk structures.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The first four bytes are not `QFI\xfb`.
    #[error("Image is not in qcow2 format (magic {found:#010x}, expected 0x514649fb)")]
    BadMagic {
        /// The magic found at offset 0.
        found: u32,
    },
    /// The version field is neither 2 nor 3.
    #[error("Unsupported qcow2 version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// `cluster_bits` is outside 9..=21.
    #[error("Unsupported cluster size: 2^{cluster_bits} (cluster_bits must be 9..=21)")]
    UnsupportedClusterSize {
        /// The cluster_bits found.
        cluster_bits: u32,
    },
    /// A structure ends beyond the bytes that were available.
    #[error("{what} truncated: need {needed} bytes, got {got}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed (`u64::MAX` when the needed size overflows).
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// A field has a value outside what the specification or QEMU allows.
    #[error("invalid {field}: found {value:#x}, expected {expected}")]
    InvalidField {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u64,
        /// What was expected.
        expected: String,
    },
    /// v3 `header_length` below 104.
    #[error("qcow2 header too short: header_length {header_length}, expected at least 104")]
    HeaderTooShort {
        /// header_length found.
        header_length: u32,
    },
    /// `header_length` larger than one cluster.
    #[error("qcow2 header exceeds cluster size: header_length {header_length} > cluster size {cluster_size}")]
    HeaderExceedsCluster {
        /// header_length found.
        header_length: u32,
        /// The cluster size.
        cluster_size: u64,
    },
    /// `backing_file_offset` beyond the first cluster.
    #[error("Invalid backing file offset {offset:#x} (must be within the first cluster of {cluster_size} bytes)")]
    InvalidBackingFileOffset {
        /// backing_file_offset found.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The compression type byte holds an unknown value.
    #[error("qcow2: unknown compression type: {value} (expected 0 = zlib or 1 = zstd)")]
    UnknownCompressionType {
        /// Value found at header offset 104.
        value: u8,
    },
    /// The compression-type incompatible bit disagrees with the compression type.
    #[error("qcow2: Compression type incompatible feature bit {} (compression type {compression_type})", if *.must_be_set { "must be set" } else { "must not be set" })]
    CompressionTypeBitMismatch {
        /// Whether the bit must be set (zstd) or must be clear (zlib).
        must_be_set: bool,
        /// The compression type value.
        compression_type: u8,
    },
    /// Unknown incompatible feature bits are set.
    #[error("Unsupported qcow2 feature(s): {}", format_features(names, *.unnamed))]
    UnsupportedIncompatibleFeatures {
        /// All unknown incompatible bits.
        bits: u64,
        /// Names of those bits found in the feature name table, in table order.
        names: Vec<String>,
        /// The unknown bits that have no name in the feature name table.
        unnamed: u64,
    },
    /// Extended L2 entries with a cluster size that gives subclusters below 512 bytes.
    #[error("Unsupported subcluster size: {subcluster_size} (extended L2 needs clusters of at least 16 KiB)")]
    UnsupportedSubclusterSize {
        /// The resulting subcluster size.
        subcluster_size: u64,
    },
    /// `refcount_order` above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits (refcount_order {order}, max 6)")]
    RefcountOrderTooLarge {
        /// refcount_order found.
        order: u32,
    },
    /// The image is encrypted; this engine does not support encryption yet.
    #[error("encrypted qcow2 images are not supported (crypt_method {method}: {})", crypt_name(*.method))]
    EncryptionUnsupported {
        /// crypt_method found (1 = AES, 2 = LUKS).
        method: u32,
    },
    /// The image has no refcount table.
    #[error("Image does not contain a reference count table (refcount_table_clusters is 0)")]
    NoRefcountTable,
    /// A metadata table is larger than QEMU's limit.
    #[error("{table} too large: {entries} entries of {entry_size} bytes, limit {max_bytes} bytes")]
    TableTooLarge {
        /// "Active L1 table", "Reference count table" or "Snapshot table".
        table: &'static str,
        /// Number of entries (or clusters for the refcount table).
        entries: u64,
        /// Size of one entry in bytes.
        entry_size: u64,
        /// QEMU's limit in bytes.
        max_bytes: u64,
    },
    /// A metadata table offset is unaligned or the table would end beyond 2^63.
    #[error("{table} offset invalid: {offset:#x} (must be cluster-aligned and the table must end below 2^63)")]
    TableOffsetInvalid {
        /// Name of the table.
        table: &'static str,
        /// The offset found.
        offset: u64,
    },
    /// The virtual size needs more than `i32::MAX` L1 entries.
    #[error(
        "Image is too big: virtual size {size} needs {l1_entries} L1 entries (max 2147483647)"
    )]
    ImageTooBig {
        /// Virtual size in bytes.
        size: u64,
        /// Number of L1 entries that size needs.
        l1_entries: u64,
    },
    /// The L1 table does not cover the virtual size.
    #[error("L1 table is too small: l1_size {l1_size}, virtual size needs {needed}")]
    L1TooSmall {
        /// l1_size found.
        l1_size: u64,
        /// Entries needed to cover the virtual size.
        needed: u64,
    },
    /// More snapshots than QEMU allows (65536).
    #[error("Too many snapshots: {count} (max 65536)")]
    TooManySnapshots {
        /// nb_snapshots found.
        count: u64,
    },
    /// A header extension's length runs past the end of the extension area.
    #[error("Header extension too large: extension {magic:#010x} at offset {offset} has length {len}, but the extension area ends at {end}")]
    HeaderExtensionTooLarge {
        /// Extension magic.
        magic: u32,
        /// Byte offset of the extension header in the image.
        offset: u64,
        /// Length field found.
        len: u64,
        /// End of the extension area.
        end: u64,
    },
    /// A known header extension has invalid contents.
    #[error("invalid header extension {magic:#010x} at offset {offset}: {detail}")]
    InvalidHeaderExtension {
        /// Extension magic.
        magic: u32,
        /// Byte offset of the extension header in the image.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The backing file name is longer than QEMU allows or leaves the first cluster.
    #[error("Backing file name too long: {len} bytes at offset {offset} (max {max})")]
    BackingFileNameTooLong {
        /// backing_file_size found.
        len: u64,
        /// backing_file_offset found.
        offset: u64,
        /// The limit that applied.
        max: u64,
    },
    /// A name stored in the image is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which name.
        what: &'static str,
    },
    /// The external-data-file incompatible bit is set but no data file name is recorded.
    #[error("'data-file' is required for this image (incompatible bit 2 set, no external data file name extension)")]
    DataFileRequired,
    /// The raw-external-data autoclear bit is set without an external data file.
    #[error("data-file-raw requires a data file (autoclear bit 1 set without incompatible bit 2)")]
    DataFileRawWithoutDataFile,
    /// An L1 entry is invalid.
    #[error("invalid L1 entry {raw:#018x}: {detail}")]
    InvalidL1Entry {
        /// The raw entry.
        raw: u64,
        /// What is wrong.
        detail: String,
    },
    /// An L2 entry is invalid.
    #[error("invalid L2 entry {raw:#018x}: {detail}")]
    InvalidL2Entry {
        /// The raw entry.
        raw: u64,
        /// What is wrong.
        detail: String,
    },
    /// An extended L2 entry's subcluster bitmap is invalid (QEMU's QCOW2_SUBCLUSTER_INVALID).
    #[error("invalid subcluster bitmap {bitmap:#018x} for L2 entry {raw:#018x}: {detail}")]
    InvalidSubclusterBitmap {
        /// The raw L2 entry.
        raw: u64,
        /// The raw bitmap.
        bitmap: u64,
        /// What is wrong.
        detail: &'static str,
    },
    /// A refcount table entry is invalid.
    #[error("invalid refcount table entry {raw:#018x}: {detail}")]
    InvalidRefcountTableEntry {
        /// The raw entry.
        raw: u64,
        /// What is wrong.
        detail: String,
    },
    /// A refcount value does not fit the refcount width.
    #[error("refcount {value} does not fit in {bits} bits")]
    RefcountOverflow {
        /// The value.
        value: u64,
        /// The refcount width in bits.
        bits: u32,
    },
    /// An index is out of range for a table or block.
    #[error("{what} index {index} out of range (len {len})")]
    IndexOutOfRange {
        /// Which table.
        what: &'static str,
        /// The index.
        index: u64,
        /// Number of entries.
        len: u64,
    },
    /// Compressed data could not be decompressed into a whole cluster.
    #[error("{algorithm} decompression failed: {detail}")]
    Decompression {
        /// "zlib" or "zstd".
        algorithm: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Compression failed.
    #[error("{algorithm} compression failed: {detail}")]
    Compression {
        /// "zlib" or "zstd".
        algorithm: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A snapshot table entry is invalid.
    #[error("snapshot table entry {index}: {detail}")]
    InvalidSnapshot {
        /// Index of the entry.
        index: u64,
        /// What is wrong.
        detail: String,
    },
    /// Too much extra data in a snapshot table entry (QEMU: at most 1024 bytes).
    #[error("Too much extra metadata in snapshot table entry {index}: {size} bytes (max 1024)")]
    SnapshotExtraDataTooLarge {
        /// Index of the entry.
        index: u64,
        /// extra_data_size found.
        size: u64,
    },
    /// The snapshot table is larger than QEMU's 64 MiB limit.
    #[error("Snapshot table is too big: {size} bytes (max {max})")]
    SnapshotTableTooBig {
        /// Size reached.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A structure cannot be serialised as given.
    #[error("cannot serialize {what}: {detail}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// Why it cannot be.
        detail: String,
    },
}

/// Formats the feature list as QEMU's `report_unsupported_feature` does.
fn format_features(names: &[String], unnamed: u64) -> String {
    let mut out = names.join(", ");
    if unnamed != 0 {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&format!("Unknown incompatible feature: {unnamed:x}"));
    }
    out
}

fn crypt_name(method: u32) -> &'static str {
    match method {
        1 => "AES",
        2 => "LUKS",
        _ => "unknown method",
    }
}
