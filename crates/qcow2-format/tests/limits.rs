//! Every header limit violation gives the right typed error (and QEMU's wording).

use qcow2_format::extensions::{FeatureKind, FeatureName, HeaderExtension};
use qcow2_format::header::{
    AutoclearFeatures, CompressionType, Header, IncompatibleFeatures, Version,
};
use qcow2_format::image_header::ImageHeader;
use qcow2_format::FormatError;

const CS: u64 = 65536;

fn valid_header() -> ImageHeader {
    let mut h = Header::new_v3(16, 1 << 30);
    h.refcount_table_offset = CS;
    h.refcount_table_clusters = 1;
    h.l1_table_offset = 3 * CS;
    h.l1_size = 2;
    ImageHeader {
        header: h,
        extensions: vec![HeaderExtension::BackingFormat("qcow2".into())],
        backing_file: Some("base.qcow2".into()),
    }
}

fn bytes(h: &ImageHeader) -> Vec<u8> {
    h.serialize(CS).unwrap()
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn err_of(b: &[u8]) -> FormatError {
    ImageHeader::parse(b).expect_err("must be refused")
}

#[test]
fn valid_roundtrip() {
    let h = valid_header();
    let b = bytes(&h);
    assert_eq!(b.len(), CS as usize);
    let p = ImageHeader::parse(&b).unwrap();
    assert_eq!(p.backing_file(), Some("base.qcow2"));
    assert_eq!(p.backing_format(), Some("qcow2"));
    assert_eq!(p.extensions, h.extensions);
    assert_eq!(p.serialize(CS).unwrap(), b);
    // A file shorter than a cluster is fine: missing bytes read as the end of extensions.
    let short = &b[..p.header.backing_file_offset as usize + 10];
    assert_eq!(ImageHeader::parse(short).unwrap(), p);
}

#[test]
fn magic_and_version() {
    let mut b = bytes(&valid_header());
    b[0] = b'X';
    let e = err_of(&b);
    assert!(matches!(e, FormatError::BadMagic { .. }));
    assert!(e.to_string().starts_with("Image is not in qcow2 format"));
    for v in [0u32, 1, 4, u32::MAX] {
        let mut b = bytes(&valid_header());
        put32(&mut b, 4, v);
        let e = err_of(&b);
        assert_eq!(e, FormatError::UnsupportedVersion { version: v });
        assert!(e
            .to_string()
            .starts_with(&format!("Unsupported qcow2 version {v}")));
    }
}

#[test]
fn truncated_and_empty() {
    assert!(matches!(err_of(&[]), FormatError::Truncated { .. }));
    let b = bytes(&valid_header());
    assert!(matches!(err_of(&b[..50]), FormatError::Truncated { .. }));
    assert!(matches!(err_of(&b[..103]), FormatError::Truncated { .. }));
}

#[test]
fn cluster_bits() {
    for cb in [0u32, 8, 22, 64, u32::MAX] {
        let mut b = bytes(&valid_header());
        put32(&mut b, 20, cb);
        let e = err_of(&b);
        assert_eq!(e, FormatError::UnsupportedClusterSize { cluster_bits: cb });
        assert!(e.to_string().starts_with("Unsupported cluster size: 2^"));
    }
}

#[test]
fn header_length() {
    let mut b = bytes(&valid_header());
    put32(&mut b, 100, 103);
    let e = err_of(&b);
    assert_eq!(e, FormatError::HeaderTooShort { header_length: 103 });
    assert!(e.to_string().starts_with("qcow2 header too short"));
    put32(&mut b, 100, CS as u32 + 8);
    let e = err_of(&b);
    assert!(matches!(e, FormatError::HeaderExceedsCluster { .. }));
    assert!(e
        .to_string()
        .starts_with("qcow2 header exceeds cluster size"));
    put32(&mut b, 100, u32::MAX);
    assert!(matches!(
        err_of(&b),
        FormatError::HeaderExceedsCluster { .. }
    ));
}

#[test]
fn backing_file_offset_and_name() {
    let mut b = bytes(&valid_header());
    put64(&mut b, 8, CS + 1);
    let e = err_of(&b);
    assert!(matches!(e, FormatError::InvalidBackingFileOffset { .. }));
    assert!(e.to_string().starts_with("Invalid backing file offset"));

    let mut b = bytes(&valid_header());
    put32(&mut b, 16, 1024);
    let e = err_of(&b);
    assert!(matches!(
        e,
        FormatError::BackingFileNameTooLong { len: 1024, .. }
    ));
    assert!(e.to_string().starts_with("Backing file name too long"));

    // A name running past the first cluster.
    let mut b = bytes(&valid_header());
    put64(&mut b, 8, CS - 10);
    put32(&mut b, 16, 20);
    assert!(matches!(
        err_of(&b),
        FormatError::BackingFileNameTooLong { max: 10, .. }
    ));

    // 1023 bytes is fine.
    let mut h = valid_header();
    h.backing_file = Some("b".repeat(1023));
    let p = ImageHeader::parse(&bytes(&h)).unwrap();
    assert_eq!(p.backing_file().map(str::len), Some(1023));
    h.backing_file = Some("b".repeat(1024));
    assert!(h.serialize(CS).is_err());
}

#[test]
fn compression_type() {
    let mut h = valid_header();
    h.header.compression_type = CompressionType::Zstd;
    h.header.incompatible = IncompatibleFeatures::COMPRESSION_TYPE;
    let mut b = bytes(&h);
    assert_eq!(
        ImageHeader::parse(&b).unwrap().compression_type(),
        CompressionType::Zstd
    );
    b[104] = 2;
    let e = err_of(&b);
    assert_eq!(e, FormatError::UnknownCompressionType { value: 2 });
    assert!(e
        .to_string()
        .starts_with("qcow2: unknown compression type: 2"));
    b[104] = 1;
    put64(&mut b, 72, 0);
    let e = err_of(&b);
    assert!(e
        .to_string()
        .starts_with("qcow2: Compression type incompatible feature bit must be set"));
    b[104] = 0;
    put64(&mut b, 72, IncompatibleFeatures::COMPRESSION_TYPE.0);
    let e = err_of(&b);
    assert!(e
        .to_string()
        .starts_with("qcow2: Compression type incompatible feature bit must not be set"));
}

#[test]
fn unknown_incompatible_features() {
    let mut b = bytes(&valid_header());
    put64(&mut b, 72, 1 << 5);
    let e = err_of(&b);
    assert_eq!(
        e.to_string(),
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"
    );

    let mut h = valid_header();
    h.extensions.push(HeaderExtension::FeatureNameTable(vec![
        FeatureName {
            kind: FeatureKind::Compatible,
            bit: 5,
            name: "not me".into(),
        },
        FeatureName {
            kind: FeatureKind::Incompatible,
            bit: 5,
            name: "shiny feature".into(),
        },
        FeatureName {
            kind: FeatureKind::Incompatible,
            bit: 200,
            name: "bit out of range".into(),
        },
    ]));
    let mut b = bytes(&h);
    put64(&mut b, 72, (1 << 5) | (1 << 6) | 1);
    let e = err_of(&b);
    assert_eq!(
        e,
        FormatError::UnsupportedIncompatibleFeatures {
            bits: 0x60,
            names: vec!["shiny feature".into()],
            unnamed: 0x40,
        }
    );
    assert_eq!(
        e.to_string(),
        "Unsupported qcow2 feature(s): shiny feature, Unknown incompatible feature: 40"
    );
}

#[test]
fn subcluster_size() {
    let mut h = valid_header();
    h.header.cluster_bits = 13;
    h.header.incompatible = IncompatibleFeatures::EXTENDED_L2;
    h.header.l1_size = 1024;
    h.header.refcount_table_offset = 8192;
    h.header.l1_table_offset = 3 * 8192;
    h.backing_file = None;
    let b = h.serialize(8192).unwrap();
    let e = err_of(&b);
    assert_eq!(
        e,
        FormatError::UnsupportedSubclusterSize {
            subcluster_size: 256
        }
    );
    assert!(e
        .to_string()
        .starts_with("Unsupported subcluster size: 256"));
}

#[test]
fn refcount_order() {
    let mut b = bytes(&valid_header());
    put32(&mut b, 96, 7);
    let e = err_of(&b);
    assert_eq!(e, FormatError::RefcountOrderTooLarge { order: 7 });
    assert!(e
        .to_string()
        .starts_with("Reference count entry width too large; may not exceed 64 bits"));
    for o in 0..=6 {
        put32(&mut b, 96, o);
        assert_eq!(ImageHeader::parse(&b).unwrap().refcount_bits(), 1 << o);
    }
}

#[test]
fn encryption_refused() {
    for m in [1u32, 2, 3] {
        let mut b = bytes(&valid_header());
        put32(&mut b, 32, m);
        let e = err_of(&b);
        assert_eq!(e, FormatError::EncryptionUnsupported { method: m });
        assert!(e.to_string().contains("not supported"));
    }
}

#[test]
fn refcount_table() {
    let mut b = bytes(&valid_header());
    put32(&mut b, 56, 0);
    let e = err_of(&b);
    assert_eq!(e, FormatError::NoRefcountTable);
    assert!(e
        .to_string()
        .starts_with("Image does not contain a reference count table"));

    put32(&mut b, 56, (8 << 20) / CS as u32);
    assert!(ImageHeader::parse(&b).is_ok());
    put32(&mut b, 56, (8 << 20) / CS as u32 + 1);
    let e = err_of(&b);
    assert!(matches!(
        e,
        FormatError::TableTooLarge {
            table: "Reference count table",
            ..
        }
    ));
    assert!(e.to_string().starts_with("Reference count table too large"));

    let mut b = bytes(&valid_header());
    put64(&mut b, 48, CS + 512);
    let e = err_of(&b);
    assert!(matches!(
        e,
        FormatError::TableOffsetInvalid {
            table: "Reference count table",
            ..
        }
    ));
    assert!(e
        .to_string()
        .starts_with("Reference count table offset invalid"));
    put64(&mut b, 48, (i64::MAX as u64) & !(CS - 1));
    assert!(matches!(err_of(&b), FormatError::TableOffsetInvalid { .. }));
    put64(&mut b, 48, !(CS - 1));
    assert!(matches!(err_of(&b), FormatError::TableOffsetInvalid { .. }));
}

#[test]
fn snapshot_table() {
    let mut b = bytes(&valid_header());
    put32(&mut b, 60, 65536);
    put64(&mut b, 64, 10 * CS);
    assert!(ImageHeader::parse(&b).is_ok());
    put32(&mut b, 60, 65537);
    let e = err_of(&b);
    assert!(matches!(
        e,
        FormatError::TableTooLarge {
            table: "Snapshot table",
            ..
        }
    ));
    assert!(e.to_string().starts_with("Snapshot table too large"));
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 10 * CS + 8);
    let e = err_of(&b);
    assert!(e.to_string().starts_with("Snapshot table offset invalid"));
}

