//! Malformed images, part 2 (L1/L2 entries, compressed descriptors, backing loops and long chains,
//! extended L2 bitmaps, external data files, non-regular files): a corpus of malformed images, made at test time by patching valid qemu-img images at known offsets
//! (QEMU docs/interop/qcow2.txt, "Header", "Host cluster management", "Compressed Clusters Descriptor").
//!
//! For every image, `qcow2 info`, `qcow2 map` and `qcow2 convert -O raw` run under an address-space limit
//! (`prlimit --as`, so an allocation sized by an unchecked on-disk value fails) and a time limit, and must
//! not panic, hang or die on a signal. Each command's success or failure must match qemu-img's on the
//! same image (a qemu-img run that does not terminate counts as a failure); where the two legitimately
//! differ the case lists the command with the reason. A failure must print exactly one line on stderr
//! naming the file. Where both tools convert the image, the raw outputs must be identical.

mod common;

use common::malformed::*;
use common::{get_be32, get_be64, patch, put_be64, Work};

// -------------------------------------------------------------------------------------------------
// L1 and L2 entries

fn l1_case(f: impl FnOnce(&Base) -> u64, allowed: &[Allow]) {
    let w = Work::new();
    let b = make_base(&w, "img.qcow2");
    put_be64(&w.p("img.qcow2"), b.l1_offset, f(&b));
    check(&w, "img.qcow2", allowed);
}

#[test]
fn l1_entry_unaligned() {
    l1_case(|b| OFLAG_COPIED | (b.l2_offset + 512), &[]);
}

#[test]
fn l1_entry_into_header_cluster() {
    // Cluster 0 cannot be named by an aligned entry (offset 0 = unallocated); point at the refcount
    // table cluster, which sits in the metadata at the start of the file.
    l1_case(|b| OFLAG_COPIED | b.rt_offset, &[]);
}

#[test]
fn l1_entry_points_at_l1_table() {
    l1_case(|b| OFLAG_COPIED | b.l1_offset, &[]);
}

#[test]
fn l1_entry_past_eof() {
    l1_case(|_| OFLAG_COPIED | (1 << 40), PAST_EOF);
}

#[test]
fn l1_entry_max_offset() {
    l1_case(|_| OFLAG_COPIED | OFFSET_MASK, &[]);
}

#[test]
fn l1_entry_reserved_bits() {
    l1_case(|b| OFLAG_COPIED | b.l2_offset | 0x1fe, &[]);
}

fn l2_case(index: u64, f: impl FnOnce(&Base) -> u64, allowed: &[Allow]) {
    let w = Work::new();
    let b = make_base(&w, "img.qcow2");
    put_be64(&w.p("img.qcow2"), b.l2_offset + 8 * index, f(&b));
    check(&w, "img.qcow2", allowed);
}

#[test]
fn l2_entry_unaligned() {
    l2_case(0, |b| OFLAG_COPIED | (b.data_offset + 512), &[]);
}

#[test]
fn l2_entry_into_header_cluster_metadata() {
    l2_case(0, |b| OFLAG_COPIED | b.rt_offset, &[]);
}

#[test]
fn l2_entry_points_at_l1_table() {
    l2_case(1, |b| OFLAG_COPIED | b.l1_offset, &[]);
}

#[test]
fn l2_entry_past_eof() {
    l2_case(0, |_| OFLAG_COPIED | (1 << 40), PAST_EOF);
}

#[test]
fn l2_entry_max_offset() {
    l2_case(0, |_| OFLAG_COPIED | OFFSET_MASK, &[]);
}

#[test]
fn l2_entry_unaligned_zero_cluster() {
    // Zero flag with an unaligned preallocation offset.
    l2_case(0, |b| OFLAG_COPIED | (b.data_offset + 512) | 1, &[]);
}

#[test]
fn l2_entry_compressed_on_standard_image() {
    // Compressed flag with a descriptor pointing at the data cluster (not compressed data).
    l2_case(0, |b| (1 << 62) | b.data_offset, &[]);
}

// -------------------------------------------------------------------------------------------------
// compressed descriptors

/// Patches guest cluster 0's compressed descriptor.
fn compressed_case(cluster_size: &str, f: impl FnOnce(&Base, u64) -> u64) {
    let w = Work::new();
    let b = make_compressed(&w, "img.qcow2", cluster_size);
    let p = w.p("img.qcow2");
    let old = get_be64(&p, b.l2_offset);
    put_be64(&p, b.l2_offset, f(&b, old));
    check(&w, "img.qcow2", &[]);
}

