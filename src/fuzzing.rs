//! Bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz, nightly) and by the corpus replay test
//! (`tests/fuzz_corpus.rs`, stable), so that every committed corpus input keeps being checked in CI.
//!
//! Each function must return normally for every input: a panic, a hang or an unbounded allocation is a
//! bug. Errors are expected outcomes and are ignored.

use qcow2_engine::{check_backend, Image, ImageFormat, OpenOptions, Repair};
use qcow2_format::compressed::{compress, decompress, CompressedDescriptor};
use qcow2_format::extensions::{parse_extensions, serialize_extensions, ExtensionContext};
use qcow2_format::header::CompressionType;
use qcow2_format::image_header::ImageHeader;
use qcow2_format::l1::{
    parse_l1_table, raw_l1_entry, serialize_l1_table, L1Entry, L1E_RESERVED_MASK,
};
use qcow2_format::l2::{
    decode_l2_entry, decode_l2_with, encode_l2, raw_l2_entry, subcluster_run, subcluster_state,
    validate_bitmap, L2Entry, L2E_COMPRESSED, L2E_COPIED,
};
use qcow2_format::refcount::{
    decode_reftable_entry, encode_reftable_entry, get_refcount, parse_reftable, refcount_location,
    set_refcount, RefcountOrder,
};
use qcow2_format::snapshot::{parse_snapshot_table, serialize_snapshot_table};
use qcow2_format::types::Geometry;
use qcow2_io::{Backend, MemoryBackend};

/// Parses `data` as the first cluster of an image: header, extensions (backing format, feature name
/// table, bitmaps, external data file name, encryption pointer, unknown ones), backing file name,
/// validation. A header that parses must serialize to bytes that parse again to the same meaning
/// (fixed fields, backing name, every extension and the accessors built on them) and serialize to the
/// same bytes: serialization is a normal form. Independently of the header, the extension area
/// decoder runs over the whole input, and the extensions it accepts must round-trip through
/// `serialize_extensions`.
pub fn header(data: &[u8]) {
    extensions_alone(data);
    let Ok(parsed) = ImageHeader::parse(data) else {
        return;
    };
    // The accessors must not panic on any header that validated.
    let _ = (
        parsed.backing_format(),
        parsed.data_file(),
        parsed.feature_table(),
        parsed.bitmaps(),
        parsed.compression_type(),
        parsed.is_dirty(),
        parsed.is_corrupt(),
        parsed.data_file_raw(),
        parsed.lazy_refcounts(),
        parsed.extended_l2(),
        parsed.refcount_bits(),
        parsed.l1_table_bytes(),
        parsed.refcount_table_bytes(),
        parsed.version(),
    );
    let cluster_size = parsed.geometry().cluster_size();
    let Ok(bytes) = parsed.serialize(cluster_size) else {
        return;
    };
    let again = ImageHeader::parse(&bytes).expect("a serialized valid header parses again");
    assert_eq!(
        again.backing_file, parsed.backing_file,
        "backing file survives a round trip"
    );
    assert_eq!(
        again.extensions, parsed.extensions,
        "extensions survive a round trip"
    );
    assert_eq!(again.backing_format(), parsed.backing_format());
    assert_eq!(again.data_file(), parsed.data_file());
    assert_eq!(again.feature_table(), parsed.feature_table());
    assert_eq!(again.bitmaps(), parsed.bitmaps());
    assert_eq!(again.compression_type(), parsed.compression_type());
    assert_eq!(again.geometry(), parsed.geometry());
    assert_eq!(again.virtual_size(), parsed.virtual_size());
    assert_eq!(again.l1_table_offset(), parsed.l1_table_offset());
    assert_eq!(again.l1_size(), parsed.l1_size());
    assert_eq!(
        again.refcount_table_offset(),
        parsed.refcount_table_offset()
    );
    assert_eq!(again.refcount_table_bytes(), parsed.refcount_table_bytes());
    assert_eq!(again.refcount_order(), parsed.refcount_order());
    assert_eq!(
        (again.is_dirty(), again.is_corrupt(), again.has_data_file()),
        (
            parsed.is_dirty(),
            parsed.is_corrupt(),
            parsed.has_data_file()
        )
    );
    assert_eq!(
        (
            again.lazy_refcounts(),
            again.extended_l2(),
            again.data_file_raw()
        ),
        (
            parsed.lazy_refcounts(),
            parsed.extended_l2(),
            parsed.data_file_raw()
        )
    );
    let bytes2 = again
        .serialize(cluster_size)
        .expect("a parsed serialized header serializes");
    assert!(bytes == bytes2, "serialization is not a normal form");
}

