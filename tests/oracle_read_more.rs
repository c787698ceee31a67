//! More oracle tests of the read path, beyond the list: images shaped by other qemu-img commands
//! (amend, resize, commit, rebase, snapshot apply/delete, convert -B), preallocation modes, bitmaps,
//! unknown feature bits, odd file names and paths, sparse raw files, huge sparse images. Same checks as
//! `oracle_read`: convert bytes, map extents, info fields.

mod common;

use common::images::*;
use common::{check_image, Work};
// -------------------------------------------------------------------------------------------------
// further cases beyond the list

/// Extended L2 image made by `qemu-img convert -c`: compressed clusters in 128-bit L2 entries.
#[test]
fn extended_l2_compressed() {
    let w = Work::new();
    w.write_file("src.raw", &compressed_source(64 * KIB));
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
    io(
        &w,
        "img.qcow2",
        &["write -P 0x19 2k 2k".to_string(), "write -z 320k 4k".into()],
    );
    check_image(&w, "img.qcow2");
}

/// Compressed clusters with 1-bit refcounts (packing cannot share a host cluster).
#[test]
fn compressed_refcount_bits_1() {
    let w = Work::new();
    w.write_file("src.raw", &compressed_source(4 * KIB));
    w.qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=1",
        "src.raw",
        "img.qcow2",
    ]);
    check_image(&w, "img.qcow2");
}

/// A huge sparse image (4 TiB virtual, 64 KiB clusters: 8192 L1 entries) with a few writes: map and
/// info only (converting 4 TiB to compare would take too long).
#[test]
fn huge_sparse_image_map() {
    let w = Work::new();
    create(&w, "img.qcow2", "", 4 << 40);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0x1a 0 64k".to_string(),
            "write -P 0x1b 1T 4k".into(),
            "write -z 2T 1M".into(),
            format!("write -P 0x1c {} 512", (4u64 << 40) - 512),
        ],
    );
    common::check_map_info(&w, "img.qcow2");
}

/// preallocation=falloc and =full: allocated clusters that were never written.
#[test]
fn preallocation_falloc() {
    let w = Work::new();
    create(&w, "img.qcow2", "preallocation=falloc", 4 * MIB);
    io(&w, "img.qcow2", &["write -P 0x93 64k 4k".to_string()]);
    check_image(&w, "img.qcow2");
}

#[test]
fn preallocation_full() {
    let w = Work::new();
    create(
        &w,
        "img.qcow2",
        "preallocation=full,cluster_size=4k",
        2 * MIB,
    );
    io(&w, "img.qcow2", &["write -z 8k 4k".to_string()]);
    check_image(&w, "img.qcow2");
}

/// backing_fmt=raw on a backing file that is really qcow2: its bytes are read as raw data.
#[test]
fn backing_format_raw_honoured_for_qcow2_file() {
    let w = Work::new();
    create(&w, "base.qcow2", "cluster_size=4k", MIB);
    io(&w, "base.qcow2", &["write -P 0x94 0 16k".to_string()]);
    let base_len = std::fs::metadata(w.p("base.qcow2")).expect("stat").len();
    create_overlay(
        &w,
        "top.qcow2",
        "base.qcow2",
        "raw",
        "",
        Some(base_len.next_multiple_of(512) + 64 * KIB),
    );
    io(&w, "top.qcow2", &["write -P 0x95 0 512".to_string()]);
    check_image(&w, "top.qcow2");
}