/// Bit position of the sector-count field (x = 62 - (cluster_bits - 8)).
fn csize_shift(b: &Base) -> u32 {
    62 - (b.cluster_size.trailing_zeros() - 8)
}

#[test]
fn compressed_absurd_size_64k() {
    compressed_case("64k", |b, old| {
        let x = csize_shift(b);
        let offset = old & ((1u64 << x) - 1);
        (1 << 62) | (((1u64 << (62 - x)) - 1) << x) | offset
    });
}

#[test]
fn compressed_absurd_size_2m() {
    compressed_case("2M", |b, old| {
        let x = csize_shift(b);
        let offset = old & ((1u64 << x) - 1);
        (1 << 62) | (((1u64 << (62 - x)) - 1) << x) | offset
    });
}

#[test]
fn compressed_offset_past_eof() {
    compressed_case("64k", |b, old| {
        let x = csize_shift(b);
        (1 << 62) | (old & !((1u64 << x) - 1) & !(3 << 62)) | (1 << 40)
    });
}

#[test]
fn compressed_offset_into_header() {
    compressed_case("64k", |b, old| {
        let x = csize_shift(b);
        (1 << 62) | (old & !((1u64 << x) - 1) & !(3 << 62))
    });
}

#[test]
fn compressed_max_offset_and_size() {
    compressed_case("4k", |_, _| (1 << 62) | ((1u64 << 62) - 1));
}

#[test]
fn compressed_truncated_data() {
    let w = Work::new();
    let b = make_compressed(&w, "img.qcow2", "64k");
    let p = w.p("img.qcow2");
    let x = csize_shift(&b);
    let desc = get_be64(&p, b.l2_offset);
    let off = desc & ((1u64 << x) - 1);
    let d = w.read_file("img.qcow2");
    // Cut the file in the middle of guest cluster 0's compressed data.
    w.write_file("img.qcow2", &d[..(off as usize + 16).min(d.len())]);
    check(&w, "img.qcow2", &[]);
}

// -------------------------------------------------------------------------------------------------
// backing-file loops

/// Builds the chain `chain[0] -> chain[1] -> ...` (top first), then rebases `rebased` onto `onto` without
/// checks (`rebase -u`), which closes a loop; `names` are the files the loop runs through. map, convert and
/// info --backing-chain must refuse it with one line (qemu-img hangs or crashes on loops).
fn backing_loop_case(chain: &[&str], rebased: &str, onto: &str, names: &[&str]) {
    let w = Work::new();
    let bottom = chain.last().expect("a chain has at least one image");
    w.qemu_img(&["create", "-q", "-f", "qcow2", bottom, "1M"]);
    for pair in chain.windows(2).rev() {
        w.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", pair[1], "-F", "qcow2", pair[0],
        ]);
    }
    w.qemu_img(&["rebase", "-u", "-b", onto, "-F", "qcow2", rebased]);
    run_case(
        &w,
        &Case {
            image: chain[0],
            fmt: None,
            cmds: &[Cmd::Info, Cmd::Map, Cmd::Convert, Cmd::InfoChain],
            allowed: &[allow(
                Cmd::Info,
                "qemu-img info does not open the backing chain (it succeeds); refusing the loop \
                 at open, as the engine does, is also fine",
            )],
            names,
        },
    );
}

#[test]
fn backing_loop_two_images() {
    backing_loop_case(
        &["A.qcow2", "B.qcow2"],
        "B.qcow2",
        "A.qcow2",
        &["A.qcow2", "B.qcow2"],
    );
}

#[test]
fn backing_loop_self() {
    backing_loop_case(&["A.qcow2", "B.qcow2"], "A.qcow2", "A.qcow2", &["A.qcow2"]);
}

#[test]
fn backing_loop_three_images() {
    backing_loop_case(
        &["A.qcow2", "B.qcow2", "C.qcow2"],
        "C.qcow2",
        "A.qcow2",
        &["A.qcow2", "B.qcow2", "C.qcow2"],
    );
}

// -------------------------------------------------------------------------------------------------
// further cases: extended L2 bitmaps, v2 zero flag, external data file mapping, refcounts, long chains