/// Runs the header extension decoder over `data` as an extension area, with a context taken from the
/// first bytes (cluster size 512 B..2 MiB, bitmaps validated or not, encrypted or not), and checks
/// that what it accepts serializes to an area that decodes to the same extensions.
fn extensions_alone(data: &[u8]) {
    let Some((&sel, area)) = data.split_first() else {
        return;
    };
    let ctx = ExtensionContext {
        cluster_size: 1u64 << (9 + u32::from(sel & 15).min(12)),
        crypt_method: u32::from(sel >> 7),
        autoclear_bitmaps: sel & 0x40 != 0,
    };
    let Ok(exts) = parse_extensions(area, 0, area.len() as u64, &ctx) else {
        return;
    };
    let Ok(bytes) = serialize_extensions(&exts) else {
        return;
    };
    let again = parse_extensions(&bytes, 0, bytes.len() as u64, &ctx)
        .expect("serialized extensions parse again");
    assert_eq!(again, exts, "extensions survive a round trip");
}

/// How much of the virtual disk the open-and-read target reads at most, to keep each run fast.
const READ_BUDGET: u64 = 8 << 20;
/// How many block-status calls the target makes at most.
const STATUS_BUDGET: usize = 512;

/// Opens `data` as an image on the memory backend (no backing chain, no data file) and exercises the read
/// path: block status over the disk, reads of the extents it reports, and reads at the start and end.
pub fn open_read(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime without I/O drivers always builds");
    rt.block_on(async {
        let backend = MemoryBackend::from_vec(data.to_vec()).with_max_size(64 << 20);
        let opts = OpenOptions {
            follow_backing: false,
            l2_cache_bytes: Some(64 << 10),
            ..OpenOptions::default()
        };
        let Ok(image) = Image::open_backend(backend, "fuzz.img", &opts).await else {
            return;
        };
        let size = image.virtual_size();
        let _ = image.info();
        let mut budget = READ_BUDGET;
        let mut buf = vec![0u8; 128 << 10];
        let mut offset = 0u64;
        for _ in 0..STATUS_BUDGET {
            if offset >= size {
                break;
            }
            let Ok(st) = image.block_status(offset, size - offset).await else {
                break;
            };
            assert!(
                st.len > 0 && st.len <= size - offset,
                "block status length out of range"
            );
            let n = st.len.min(buf.len() as u64).min(budget);
            if n > 0 {
                let _ = image.read(offset, &mut buf[..n as usize]).await;
                budget -= n;
            }
            offset += st.len;
        }
        if size > 0 {
            let n = size.min(4096);
            let _ = image.read(size - n, &mut buf[..n as usize]).await;
        }
    });
}