/// A chain across directories: a/top.qcow2 -> ../b/mid.qcow2 -> ../c/base.qcow2, each name relative to
/// the directory of the image that names it.
#[test]
fn chain_across_directories() {
    let w = Work::new();
    for d in ["a", "b", "c"] {
        w.mkdir(d);
    }
    create(&w, "c/base.qcow2", "", 2 * MIB);
    io(&w, "c/base.qcow2", &["write -P 0x96 0 2M".to_string()]);
    create_overlay(&w, "b/mid.qcow2", "../c/base.qcow2", "qcow2", "", None);
    io(&w, "b/mid.qcow2", &["write -P 0x97 64k 64k".to_string()]);
    create_overlay(&w, "a/top.qcow2", "../b/mid.qcow2", "qcow2", "", None);
    io(
        &w,
        "a/top.qcow2",
        &[
            "write -P 0x98 128k 4k".to_string(),
            "write -z 1M 64k".into(),
        ],
    );
    check_image(&w, "a/top.qcow2");
}

/// Zero writes and discards in a v3 overlay over data in the backing file.
#[test]
fn zero_over_backing() {
    let w = Work::new();
    create(&w, "base.qcow2", "cluster_size=4k", 2 * MIB);
    io(&w, "base.qcow2", &["write -P 0x99 0 2M".to_string()]);
    create_overlay(
        &w,
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        "cluster_size=4k",
        None,
    );
    io(
        &w,
        "top.qcow2",
        &[
            "write -z 0 8k".to_string(),
            "write -z 10k 1k".into(),
            "write -z -u 64k 64k".into(),
            "write -P 0x9a 256k 4k".into(),
            "write -z 256k 4k".into(),
        ],
    );
    check_image(&w, "top.qcow2");
}

/// A qcow2 file read with `-f raw`, and a raw file holding qcow2-looking data.
#[test]
fn qcow2_file_read_as_raw() {
    let w = Work::new();
    create(&w, "img.qcow2", "", MIB);
    io(&w, "img.qcow2", &["write -P 0x9b 0 64k".to_string()]);
    let q = w.qemu_img(&["convert", "-f", "raw", "-O", "raw", "img.qcow2", "q.raw"]);
    drop(q);
    let o = w.qcow2_try(
        &["convert", "-f", "raw", "-O", "raw", "img.qcow2", "o.raw"],
        &[],
        common::ORACLE_TIMEOUT,
    );
    assert!(o.success(), "our convert -f raw failed: {}", o.describe());
    if let Err(e) = common::diff_files(&w.p("q.raw"), &w.p("o.raw"), "qemu-img", "ours") {
        panic!("convert -f raw of a qcow2 file: {e}");
    }
}

/// Snapshots on a v2 image, overwritten afterwards.
#[test]
fn internal_snapshot_compat_0_10() {
    let w = Work::new();
    create(&w, "img.qcow2", "compat=0.10", 4 * MIB);
    io(&w, "img.qcow2", &["write -P 0x9c 0 1M".to_string()]);
    w.qemu_img(&["snapshot", "-c", "s1", "img.qcow2"]);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0x9d 64k 64k".to_string(),
            "write -z 512k 64k".into(),
        ],
    );
    check_image(&w, "img.qcow2");
}

/// Persistent dirty bitmaps (bitmaps extension + autoclear bit 0): the image must open and read as usual.
#[test]
fn persistent_bitmaps() {
    let w = Work::new();
    create(&w, "img.qcow2", "", 4 * MIB);
    io(&w, "img.qcow2", &["write -P 0x9e 0 64k".to_string()]);
    w.qemu_img(&["bitmap", "--add", "img.qcow2", "b0"]);
    w.qemu_img(&["bitmap", "--add", "-g", "128k", "img.qcow2", "b1"]);
    io(&w, "img.qcow2", &["write -P 0x9f 1M 64k".to_string()]);
    check_image(&w, "img.qcow2");
}