/// An extended-L2 image (64 KiB clusters, 2 KiB sub-clusters) with sub-cluster 0 of guest cluster 0
/// written; returns the L2 table offset.
fn make_extended(w: &Work, name: &str) -> u64 {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k,extended_l2=on",
        name,
        "4M",
    ]);
    w.qemu_io(&["-f", "qcow2"], name, &["write -P 0x11 0 2k"]);
    let p = w.p(name);
    get_be64(&p, get_be64(&p, H_L1_OFFSET)) & OFFSET_MASK
}

#[test]
fn extended_l2_bitmap_alloc_and_zero() {
    let w = Work::new();
    let l2 = make_extended(&w, "img.qcow2");
    // Sub-cluster 0 both allocated and zero: invalid.
    put_be64(&w.p("img.qcow2"), l2 + 8, 0x0000_0001_0000_0001);
    check(&w, "img.qcow2", &[]);
}

#[test]
fn extended_l2_alloc_bits_without_cluster() {
    let w = Work::new();
    let l2 = make_extended(&w, "img.qcow2");
    // Guest cluster 1 is unallocated (offset 0) but claims allocated sub-clusters.
    put_be64(&w.p("img.qcow2"), l2 + 16 + 8, 0x0000_0000_ffff_ffff);
    check(&w, "img.qcow2", &[]);
}

#[test]
fn extended_l2_compressed_with_bitmap() {
    let w = Work::new();
    let text: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| b"abcabd"[(i % 6) as usize])
        .collect();
    w.write_file("src.raw", &text);
    w.qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=64k,extended_l2=on",
        "src.raw",
        "img.qcow2",
    ]);
    let p = w.p("img.qcow2");
    let l2 = get_be64(&p, get_be64(&p, H_L1_OFFSET)) & OFFSET_MASK;
    assert_ne!(get_be64(&p, l2) & (1 << 62), 0, "cluster 0 compressed");
    put_be64(&p, l2 + 8, 0x0000_0000_0000_0001);
    check(&w, "img.qcow2", &[]);
}

#[test]
fn v2_l2_entry_with_zero_flag() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "img.qcow2",
        "4M",
    ]);
    w.qemu_io(&["-f", "qcow2"], "img.qcow2", &["write -P 0x11 0 128k"]);
    let b = read_base(&w.p("img.qcow2"));
    let e = get_be64(&w.p("img.qcow2"), b.l2_offset);
    put_be64(&w.p("img.qcow2"), b.l2_offset, e | 1);
    check(&w, "img.qcow2", &[]);
}

#[test]
fn data_file_entry_not_identity_mapped() {
    let w = Work::new();
    make_data_file_image(&w);
    w.qemu_io(
        &["-f", "qcow2"],
        "img.qcow2",
        &["write -P 0x11 0 64k", "write -P 0x22 128k 64k"],
    );
    let p = w.p("img.qcow2");
    let l2 = get_be64(&p, get_be64(&p, H_L1_OFFSET)) & OFFSET_MASK;
    // Guest cluster 0 mapped to host offset 128 KiB of the data file.
    put_be64(&p, l2, OFLAG_COPIED | (128 * 1024));
    check(&w, "img.qcow2", &[]);
}

#[test]
fn refcount_table_garbage() {
    let w = Work::new();
    let b = make_base(&w, "img.qcow2");
    patch(&w.p("img.qcow2"), b.rt_offset, &vec![0xff; 4096]);
    check(&w, "img.qcow2", &[]);
}

#[test]
fn feature_table_length_not_multiple_of_48() {
    let w = Work::new();
    base_with_feature_table_length(&w, "img.qcow2", |_| 47);
    check(&w, "img.qcow2", &[]);
}

/// A chain longer than the engine's bound (256): qemu-img opens it.
#[test]
fn chain_260_deep() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "i0.qcow2", "1M"]);
    w.qemu_io(&["-f", "qcow2"], "i0.qcow2", &["write -P 0x11 0 4k"]);
    for i in 1..=260 {
        let b = format!("i{}.qcow2", i - 1);
        let n = format!("i{i}.qcow2");
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &n]);
    }
    const R: &str = "the engine bounds backing chains (MAX_CHAIN_DEPTH = 256) to stay safe on \
                     hostile chains; qemu-img has no such bound";
    run_case(
        &w,
        &Case {
            image: "i260.qcow2",
            fmt: None,
            cmds: &[Cmd::Info, Cmd::Map, Cmd::Convert, Cmd::InfoChain],
            allowed: &[
                allow(Cmd::Map, R),
                allow(Cmd::Convert, R),
                allow(Cmd::InfoChain, R),
            ],
            names: &["i260.qcow2"],
        },
    );
}