/// Decodes the input as every kind of table entry the format crate knows, with parameters taken
/// from its first bytes: `data[0]` picks the cluster size (512 B..2 MiB), extended L2 and the external
/// data file rule, `data[1]` the refcount order (values 7 and up test the clamping of hand-made
/// orders), `data[2..4]` the number of snapshots; the rest is the table bytes. Checks that nothing
/// panics and that everything that decodes and has an encoder round-trips (decode, encode, decode
/// gives the same value; encode of that gives the same raw word).
pub fn decode(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (params, table) = data.split_at(4);
    let cluster_bits = 9 + u32::from(params[0] & 0x1f) % 13;
    let extended = params[0] & 0x40 != 0;
    let external = params[0] & 0x80 != 0;
    // Extended L2 needs 16 KiB clusters or more: fall back to standard entries below that, and
    // still exercise the hand-made geometry (methods must not panic on it).
    let geom = Geometry::new(cluster_bits, extended).unwrap_or(Geometry {
        cluster_bits,
        extended_l2: false,
    });
    decode_l2_entries(table, geom, external);
    decode_compressed(table, geom);
    decode_l1_and_reftable(table, geom);
    let order =
        RefcountOrder::new(u32::from(params[1] % 8)).unwrap_or(RefcountOrder(u32::from(params[1])));
    decode_refcounts(table, order, cluster_bits);
    let nb = u32::from(u16::from_be_bytes([params[2], params[3]]));
    decode_snapshots(table, nb);
}

fn words(table: &[u8]) -> impl Iterator<Item = u64> + '_ {
    table
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("chunks of 8")))
}

fn decode_l2_entries(table: &[u8], geom: Geometry, external: bool) {
    let esize = geom.l2_entry_size() as usize;
    let n = table.len() / esize;
    let mut rebuilt = vec![0u8; n * esize];
    for i in 0..n {
        let (raw, bm) = raw_l2_entry(table, i, geom).expect("index inside the table");
        let Ok((entry, bitmap)) = decode_l2_entry(raw, bm, geom, external) else {
            continue;
        };
        assert_eq!(
            decode_l2_with(table, i, geom, external).ok(),
            Some((entry, bitmap)),
            "table and word decoders agree"
        );
        let _ = (entry.copied(), entry.host_cluster());
        let valid = validate_bitmap(&entry, bitmap, raw).is_ok();
        let subclusters = if bitmap.is_some() { 32 } else { 1 };
        for sc in 0..subclusters {
            let st = subcluster_state(&entry, bitmap, sc);
            assert_eq!(
                st.is_ok(),
                valid,
                "subcluster state fails iff the bitmap is invalid"
            );
            if let Ok(st) = st {
                let _ = (
                    st.has_data(),
                    st.is_zero(),
                    st.is_unallocated(),
                    st.host_cluster(),
                );
                let (first, run) = subcluster_run(&entry, bitmap, sc).expect("valid bitmap");
                assert_eq!(first, st);
                assert!(
                    run >= 1 && sc + run <= subclusters,
                    "run inside the cluster"
                );
            }
        }
        assert!(subcluster_state(&entry, bitmap, subclusters).is_err());
        // Round trip through the encoder.
        let Ok(enc) = entry.encode(geom) else {
            continue;
        };
        let (again, again_bm) = decode_l2_entry(enc, bitmap.map(|b| b.encode()), geom, external)
            .expect("an encoded entry decodes");
        assert_eq!(again, entry, "L2 entry round trip");
        assert_eq!(again_bm, bitmap, "subcluster bitmap round trip");
        assert_eq!(again.encode(geom).ok(), Some(enc), "L2 encoding is stable");
        encode_l2(&mut rebuilt, i, geom, &entry, bitmap).expect("index inside the table");
        assert_eq!(
            decode_l2_with(&rebuilt, i, geom, external).ok(),
            Some((entry, bitmap)),
            "encode_l2 then decode_l2"
        );
    }
    assert!(raw_l2_entry(table, n, geom).is_err());
    assert!(encode_l2(&mut rebuilt, n, geom, &L2Entry::Unallocated, None).is_err());
}