/// Unknown compatible and autoclear feature bits and an unknown header extension are ignored.
#[test]
fn unknown_compatible_autoclear_bits_and_extension() {
    let w = Work::new();
    create(&w, "img.qcow2", "", 4 * MIB);
    io(&w, "img.qcow2", &["write -P 0xa3 0 64k".to_string()]);
    let p = w.p("img.qcow2");
    // compatible_features (offset 80) bit 10, autoclear_features (offset 88) bit 5.
    common::put_be64(&p, 80, 1 << 10);
    common::put_be64(&p, 88, 1 << 5);
    // The feature-name table becomes an unknown extension (same length and data).
    let (ext, _) = common::find_header_extension(&p, 0x6803_f857).expect("feature name table");
    common::put_be32(&p, ext, 0x7e57_0002);
    check_image(&w, "img.qcow2");
}

/// A raw backing file without backing_fmt (probed as raw), shorter than the overlay.
#[test]
fn backing_raw_probed() {
    let w = Work::new();
    w.write_file("base.raw", &random_bytes(11, 300_001));
    create_overlay(
        &w,
        "top.qcow2",
        "base.raw",
        "raw",
        "cluster_size=4k",
        Some(MIB),
    );
    let (ext, _) = common::find_header_extension(&w.p("top.qcow2"), 0xE279_2ACA)
        .expect("backing format extension present");
    common::put_be32(&w.p("top.qcow2"), ext, 0x7e57_0001);
    io(&w, "top.qcow2", &["write -P 0xa4 296k 8k".to_string()]);
    check_image(&w, "top.qcow2");
}

/// `convert -O raw` leaves zero ranges as holes (as qemu-img does), and `-p` does not change the output.
#[test]
fn convert_output_is_sparse() {
    use std::os::unix::fs::MetadataExt;
    let w = Work::new();
    create(&w, "img.qcow2", "", 64 * MIB);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0xa5 0 1M".to_string(),
            "write -z 8M 8M".into(),
            "write -P 0xa6 40M 64k".into(),
        ],
    );
    w.qemu_img(&["convert", "-O", "raw", "img.qcow2", "q.raw"]);
    let o = w.qcow2_try(
        &["convert", "-p", "-O", "raw", "img.qcow2", "o.raw"],
        &[],
        common::ORACLE_TIMEOUT,
    );
    assert!(o.success(), "our convert -p failed: {}", o.describe());
    if let Err(e) = common::diff_files(&w.p("q.raw"), &w.p("o.raw"), "qemu-img", "ours") {
        panic!("convert -p output differs: {e}");
    }
    let qb = std::fs::metadata(w.p("q.raw")).expect("stat").blocks() * 512;
    let ob = std::fs::metadata(w.p("o.raw")).expect("stat").blocks() * 512;
    assert!(
        ob <= qb + MIB,
        "our raw output is not sparse: {ob} bytes allocated, qemu-img's {qb}"
    );
}

// -------------------------------------------------------------------------------------------------
// images shaped by other qemu-img commands (amend, resize, commit, rebase, snapshot apply/delete)

#[test]
fn extended_l2_data_file_raw() {
    let w = Work::new();
    create(
        &w,
        "img.qcow2",
        "extended_l2=on,data_file=img.data,data_file_raw=on",
        4 * MIB,
    );
    io(&w, "img.qcow2", &extended_l2_cmds());
    check_image(&w, "img.qcow2");
}

#[test]
fn extended_l2_2m_clusters() {
    let w = Work::new();
    // 64 KiB sub-clusters.
    create(&w, "img.qcow2", "extended_l2=on,cluster_size=2M", 16 * MIB);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0x41 0 64k".to_string(),
            "write -P 0x42 100k 10k".into(),
            "write -z 2M 128k".into(),
            "write -P 0x43 4M 2M".into(),
            "write -z -u 4224k 64k".into(),
            "write -P 0x44 16320k 64k".into(),
        ],
    );
    check_image(&w, "img.qcow2");
}