#[test]
fn l1_table() {
    let mut b = bytes(&valid_header());
    put32(&mut b, 36, (32 << 20) / 8 + 1);
    let e = err_of(&b);
    assert!(matches!(
        e,
        FormatError::TableTooLarge {
            table: "Active L1 table",
            ..
        }
    ));
    assert!(e.to_string().starts_with("Active L1 table too large"));

    let mut b = bytes(&valid_header());
    put64(&mut b, 40, 3 * CS + 8);
    let e = err_of(&b);
    assert!(e.to_string().starts_with("Active L1 table offset invalid"));

    let mut b = bytes(&valid_header());
    put32(&mut b, 36, 1);
    let e = err_of(&b);
    assert_eq!(
        e,
        FormatError::L1TooSmall {
            l1_size: 1,
            needed: 2
        }
    );
    assert!(e.to_string().starts_with("L1 table is too small"));

    let mut b = bytes(&valid_header());
    put32(&mut b, 20, 9);
    put32(&mut b, 100, 104);
    put64(&mut b, 8, 0);
    put64(&mut b, 24, 1 << 62);
    put64(&mut b, 48, 512);
    put64(&mut b, 40, 1024);
    let e = err_of(&b[..512]);
    assert!(matches!(e, FormatError::ImageTooBig { .. }), "{e:?}");
    assert!(e.to_string().starts_with("Image is too big"));
}