fn decode_compressed(table: &[u8], geom: Geometry) {
    for raw in words(table) {
        let d = CompressedDescriptor::decode(raw, geom);
        let (off, len) = d.host_range();
        assert_eq!(off.0, d.host_offset);
        assert!(len >= 1 && len <= d.nb_sectors * 512, "host range length");
        let first = d.first_host_cluster(geom);
        assert!(first.0 <= d.host_offset && d.host_offset - first.0 < geom.cluster_size());
        let enc = d
            .encode(geom)
            .expect("a decoded descriptor fits its fields");
        assert_eq!(
            CompressedDescriptor::decode(enc, geom),
            d,
            "descriptor round trip"
        );
        assert_eq!(
            enc,
            raw & !L2E_COPIED | L2E_COMPRESSED,
            "descriptor encoding"
        );
        if let Ok(d2) = CompressedDescriptor::for_data(raw >> 8, raw & 0xffff, geom) {
            let (o2, l2) = d2.host_range();
            assert_eq!(o2.0, raw >> 8);
            assert!(l2 >= (raw & 0xffff), "descriptor covers the data");
        }
    }
    // Decompression of arbitrary bytes into one cluster (at most 64 KiB to keep runs fast), and a
    // compress/decompress round trip of the table bytes.
    let mut out = vec![0u8; geom.cluster_size().min(64 << 10) as usize];
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        let _ = decompress(kind, table, &mut out);
        if let Ok(Some(c)) = compress(kind, table, table.len().saturating_add(64)) {
            let mut back = vec![0u8; table.len()];
            decompress(kind, &c, &mut back).expect("compressed data decompresses");
            assert!(back == table, "compression round trip");
        }
    }
}

fn decode_l1_and_reftable(table: &[u8], geom: Geometry) {
    let entries = parse_l1_table(table);
    assert_eq!(entries.len(), table.len() / 8);
    assert!(serialize_l1_table(&entries) == table[..entries.len() * 8]);
    assert_eq!(parse_reftable(table), entries);
    for (i, &raw) in entries.iter().enumerate() {
        assert_eq!(raw_l1_entry(table, i).ok(), Some(raw));
        let strict = L1Entry::decode_strict(raw, geom);
        match L1Entry::decode(raw, geom) {
            Ok(e) => {
                assert_eq!(
                    strict.is_ok(),
                    L1Entry::reserved_bits(raw) == 0,
                    "strict decoding rejects exactly the reserved bits"
                );
                let enc = e.encode();
                assert_eq!(
                    enc,
                    raw & !L1E_RESERVED_MASK,
                    "L1 encoding drops reserved bits"
                );
                assert_eq!(e.try_encode().ok(), Some(enc));
                assert_eq!(L1Entry::decode(enc, geom).ok(), Some(e), "L1 round trip");
            }
            Err(_) => assert!(strict.is_err()),
        }
        if let Ok(block) = decode_reftable_entry(raw, geom) {
            let enc = encode_reftable_entry(block, geom).expect("a decoded entry encodes");
            assert_eq!(
                decode_reftable_entry(enc, geom).ok(),
                Some(block),
                "reftable round trip"
            );
        }
    }
    assert!(raw_l1_entry(table, entries.len()).is_err());
}

fn decode_refcounts(table: &[u8], order: RefcountOrder, cluster_bits: u32) {
    let bits = u64::from(order.refcount_bits());
    let max = order.max_refcount();
    let per_block = order.entries_per_block(cluster_bits);
    assert!(per_block > 0);
    let n = (table.len() as u64 * 8 / bits) as usize;
    let mut block = table.to_vec();
    // Read every entry; rewrite each with a value derived from its neighbour and check that only
    // that entry changed.
    for i in 0..n {
        let v = get_refcount(table, i, order).expect("index inside the block");
        assert!(v <= max);
        let new = get_refcount(table, (i + 1) % n, order).expect("index inside the block");
        let before = if i > 0 {
            Some(get_refcount(&block, i - 1, order).expect("index inside"))
        } else {
            None
        };
        set_refcount(&mut block, i, order, new).expect("a value read fits");
        assert_eq!(
            get_refcount(&block, i, order).ok(),
            Some(new),
            "set then get"
        );
        if let Some(b) = before {
            assert_eq!(
                get_refcount(&block, i - 1, order).ok(),
                Some(b),
                "neighbour kept"
            );
        }
        if max < u64::MAX {
            assert!(
                set_refcount(&mut block, i, order, max + 1).is_err(),
                "overflow refused"
            );
            assert_eq!(
                get_refcount(&block, i, order).ok(),
                Some(new),
                "failed set is a no-op"
            );
        }
        let (t, b) = refcount_location(v, order, cluster_bits);
        assert!(
            b < per_block && t.checked_mul(per_block).and_then(|x| x.checked_add(b)) == Some(v)
        );
    }
    assert!(get_refcount(table, n, order).is_err());
    assert!(set_refcount(&mut block, n, order, 0).is_err());
}