#[test]
fn internal_snapshot_applied_and_deleted() {
    let w = Work::new();
    create(&w, "img.qcow2", "cluster_size=4k", 4 * MIB);
    io(&w, "img.qcow2", &["write -P 0xb1 0 1M".to_string()]);
    w.qemu_img(&["snapshot", "-c", "s1", "img.qcow2"]);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0xb2 0 512k".to_string(),
            "write -P 0xb3 2M 64k".into(),
        ],
    );
    w.qemu_img(&["snapshot", "-c", "s2", "img.qcow2"]);
    w.qemu_img(&["snapshot", "-a", "s1", "img.qcow2"]);
    io(&w, "img.qcow2", &["write -P 0xb4 8k 4k".to_string()]);
    w.qemu_img(&["snapshot", "-d", "s2", "img.qcow2"]);
    check_image(&w, "img.qcow2");
}

#[test]
fn amend_downgrade_to_compat_0_10() {
    let w = Work::new();
    create(&w, "img.qcow2", "cluster_size=4k", 4 * MIB);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0xb5 0 256k".to_string(),
            "write -z 64k 64k".into(),
            "write -z 1M 64k".into(),
        ],
    );
    w.qemu_img(&["amend", "-o", "compat=0.10", "img.qcow2"]);
    check_image(&w, "img.qcow2");
}

#[test]
fn amend_refcount_bits() {
    let w = Work::new();
    create(&w, "img.qcow2", "", 8 * MIB);
    io(
        &w,
        "img.qcow2",
        &mixed_workload(64 * KIB, 8 * MIB, 512 * MIB),
    );
    w.qemu_img(&["amend", "-o", "refcount_bits=64", "img.qcow2"]);
    check_image(&w, "img.qcow2");
}

#[test]
fn resize_grow() {
    let w = Work::new();
    // 512-byte clusters: 1 MiB -> 40 MiB needs a larger (moved) L1 table.
    create(&w, "img.qcow2", "cluster_size=512", MIB);
    io(&w, "img.qcow2", &["write -P 0xb6 0 1M".to_string()]);
    w.qemu_img(&["resize", "img.qcow2", "40M"]);
    io(&w, "img.qcow2", &["write -P 0xb7 39M 4k".to_string()]);
    check_image(&w, "img.qcow2");
}

#[test]
fn resize_shrink() {
    let w = Work::new();
    create(&w, "img.qcow2", "", 8 * MIB);
    io(
        &w,
        "img.qcow2",
        &["write -P 0xb8 0 8M".to_string(), "write -z 1M 1M".into()],
    );
    w.qemu_img(&["resize", "--shrink", "img.qcow2", "3000320"]);
    check_image(&w, "img.qcow2");
}

#[test]
fn committed_chain() {
    let w = Work::new();
    create(&w, "base.qcow2", "", 4 * MIB);
    io(&w, "base.qcow2", &["write -P 0xb9 0 4M".to_string()]);
    create_overlay(&w, "mid.qcow2", "base.qcow2", "qcow2", "", None);
    io(
        &w,
        "mid.qcow2",
        &["write -P 0xba 1M 1M".to_string(), "write -z 3M 64k".into()],
    );
    create_overlay(&w, "top.qcow2", "mid.qcow2", "qcow2", "", None);
    io(&w, "top.qcow2", &["write -P 0xbb 1536k 4k".to_string()]);
    w.qemu_img(&["commit", "top.qcow2"]);
    check_image(&w, "mid.qcow2");
    check_image(&w, "top.qcow2");
}

#[test]
fn rebased_safely_onto_other_backing() {
    let w = Work::new();
    create(&w, "a.qcow2", "", 4 * MIB);
    io(&w, "a.qcow2", &["write -P 0xbc 0 4M".to_string()]);
    create(&w, "b.qcow2", "", 4 * MIB);
    io(&w, "b.qcow2", &["write -P 0xbd 1M 1M".to_string()]);
    create_overlay(&w, "top.qcow2", "a.qcow2", "qcow2", "", None);
    io(&w, "top.qcow2", &["write -P 0xbe 0 64k".to_string()]);
    w.qemu_img(&["rebase", "-b", "b.qcow2", "-F", "qcow2", "top.qcow2"]);
    check_image(&w, "top.qcow2");
}