#[test]
fn extensions() {
    // Extension length running past the extension area.
    let mut b = bytes(&valid_header());
    put32(&mut b, 116, 0x7fff_ffff);
    let e = err_of(&b);
    assert!(matches!(e, FormatError::HeaderExtensionTooLarge { .. }));
    assert!(e.to_string().starts_with("Header extension too large"));

    let mut h = valid_header();
    h.extensions = vec![HeaderExtension::BackingFormat("x".repeat(16))];
    assert!(matches!(
        err_of(&bytes(&h)),
        FormatError::InvalidHeaderExtension { .. }
    ));

    // Bitmaps extension: validated only with the autoclear bit set.
    let mut h = valid_header();
    h.extensions = vec![HeaderExtension::Bitmaps {
        nb_bitmaps: 0,
        bitmap_directory_size: 0,
        bitmap_directory_offset: 0,
    }];
    assert!(ImageHeader::parse(&bytes(&h)).is_ok());
    h.header.autoclear = AutoclearFeatures::BITMAPS;
    let e = err_of(&bytes(&h));
    assert!(e
        .to_string()
        .contains("found bitmaps extension with zero bitmaps"));

    let mut h = valid_header();
    h.extensions = vec![HeaderExtension::FullDiskEncryption {
        offset: CS,
        length: 4096,
    }];
    let e = err_of(&bytes(&h));
    assert!(e
        .to_string()
        .contains("CRYPTO header extension only expected with LUKS"));

    let mut h = valid_header();
    h.extensions = vec![HeaderExtension::Unknown {
        magic: 0xdead_beef,
        data: vec![1, 2, 3, 4, 5],
    }];
    let p = ImageHeader::parse(&bytes(&h)).unwrap();
    assert_eq!(p.extensions, h.extensions);
    assert_eq!(p.serialize(CS).unwrap(), bytes(&h));
}