fn decode_snapshots(table: &[u8], nb: u32) {
    let Ok((snaps, len)) = parse_snapshot_table(table, nb) else {
        return;
    };
    assert_eq!(snaps.len() as u64, u64::from(nb));
    assert!(len <= table.len());
    const DEFAULT_SIZE: u64 = 1 << 30;
    let Ok(bytes) = serialize_snapshot_table(&snaps, DEFAULT_SIZE) else {
        return;
    };
    let (again, len2) = parse_snapshot_table(&bytes, nb).expect("a serialized table parses");
    assert_eq!(len2, bytes.len());
    let normal: Vec<_> = snaps
        .iter()
        .cloned()
        .map(|mut s| {
            s.disk_size = Some(s.disk_size.unwrap_or(DEFAULT_SIZE));
            s
        })
        .collect();
    assert_eq!(again, normal, "snapshot table round trip");
    let bytes2 = serialize_snapshot_table(&again, DEFAULT_SIZE).expect("serializes again");
    assert!(bytes2 == bytes, "snapshot serialization is a normal form");
}

/// Largest image the read-write target lets the memory backend grow to.
const RW_MAX_FILE: u64 = 64 << 20;
/// Bytes at the end of the input that script the requests (the whole input is also the image, so
/// that a committed image is a seed as it is).
const RW_SCRIPT_BYTES: usize = 64;
/// Bytes per scripted request.
const RW_OP_BYTES: usize = 8;
/// Largest request of the read-write target.
const RW_MAX_REQUEST: u64 = 64 << 10;