// -------------------------------------------------------------------------------------------------
// backing and data files that are not regular files, unknown backing formats and protocols

/// img.qcow2 over base.qcow2, then its backing name/format rebased (unsafely) to `backing`/`fmt`.
fn overlay_rebased(w: &Work, backing: &str, fmt: &str) {
    make_overlay(w);
    w.qemu_img(&["rebase", "-u", "-b", backing, "-F", fmt, "img.qcow2"]);
}

#[test]
fn backing_file_is_directory() {
    let w = Work::new();
    w.mkdir("dir");
    overlay_rebased(&w, "dir", "raw");
    check(&w, "img.qcow2", &[]);
}

#[test]
fn backing_file_is_dev_null() {
    let w = Work::new();
    overlay_rebased(&w, "/dev/null", "raw");
    check(&w, "img.qcow2", &[]);
}

#[test]
fn backing_file_json_protocol() {
    let w = Work::new();
    overlay_rebased(&w, r#"json:{"driver":"null-co","size":4194304}"#, "raw");
    check(&w, "img.qcow2", &[]);
}

#[test]
fn backing_format_qcow2_but_file_is_raw() {
    let w = Work::new();
    w.write_file("base.raw", &vec![0x5a; 1 << 20]);
    make_overlay(&w);
    w.qemu_img(&["rebase", "-u", "-b", "base.raw", "-F", "qcow2", "img.qcow2"]);
    check(&w, "img.qcow2", &[]);
}

#[test]
fn backing_format_unknown() {
    let w = Work::new();
    make_overlay(&w);
    let p = w.p("img.qcow2");
    let (off, len) = common::find_header_extension(&p, 0xE279_2ACA).expect("backing format ext");
    assert_eq!(len, 5, "backing format 'qcow2'");
    patch(&p, off + 8, b"qcowX");
    check(&w, "img.qcow2", &[]);
}

#[test]
fn image_is_directory() {
    let w = Work::new();
    w.mkdir("dir.qcow2");
    check(&w, "dir.qcow2", &[]);
}

#[test]
fn image_is_dev_null() {
    let w = Work::new();
    check(&w, "/dev/null", &[]);
}

#[test]
fn image_missing() {
    let w = Work::new();
    check(&w, "missing.qcow2", &[]);
}

#[test]
fn data_file_is_directory() {
    let w = Work::new();
    make_data_file_image(&w);
    std::fs::remove_file(w.p("img.data")).expect("remove data file");
    w.mkdir("img.data");
    check(&w, "img.qcow2", &[]);
}

/// Every L1 entry points at the same L2 table and every L2 entry at the same data cluster (512-byte
/// clusters, 8 MiB: 16384 guest clusters aliasing one host cluster). QEMU reads it; so must we, identically.
#[test]
fn all_entries_alias_one_cluster() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "img.qcow2",
        "8M",
    ]);
    w.qemu_io(&["-f", "qcow2"], "img.qcow2", &["write -P 0x3d 0 512"]);
    let p = w.p("img.qcow2");
    let b = read_base(&p);
    let l1e = get_be64(&p, b.l1_offset);
    let l2e = get_be64(&p, b.l2_offset);
    let l1_size = get_be32(&p, H_L1_SIZE) as usize;
    let l1: Vec<u8> = (0..l1_size).flat_map(|_| l1e.to_be_bytes()).collect();
    patch(&p, b.l1_offset, &l1);
    let l2: Vec<u8> = (0..64).flat_map(|_| l2e.to_be_bytes()).collect();
    patch(&p, b.l2_offset, &l2);
    check(&w, "img.qcow2", &[]);
}

/// The overlay reached through a symlink in another directory: QEMU resolves the relative backing name
/// against the path as given (A/), not the symlink's target (B/), so the backing file is not found.
#[test]
fn overlay_through_symlink_relative_backing() {
    let w = Work::new();
    w.mkdir("A");
    w.mkdir("B");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "B/base.qcow2", "1M"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "B/top.qcow2",
    ]);
    std::os::unix::fs::symlink("../B/top.qcow2", w.p("A/top.qcow2")).expect("symlink");
    check(&w, "A/top.qcow2", &[]);
}