#[test]
fn data_file() {
    let mut h = valid_header();
    h.backing_file = None;
    h.extensions = vec![HeaderExtension::ExternalDataFile("data.raw".into())];
    let p = ImageHeader::parse(&bytes(&h)).unwrap();
    // Without the incompatible bit QEMU ignores the name.
    assert_eq!(p.data_file(), None);
    h.header.incompatible = IncompatibleFeatures::EXTERNAL_DATA_FILE;
    h.header.autoclear = AutoclearFeatures::RAW_EXTERNAL;
    let p = ImageHeader::parse(&bytes(&h)).unwrap();
    assert_eq!(p.data_file(), Some("data.raw"));
    assert!(p.has_data_file() && p.data_file_raw());
    h.header.incompatible = IncompatibleFeatures(0);
    let e = err_of(&bytes(&h));
    assert_eq!(e, FormatError::DataFileRawWithoutDataFile);
    assert!(e
        .to_string()
        .starts_with("data-file-raw requires a data file"));
}

#[test]
fn v2_header() {
    let mut h = valid_header();
    h.header.version = Version::V2;
    h.header.header_length = 72;
    let b = bytes(&h);
    let p = ImageHeader::parse(&b).unwrap();
    assert_eq!(p.version(), Version::V2);
    assert_eq!(p.refcount_bits(), 16);
    assert_eq!(p.backing_format(), Some("qcow2"));
    assert_eq!(p.backing_file(), Some("base.qcow2"));
    assert_eq!(p.serialize(CS).unwrap(), b);
}