/// One scripted request of [`rw_check`].
#[derive(Debug, Clone, Copy)]
enum RwOp {
    Read(u64, u64),
    Write(u64, u64, u8),
    WriteZeroes(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

/// Decodes the request script from the last [`RW_SCRIPT_BYTES`] bytes of the input: 8 bytes per
/// request, `[kind, offset (4 bytes, in 512-byte units modulo the virtual size; bit 6 of kind: exact
/// byte offset instead), length (2 bytes, + 1), pattern]`.
fn rw_script(data: &[u8], virtual_size: u64) -> Vec<RwOp> {
    let script = &data[data.len().saturating_sub(RW_SCRIPT_BYTES)..];
    script
        .chunks_exact(RW_OP_BYTES)
        .map(|c| {
            let raw_off = u64::from(u32::from_be_bytes([c[1], c[2], c[3], c[4]]));
            let off = if c[0] & 0x40 != 0 {
                raw_off
            } else {
                raw_off.wrapping_mul(512) % virtual_size.max(1)
            };
            let len = (u64::from(u16::from_be_bytes([c[5], c[6]])) + 1).min(RW_MAX_REQUEST);
            match c[0] % 5 {
                0 => RwOp::Read(off, len),
                1 => RwOp::Write(off, len, c[7]),
                2 => RwOp::WriteZeroes(off, len, c[0] & 0x80 != 0),
                3 => RwOp::Discard(off, len),
                _ => RwOp::Flush,
            }
        })
        .collect()
}

/// Offset of the qcow2 version field, and the end of the fields common to v2 and v3 headers.
const HDR_V2_END: usize = 72;
/// End of the v3 fields this invariant looks at (up to and including header_length).
const HDR_V3_END: usize = 104;

/// The overlap invariant of [`rw_check`]: guest writes never land in the header. Compares the
/// header bytes `before` (read just after the read-write open) with `after`, field by field:
///
/// - unchanged: magic, version, backing file offset and size, cluster_bits, virtual size,
///   crypt_method, snapshot count and offset (bytes 0..36 and 60..72), and for v3 the compatible
///   features, refcount_order and header_length (80..88, 96..104);
/// - may change, as metadata updates do: l1_size and l1_table_offset (36..48: L1 growth or
///   relocation), refcount_table_offset and refcount_table_clusters (48..60: refcount table growth),
///   the dirty and corrupt bits of the incompatible features (the other incompatible bits must stay),
///   and the autoclear bits may only be cleared (a read-write open clears those it does not
///   support, as QEMU does).
///
/// A header that fails this check after a request or a close means a guest write (or a metadata write
/// aimed at the wrong offset) overwrote the header, which the overlap checks must prevent.
fn assert_header_invariant(before: &[u8], after: &[u8], what: &str) {
    let n = before.len().min(after.len());
    assert!(
        n >= HDR_V2_END,
        "{what}: header shrank to {} bytes",
        after.len()
    );
    let same = |start: usize, end: usize, field: &str| {
        if end <= n {
            assert!(
                before[start..end] == after[start..end],
                "{what}: header field {field} ({start}..{end}) changed: {:02x?} -> {:02x?}",
                &before[start..end],
                &after[start..end]
            );
        }
    };
    same(0, 36, "magic..crypt_method");
    same(60, HDR_V2_END, "nb_snapshots/snapshots_offset");
    let version = u32::from_be_bytes([before[4], before[5], before[6], before[7]]);
    if version < 3 || n < HDR_V3_END {
        return;
    }
    let word = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    const DIRTY_CORRUPT: u64 = 0b11;
    assert_eq!(
        word(before, 72) & !DIRTY_CORRUPT,
        word(after, 72) & !DIRTY_CORRUPT,
        "{what}: incompatible features other than dirty/corrupt changed"
    );
    same(80, 88, "compatible_features");
    assert_eq!(
        word(after, 88) & !word(before, 88),
        0,
        "{what}: autoclear features gained bits"
    );
    same(96, HDR_V3_END, "refcount_order/header_length");
}

/// Runs `check -r all` (`check_backend` with `Repair::All`, as `qcow2 check -r all` on a closed image)
/// on a copy of `bytes` in memory, then checks the repaired copy again: when the repair's final pass
/// reported no corruption and no check error, a new check must agree.
async fn repair_all(bytes: &[u8]) -> bool {
    let copy = MemoryBackend::from_vec(bytes.to_vec()).with_max_size(RW_MAX_FILE);
    let report = check_backend(&copy, "fuzz.img", Repair::All).await;
    if let Ok(r) = &report {
        if r.failed.is_none() && r.check_errors == 0 && r.corruptions == 0 {
            let again = check_backend(&copy, "fuzz.img", Repair::None)
                .await
                .expect("a repaired image checks again");
            assert_eq!(
                (again.corruptions, again.check_errors),
                (0, 0),
                "the repair reported a clean image but a new check finds {again:?} (repair: {r:?})"
            );
        }
    }
    report.is_ok_and(|r| r.failed.is_none())
}

/// The first [`HDR_V3_END`] bytes of the file (fewer if it is shorter).
async fn header_bytes(b: &MemoryBackend) -> Vec<u8> {
    let (r, buf) = b.read_at(bytes::BytesMut::zeroed(HDR_V3_END), 0).await;
    let n = r.unwrap_or(0);
    buf[..n].to_vec()
}

/// Opens the input as a qcow2 image (never probed as raw: a raw image has no metadata to protect) on the
/// memory backend (bounded to [`RW_MAX_FILE`]) read-write, runs up
/// to 8 scripted requests (reads, writes, zero writes, discards, flushes; at most 64 KiB each) and
/// closes it; after every request and after the close, whether they succeeded or not, the header
/// invariant ([`assert_header_invariant`]) must hold. Then runs `Image::check` on a fresh read-only open, and
/// `check_backend(Repair::All)` (what `qcow2 check -r all` runs) on a copy, and when that repair
/// reports a clean image, a new check must find it clean too. Errors are expected outcomes; a panic, a hang
/// or an unbounded allocation is a bug.
pub fn rw_check(data: &[u8]) {
    let _ = rw_check_stats(data);
}

/// What one [`rw_check`] run did (for the corpus replay test to show that the corpus exercises
/// something).
#[derive(Debug, Clone, Copy, Default)]
pub struct RwStats {
    /// The image opened read-write.
    pub opened: bool,
    /// Mutating requests (writes, zero writes, discards, flushes) that succeeded.
    pub mutations_ok: usize,
    /// The read-only check of the closed image completed.
    pub checked: bool,
    /// `check -r all` completed.
    pub repaired: bool,
}

/// [`rw_check`], returning what it did.
pub fn rw_check_stats(data: &[u8]) -> RwStats {
    let mut stats = RwStats::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime without I/O drivers always builds");
    rt.block_on(async {
        let backend = MemoryBackend::from_vec(data.to_vec()).with_max_size(RW_MAX_FILE);
        let opts = OpenOptions {
            format: Some(ImageFormat::Qcow2),
            read_only: false,
            follow_backing: false,
            l2_cache_bytes: Some(64 << 10),
            ..OpenOptions::default()
        };
        let ro = OpenOptions {
            read_only: true,
            ..opts.clone()
        };
        let Ok(image) = Image::open_backend(backend.clone(), "fuzz.img", &opts).await else {
            return;
        };
        stats.opened = true;
        let baseline = header_bytes(&backend).await;
        let size = image.virtual_size();
        let mut buf = vec![0u8; RW_MAX_REQUEST as usize];
        for (i, op) in rw_script(data, size).into_iter().enumerate() {
            let mutated = match op {
                RwOp::Read(off, len) => {
                    let _ = image.read(off, &mut buf[..len as usize]).await;
                    false
                }
                RwOp::Write(off, len, pattern) => {
                    buf[..len as usize].fill(pattern);
                    image.write(off, &buf[..len as usize]).await.is_ok()
                }
                RwOp::WriteZeroes(off, len, unmap) => {
                    image.write_zeroes(off, len, unmap).await.is_ok()
                }
                RwOp::Discard(off, len) => image.discard(off, len).await.is_ok(),
                RwOp::Flush => image.flush().await.is_ok(),
            };
            stats.mutations_ok += usize::from(mutated);
            // Whatever the outcome: a failed request must not have touched the header either.
            assert_header_invariant(
                &baseline,
                &header_bytes(&backend).await,
                &format!("request {i} {op:?}"),
            );
        }
        // Close writes back cached metadata (L1/L2 updates, refcounts): the same holds, whether or not
        // the close succeeds.
        let _ = image.close().await;
        assert_header_invariant(&baseline, &header_bytes(&backend).await, "close");
        drop(image);
        let bytes = backend.contents();
        let before_repair = match Image::open_backend(
            MemoryBackend::from_vec(bytes.clone()),
            "fuzz.img",
            &ro,
        )
        .await
        {
            Ok(image) => image.check(Repair::None).await.ok(),
            Err(_) => None,
        };
        stats.checked = before_repair.as_ref().is_some_and(|r| r.failed.is_none());
        stats.repaired = repair_all(&bytes).await;
    });
    stats
}
