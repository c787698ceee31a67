//! Property tests: serialize -> parse is the identity, and no parser panics on arbitrary or
//! mutated bytes.

use proptest::prelude::*;
use qcow2_format::compressed::{decompress, CompressedDescriptor};
use qcow2_format::extensions::{FeatureKind, FeatureName, HeaderExtension};
use qcow2_format::header::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, Header, IncompatibleFeatures, Version,
};
use qcow2_format::image_header::ImageHeader;
use qcow2_format::l1::L1Entry;
use qcow2_format::l2::{
    decode_l2, decode_l2_with, encode_l2, subcluster_state, L2Entry, SubclusterBitmap,
};
use qcow2_format::refcount::{get_refcount, set_refcount, RefcountOrder};
use qcow2_format::snapshot::{parse_snapshot_table, serialize_snapshot_table, Snapshot};
use qcow2_format::types::{Geometry, HostOffset};

fn name_str(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9_./ -]{{1,{max}}}")).unwrap()
}

fn extension(cluster_size: u64, bitmaps_ok: bool) -> impl Strategy<Value = HeaderExtension> {
    let feature = (0u8..4, any::<u8>(), name_str(46)).prop_map(|(k, bit, name)| FeatureName {
        kind: FeatureKind::from_value(k),
        bit,
        name,
    });
    let bitmaps = (1u32..=65535, 0u64..=1024 * 65535, 0u64..1 << 20).prop_map(
        move |(nb_bitmaps, bitmap_directory_size, off)| HeaderExtension::Bitmaps {
            nb_bitmaps,
            bitmap_directory_size,
            bitmap_directory_offset: off * cluster_size,
        },
    );
    let unknown = (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_filter_map(
        "known magic",
        |(magic, data)| {
            let known = [
                0,
                0xe279_2aca,
                0x6803_f857,
                0x2385_2875,
                0x0537_be77,
                0x4441_5441,
            ];
            (!known.contains(&magic)).then_some(HeaderExtension::Unknown { magic, data })
        },
    );
    let mut choices: Vec<BoxedStrategy<HeaderExtension>> = vec![
        name_str(15)
            .prop_map(HeaderExtension::BackingFormat)
            .boxed(),
        proptest::collection::vec(feature, 0..6)
            .prop_map(HeaderExtension::FeatureNameTable)
            .boxed(),
        name_str(60)
            .prop_map(HeaderExtension::ExternalDataFile)
            .boxed(),
        unknown.boxed(),
    ];
    if bitmaps_ok {
        choices.push(bitmaps.boxed());
    }
    proptest::strategy::Union::new(choices)
}

prop_compose! {
    fn image_header()(
        cluster_bits in 9u32..=21,
        v3 in any::<bool>(),
        ext_l2 in any::<bool>(),
        zstd in any::<bool>(),
        dirty in any::<bool>(),
        corrupt in any::<bool>(),
        data_file in any::<bool>(),
        raw in any::<bool>(),
        lazy in any::<bool>(),
        bitmaps in any::<bool>(),
        refcount_order in 0u32..=6,
        trailing in proptest::collection::vec(any::<u8>(), 0..24),
        short_header in any::<bool>(),
        l1_size in 0u32..5000,
        size_frac in 0u64..=1000,
        offs in (1u64..1000, 1u64..1000, 0u64..1000, 1u32..4, 0u32..100),
        backing in proptest::option::of(name_str(200)),
        seed_exts in any::<u64>(),
    )(
        exts in proptest::collection::vec(extension(1 << cluster_bits, v3 && bitmaps), 0..4),
        cluster_bits in Just(cluster_bits), v3 in Just(v3), ext_l2 in Just(ext_l2), zstd in Just(zstd),
        dirty in Just(dirty), corrupt in Just(corrupt), data_file in Just(data_file), raw in Just(raw),
        lazy in Just(lazy), bitmaps in Just(bitmaps), refcount_order in Just(refcount_order),
        trailing in Just(trailing), short_header in Just(short_header), l1_size in Just(l1_size),
        size_frac in Just(size_frac), offs in Just(offs), backing in Just(backing), _s in Just(seed_exts),
    ) -> ImageHeader {
        let cs = 1u64 << cluster_bits;
        let ext_l2 = ext_l2 && v3 && cluster_bits >= 14;
        let g = Geometry { cluster_bits, extended_l2: ext_l2 };
        let max_size = u64::from(l1_size) * g.l1_entry_coverage();
        let mut h = Header::new_v3(cluster_bits, max_size / 1000 * size_frac);
        h.l1_size = l1_size;
        h.refcount_table_offset = offs.0 * cs;
        h.l1_table_offset = offs.1 * cs;
        h.snapshots_offset = offs.2 * cs;
        h.refcount_table_clusters = offs.3;
        h.nb_snapshots = offs.4;
        if v3 {
            let mut inc = IncompatibleFeatures(0);
            inc = inc.with(IncompatibleFeatures::DIRTY, dirty)
                .with(IncompatibleFeatures::CORRUPT, corrupt)
                .with(IncompatibleFeatures::EXTERNAL_DATA_FILE, data_file)
                .with(IncompatibleFeatures::EXTENDED_L2, ext_l2);
            let zstd = zstd && !short_header;
            if zstd {
                inc = inc | IncompatibleFeatures::COMPRESSION_TYPE;
                h.compression_type = CompressionType::Zstd;
            }
            h.incompatible = inc;
            h.compatible = CompatibleFeatures(0).with(CompatibleFeatures::LAZY_REFCOUNTS, lazy);
            h.autoclear = AutoclearFeatures(0)
                .with(AutoclearFeatures::RAW_EXTERNAL, raw && data_file)
                .with(AutoclearFeatures::BITMAPS, bitmaps);
            h.refcount_order = refcount_order;
            if !trailing.is_empty() {
                h.header_length = 112 + trailing.len() as u32;
                h.unknown_trailing = trailing;
            } else if short_header {
                h.header_length = 104;
            }
        } else {
            h.version = Version::V2;
            h.header_length = 72;
        }
        ImageHeader { header: h, extensions: exts, backing_file: backing }
    }
}

fn l2_entry(g: Geometry) -> impl Strategy<Value = (L2Entry, Option<SubclusterBitmap>)> {
    let cs = g.cluster_size();
    let max_cluster = ((1u64 << 56) - 1) / cs;
    let shift = 62 - (g.cluster_bits - 8);
    let max_sectors = 1u64 << (g.cluster_bits - 8);
    let entry = prop_oneof![
        Just(L2Entry::Unallocated),
        (1..max_cluster, any::<bool>()).prop_map(move |(c, copied)| L2Entry::Normal {
            host: HostOffset(c * cs),
            copied
        }),
        (proptest::option::of(1..max_cluster), any::<bool>()).prop_map(move |(c, copied)| {
            if g.extended_l2 {
                // The zero flag does not exist with extended L2.
                L2Entry::Unallocated
            } else {
                L2Entry::Zero {
                    preallocated: c.map(|c| HostOffset(c * cs)),
                    copied,
                }
            }
        }),
        (0..(1u64 << shift), 1..=max_sectors).prop_map(|(o, n)| L2Entry::Compressed(
            CompressedDescriptor {
                host_offset: o,
                nb_sectors: n
            }
        )),
    ];
    (entry, any::<u32>(), any::<u32>()).prop_map(move |(e, a, z)| {
        let bm = g
            .extended_l2
            .then_some(SubclusterBitmap { alloc: a, zero: z });
        (e, bm)
    })
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    (
        (any::<u64>(), any::<u32>(), name_str(30), "[^\u{0}]{0,40}"),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
        (
            proptest::option::of(0..u64::MAX),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..100),
        ),
    )
        .prop_map(
            |((l1o, l1s, id, name), (ds, dn, clk, vms), (ic, disk, extra))| Snapshot {
                l1_table_offset: l1o,
                l1_size: l1s,
                id,
                name,
                date_sec: ds,
                date_nsec: dn,
                vm_clock_nsec: clk,
                vm_state_size: vms,
                icount: ic,
                disk_size: Some(disk),
                extra_unknown: extra,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400),
        .. ProptestConfig::default()
    })]

    #[test]
    fn header_roundtrip(ih in image_header()) {
        let cs = 1u64 << ih.header.cluster_bits;
        let Ok(bytes) = ih.serialize(cs) else {
            // Too much for one cluster (small clusters): nothing to check.
            return Ok(());
        };
        prop_assert_eq!(bytes.len() as u64, cs);
        let p = ImageHeader::parse(&bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let mut expect = ih.clone();
        expect.header.backing_file_offset = p.header.backing_file_offset;
        expect.header.backing_file_size = p.header.backing_file_size;
        prop_assert_eq!(&p, &expect);
        prop_assert_eq!(p.serialize(cs).unwrap(), bytes.clone());
        // The fixed header alone round-trips too.
        let h = Header::parse(&bytes).unwrap();
        prop_assert_eq!(&h, &p.header);
    }

    #[test]
    fn l2_roundtrip(
        (g, (e, bm), i) in (9u32..=21, any::<bool>()).prop_flat_map(|(cb, ext)| {
            let g = Geometry { cluster_bits: cb, extended_l2: ext && cb >= 14 };
            (Just(g), l2_entry(g), 0..g.l2_entries() as usize)
        })
    ) {
        let mut t = vec![0u8; g.cluster_size() as usize];
        encode_l2(&mut t, i, g, &e, bm).unwrap();
        prop_assert_eq!(decode_l2(&t, i, g).unwrap(), (e, bm));
        for sc in 0..g.subclusters() {
            // Valid or a typed error, never a panic.
            let _ = subcluster_state(&e, bm, sc);
        }
    }

    #[test]
    fn l2_roundtrip_extended(
        (g, (e, bm), i) in (14u32..=21).prop_flat_map(|cb| {
            let g = Geometry { cluster_bits: cb, extended_l2: true };
            (Just(g), l2_entry(g), 0..g.l2_entries() as usize)
        })
    ) {
        let mut t = vec![0u8; g.cluster_size() as usize];
        encode_l2(&mut t, i, g, &e, bm).unwrap();
        prop_assert_eq!(decode_l2(&t, i, g).unwrap(), (e, bm));
    }

    #[test]
    fn refcount_get_set(
        order in 0u32..=6,
        cb in 9u32..=16,
        writes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u64>()), 1..64),
    ) {
        let o = RefcountOrder::new(order).unwrap();
        let n = o.entries_per_block(cb) as usize;
        let mut block = vec![0u8; 1 << cb];
        let mut model = vec![0u64; n];
        for (idx, v) in writes {
            let i = idx.index(n);
            let v = v & o.max_refcount();
            set_refcount(&mut block, i, o, v).unwrap();
            model[i] = v;
        }
        for (i, &v) in model.iter().enumerate() {
            prop_assert_eq!(get_refcount(&block, i, o).unwrap(), v);
        }
    }

    #[test]
    fn snapshot_roundtrip(snaps in proptest::collection::vec(snapshot(), 0..8)) {
        let b = serialize_snapshot_table(&snaps, 0).unwrap();
        let (p, len) = parse_snapshot_table(&b, snaps.len() as u32).unwrap();
        prop_assert_eq!(p, snaps);
        prop_assert_eq!(len, b.len());
    }

    #[test]
    fn no_panic_random_header(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = ImageHeader::parse(&bytes);
        let _ = Header::parse(&bytes);
    }

    #[test]
    fn no_panic_mutated_header(
        ih in image_header(),
        muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in any::<prop::sample::Index>(),
    ) {
        let cs = 1u64 << ih.header.cluster_bits;
        let Ok(mut bytes) = ih.serialize(cs) else { return Ok(()); };
        // Mutate mostly the interesting first part.
        let hot = bytes.len().min(512);
        for (i, v) in muts {
            let at = i.index(hot);
            bytes[at] = v;
        }
        let _ = ImageHeader::parse(&bytes);
        let _ = ImageHeader::parse(&bytes[..cut.index(bytes.len() + 1)]);
    }

    #[test]
    fn no_panic_decode_l2(
        table in proptest::collection::vec(any::<u8>(), 0..1024),
        index in any::<usize>(),
        small_index in 0usize..200,
        cb in 0u32..64,
        ext in any::<bool>(),
        df in any::<bool>(),
    ) {
        let g = Geometry { cluster_bits: cb, extended_l2: ext };
        for i in [index, small_index] {
            if let Ok((e, bm)) = decode_l2_with(&table, i, g, df) {
                for sc in 0..33 {
                    let _ = subcluster_state(&e, bm, sc);
                }
            }
            let _ = decode_l2(&table, i, g);
        }
    }

    #[test]
    fn no_panic_snapshot_table(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        nb in prop_oneof![0u32..10, any::<u32>()],
    ) {
        let _ = parse_snapshot_table(&bytes, nb);
    }

    #[test]
    fn no_panic_mutated_snapshot_table(
        snaps in proptest::collection::vec(snapshot(), 1..4),
        muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut b = serialize_snapshot_table(&snaps, 0).unwrap();
        for (i, v) in muts {
            let at = i.index(b.len());
            b[at] = v;
        }
        let _ = parse_snapshot_table(&b, snaps.len() as u32);
    }

    #[test]
    fn no_panic_decompress(
        input in proptest::collection::vec(any::<u8>(), 0..2048),
        out_len in 0usize..70000,
    ) {
        let mut out = vec![0u8; out_len];
        let _ = decompress(CompressionType::Zlib, &input, &mut out);
        let _ = decompress(CompressionType::Zstd, &input, &mut out);
    }

    #[test]
    fn no_panic_mutated_compressed(
        data in proptest::collection::vec(0u8..4, 512..8192),
        muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        zstd in any::<bool>(),
    ) {
        let kind = if zstd { CompressionType::Zstd } else { CompressionType::Zlib };
        let Some(mut c) = qcow2_format::compressed::compress(kind, &data, data.len()).unwrap() else {
            return Ok(());
        };
        let mut out = vec![0u8; data.len()];
        decompress(kind, &c, &mut out).unwrap();
        prop_assert_eq!(&out, &data);
        for (i, v) in muts {
            let at = i.index(c.len());
            c[at] = v;
        }
        let _ = decompress(kind, &c, &mut out);
    }

    #[test]
    fn compressed_descriptor_roundtrip(
        (cb, off, n) in (9u32..=21).prop_flat_map(|cb| {
            let shift = 62 - (cb - 8);
            (Just(cb), 0..(1u64 << shift), 1..=(1u64 << (cb - 8)))
        })
    ) {
        let g = Geometry { cluster_bits: cb, extended_l2: false };
        let d = CompressedDescriptor { host_offset: off, nb_sectors: n };
        let raw = d.encode(g).unwrap();
        prop_assert_eq!(CompressedDescriptor::decode(raw, g), d);
        let (o, len) = d.host_range();
        prop_assert_eq!(o.0, off);
        prop_assert!(len >= 1 && len <= n * 512);
    }

    #[test]
    fn l1_roundtrip(cb in 9u32..=21, cluster in 0u64..(1 << 30), copied in any::<bool>()) {
        let g = Geometry { cluster_bits: cb, extended_l2: false };
        let off = (cluster << cb) & 0x00ff_ffff_ffff_fe00 & !((1u64 << cb) - 1);
        let e = L1Entry { l2_offset: (off != 0).then_some(HostOffset(off)), copied };
        prop_assert_eq!(L1Entry::decode(e.encode(), g).unwrap(), e);
    }

    #[test]
    fn no_panic_serialize(
        fields in (any::<u32>(), any::<u64>(), any::<u32>(), any::<u64>(), any::<u8>()),
        trailing in proptest::collection::vec(any::<u8>(), 0..40),
        v2 in any::<bool>(),
        cluster_size in prop_oneof![Just(65536u64), any::<u64>()],
        exts in proptest::collection::vec(extension(65536, true), 0..3),
        backing in proptest::option::of("[a-z]{0,1100}"),
    ) {
        let (hl, size, cb, feats, ct) = fields;
        let mut h = Header::new_v3(cb % 40, size);
        h.header_length = hl % 300;
        h.unknown_trailing = trailing;
        h.incompatible = IncompatibleFeatures(feats);
        h.compression_type = if ct % 2 == 0 { CompressionType::Zlib } else { CompressionType::Zstd };
        if v2 {
            h.version = Version::V2;
        }
        if let Ok(b) = h.serialize() {
            let _ = Header::parse(&b);
        }
        let ih = ImageHeader { header: h, extensions: exts, backing_file: backing };
        if let Ok(b) = ih.serialize(cluster_size) {
            prop_assert_eq!(b.len() as u64, cluster_size);
            let _ = ImageHeader::parse(&b);
        }
    }
}