#[test]
fn convert_to_qcow2_from_chain_with_backing() {
    let w = Work::new();
    create(&w, "base.qcow2", "", 4 * MIB);
    io(&w, "base.qcow2", &["write -P 0xbf 0 2M".to_string()]);
    create_overlay(&w, "top.qcow2", "base.qcow2", "qcow2", "", None);
    io(
        &w,
        "top.qcow2",
        &["write -P 0xc0 1M 64k".to_string(), "write -z 0 64k".into()],
    );
    // A new image holding only the differences from base (-B).
    w.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "new.qcow2",
    ]);
    check_image(&w, "new.qcow2");
}

/// A sparse raw file (holes between data) read directly and as a backing file.
#[test]
fn raw_sparse_file_and_backing() {
    use std::os::unix::fs::FileExt;
    let w = Work::new();
    let f = std::fs::File::create(w.p("base.raw")).expect("create");
    f.set_len(8 * MIB + 777).expect("set_len");
    f.write_all_at(&random_bytes(21, 100_000), 0)
        .expect("write");
    f.write_all_at(&random_bytes(22, 4096), 3 * MIB + 123)
        .expect("write");
    f.write_all_at(&random_bytes(23, 777), 8 * MIB)
        .expect("write");
    drop(f);
    check_image(&w, "base.raw");
    create_overlay(&w, "top.qcow2", "base.raw", "raw", "cluster_size=4k", None);
    io(&w, "top.qcow2", &["write -P 0xc1 64k 4k".to_string()]);
    check_image(&w, "top.qcow2");
}

/// A fully written 64 MiB image with 4 KiB clusters (16384 data clusters, 32 L2 tables).
#[test]
fn fully_written_64m_4k_clusters() {
    let w = Work::new();
    create(&w, "img.qcow2", "cluster_size=4k", 64 * MIB);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0xc2 0 64M".to_string(),
            "write -P 0xc3 12345 100000".into(),
        ],
    );
    check_image(&w, "img.qcow2");
}

/// File names with spaces, a comma and non-ASCII characters, in the image and the backing name.
#[test]
fn odd_file_names() {
    let w = Work::new();
    create(&w, "base file, é.qcow2", "", 2 * MIB);
    io(
        &w,
        "base file, é.qcow2",
        &["write -P 0xc4 0 1M".to_string()],
    );
    create_overlay(&w, "top, x.qcow2", "base file, é.qcow2", "qcow2", "", None);
    io(&w, "top, x.qcow2", &["write -P 0xc5 64k 4k".to_string()]);
    check_image(&w, "top, x.qcow2");
}

/// The image named by an absolute path (filename and full-backing-filename become absolute).
#[test]
fn absolute_image_path() {
    let w = Work::new();
    w.mkdir("sub");
    create(&w, "sub/base.qcow2", "", 2 * MIB);
    io(&w, "sub/base.qcow2", &["write -P 0xc6 0 1M".to_string()]);
    create_overlay(&w, "sub/top.qcow2", "base.qcow2", "qcow2", "", None);
    let abs = w.p("sub/top.qcow2");
    check_image(&w, abs.to_str().expect("utf-8 temp path"));
}

/// An absolute backing file name.
#[test]
fn absolute_backing_name() {
    let w = Work::new();
    create(&w, "base.qcow2", "", 2 * MIB);
    io(&w, "base.qcow2", &["write -P 0xc7 0 1M".to_string()]);
    let abs = w.p("base.qcow2");
    create_overlay(
        &w,
        "top.qcow2",
        abs.to_str().expect("utf-8 temp path"),
        "qcow2",
        "",
        None,
    );
    io(&w, "top.qcow2", &["write -P 0xc8 4k 4k".to_string()]);
    check_image(&w, "top.qcow2");
}
