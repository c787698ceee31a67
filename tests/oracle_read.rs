//! Oracle tests of the read path: every test builds an image with qemu-img / qemu-io, then checks that
//! `qcow2 convert -O raw` is byte-identical to `qemu-img convert -O raw`, that `qcow2 map --output=json`
//! describes the same extents as `qemu-img map --output=json`, and that `qcow2 info --output=json` (also
//! with `--backing-chain`) agrees with `qemu-img info` on the fields both print.
//!
//! Images are small and sparse so that the suite runs in a few minutes on two cores in a debug build.

mod common;

use common::images::*;
use common::{check_image, check_image_env, Work};

// -------------------------------------------------------------------------------------------------
// cluster sizes

fn cluster_size_case(cs: u64) {
    let w = Work::new();
    // At least 16 clusters plus an odd tail; for 512 B and 4 KiB clusters include an L2 boundary.
    let size = (16 * cs).max(l2_span(cs, false) + 4 * cs).min(64 * MIB) + 3 * 512;
    create(&w, "img.qcow2", &format!("cluster_size={cs}"), size);
    io(
        &w,
        "img.qcow2",
        &mixed_workload(cs, size, l2_span(cs, false)),
    );
    check_image(&w, "img.qcow2");
}

#[test]
fn cluster_size_512() {
    cluster_size_case(512);
}

#[test]
fn cluster_size_4k() {
    cluster_size_case(4 * KIB);
}

#[test]
fn cluster_size_64k() {
    cluster_size_case(64 * KIB);
}

#[test]
fn cluster_size_2m() {
    cluster_size_case(2 * MIB);
}

// -------------------------------------------------------------------------------------------------
// refcount widths

fn refcount_case(bits: u32) {
    let w = Work::new();
    let cs = 64 * KIB;
    let size = 8 * MIB;
    create(&w, "img.qcow2", &format!("refcount_bits={bits}"), size);
    io(
        &w,
        "img.qcow2",
        &mixed_workload(cs, size, l2_span(cs, false)),
    );
    check_image(&w, "img.qcow2");
}

#[test]
fn refcount_bits_1() {
    refcount_case(1);
}

#[test]
fn refcount_bits_8() {
    refcount_case(8);
}

#[test]
fn refcount_bits_16() {
    refcount_case(16);
}

#[test]
fn refcount_bits_64() {
    refcount_case(64);
}

// -------------------------------------------------------------------------------------------------
// compat levels, zero clusters, discards

fn compat_case(compat: &str, cs: u64) {
    let w = Work::new();
    let size = 4 * MIB;
    create(
        &w,
        "img.qcow2",
        &format!("compat={compat},cluster_size={cs}"),
        size,
    );
    io(
        &w,
        "img.qcow2",
        &mixed_workload(cs, size, l2_span(cs, false)),
    );
    check_image(&w, "img.qcow2");
}

#[test]
fn compat_0_10() {
    compat_case("0.10", 64 * KIB);
}

#[test]
fn compat_0_10_4k_clusters() {
    compat_case("0.10", 4 * KIB);
}

#[test]
fn compat_1_1() {
    compat_case("1.1", 64 * KIB);
}

/// v2 over a backing file: zero writes become explicit zeros, discards do nothing.
#[test]
fn compat_0_10_over_backing() {
    let w = Work::new();
    create(&w, "base.qcow2", "compat=0.10", 4 * MIB);
    io(&w, "base.qcow2", &["write -P 0x7a 0 4M".to_string()]);
    create_overlay(&w, "top.qcow2", "base.qcow2", "qcow2", "compat=0.10", None);
    io(
        &w,
        "top.qcow2",
        &mixed_workload(64 * KIB, 4 * MIB, l2_span(64 * KIB, false)),
    );
    check_image(&w, "top.qcow2");
}

#[test]
fn zero_clusters() {
    let w = Work::new();
    let cs = 64 * KIB;
    create(&w, "img.qcow2", "", 8 * MIB);
    let cmds: Vec<String> = vec![
        "write -P 0x5a 0 1M".into(),
        // Zero over allocated whole clusters: keeps the allocation (zero flag + offset).
        format!("write -z 0 {}", 2 * cs),
        // Zero with unmap.
        format!("write -z -u {} {}", 2 * cs, 2 * cs),
        // Partial-cluster zero over data: explicit zeros.
        format!("write -z {} 4096", 5 * cs + 512),
        // Zero over unallocated clusters.
        "write -z 2M 1M".into(),
        // Unaligned zero write spanning clusters.
        format!("write -z {} {}", 4 * MIB - 1000, 70_000),
        // Data after zero.
        format!("write -P 0x6b {} 1024", 2 * MIB + 4096),
    ];
    io(&w, "img.qcow2", &cmds);
    check_image(&w, "img.qcow2");
}

#[test]
fn discarded_ranges() {
    let w = Work::new();
    let cs = 64 * KIB;
    create(&w, "img.qcow2", "", 8 * MIB);
    let cmds: Vec<String> = vec![
        "write -P 0x3c 0 4M".into(),
        // Whole clusters: become zero clusters on v3.
        format!("discard 0 {}", 2 * cs),
        // Partial cluster: no effect.
        format!("discard {} 4096", 3 * cs + 4096),
        // Unaligned range covering some whole clusters.
        format!("discard {} {}", 5 * cs + 100, 3 * cs),
        // A large range.
        "discard 2M 1M".into(),
        // Discard of unallocated space.
        "discard 5M 1M".into(),
        // Rewrite part of a discarded range.
        format!("write -P 0x4d {} 512", cs + 512),
    ];
    io(&w, "img.qcow2", &cmds);
    check_image(&w, "img.qcow2");
}

#[test]
fn discarded_ranges_over_backing() {
    let w = Work::new();
    create(&w, "base.qcow2", "", 4 * MIB);
    io(&w, "base.qcow2", &["write -P 0x21 0 4M".to_string()]);
    create_overlay(&w, "top.qcow2", "base.qcow2", "qcow2", "", None);
    let cmds: Vec<String> = vec![
        "write -P 0x3c 0 2M".into(),
        "discard 0 256k".into(),
        "discard 1M 100k".into(),
        "discard 3M 512k".into(),
    ];
    io(&w, "top.qcow2", &cmds);
    check_image(&w, "top.qcow2");
}

// -------------------------------------------------------------------------------------------------
// compressed images

fn compressed_case(ctype: &str, cs: u64, overwrite: bool) {
    let w = Work::new();
    w.write_file("src.raw", &compressed_source(cs));
    let opts = format!("cluster_size={cs},compression_type={ctype}");
    w.qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &opts,
        "src.raw",
        "img.qcow2",
    ]);
    if overwrite {
        let cmds: Vec<String> = vec![
            // Part of a compressed cluster: COW decompresses and writes a normal cluster.
            format!("write -P 0x77 {} 512", 512),
            // Zeroes over a compressed cluster (always unmapped).
            format!("write -z {} {}", 5 * cs, cs),
            // Straddling a compressed and an uncompressed cluster.
            format!("write -P 0x78 {} 1024", 4 * cs - 512),
            // Discard of a whole compressed cluster.
            format!("discard {} {}", 9 * cs, cs),
            // Into the zero (unallocated) cluster.
            format!("write -P 0x79 {} 4096", 2 * cs),
        ];
        io(&w, "img.qcow2", &cmds);
    }
    check_image(&w, "img.qcow2");
}

#[test]
fn compressed_zlib_4k() {
    compressed_case("zlib", 4 * KIB, false);
}

#[test]
fn compressed_zlib_4k_overwritten() {
    compressed_case("zlib", 4 * KIB, true);
}

#[test]
fn compressed_zlib_64k() {
    compressed_case("zlib", 64 * KIB, false);
}

#[test]
fn compressed_zlib_64k_overwritten() {
    compressed_case("zlib", 64 * KIB, true);
}

#[test]
fn compressed_zlib_2m() {
    compressed_case("zlib", 2 * MIB, false);
}

#[test]
fn compressed_zlib_2m_overwritten() {
    compressed_case("zlib", 2 * MIB, true);
}

#[test]
fn compressed_zstd_4k() {
    compressed_case("zstd", 4 * KIB, false);
}

#[test]
fn compressed_zstd_4k_overwritten() {
    compressed_case("zstd", 4 * KIB, true);
}

#[test]
fn compressed_zstd_64k() {
    compressed_case("zstd", 64 * KIB, false);
}

#[test]
fn compressed_zstd_64k_overwritten() {
    compressed_case("zstd", 64 * KIB, true);
}

#[test]
fn compressed_zstd_2m() {
    compressed_case("zstd", 2 * MIB, false);
}

#[test]
fn compressed_zstd_2m_overwritten() {
    compressed_case("zstd", 2 * MIB, true);
}

/// Compressed with 512-byte clusters (the smallest descriptor layout) and v2.
#[test]
fn compressed_zlib_512_compat_0_10() {
    let w = Work::new();
    w.write_file("src.raw", &compressed_source(512));
    w.qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512,compat=0.10",
        "src.raw",
        "img.qcow2",
    ]);
    check_image(&w, "img.qcow2");
}

// -------------------------------------------------------------------------------------------------
// extended L2

#[test]
fn extended_l2() {
    let w = Work::new();
    create(&w, "img.qcow2", "extended_l2=on,cluster_size=64k", 4 * MIB);
    io(&w, "img.qcow2", &extended_l2_cmds());
    check_image(&w, "img.qcow2");
}

#[test]
fn extended_l2_16k_clusters() {
    let w = Work::new();
    create(&w, "img.qcow2", "extended_l2=on,cluster_size=16k", 4 * MIB);
    let cmds: Vec<String> = vec![
        "write -P 0x21 0 512".into(),
        "write -P 0x22 1536 1k".into(),
        "write -z 8k 1k".into(),
        "write -P 0x23 32k 16k".into(),
        "discard 32k 16k".into(),
        "write -P 0x24 2047k 2k".into(),
    ];
    io(&w, "img.qcow2", &cmds);
    check_image(&w, "img.qcow2");
}

#[test]
fn extended_l2_over_backing() {
    let w = Work::new();
    create(&w, "base.qcow2", "", 4 * MIB);
    io(
        &w,
        "base.qcow2",
        &[
            "write -P 0xb0 0 3M".to_string(),
            "write -P 0xb1 3584k 512k".to_string(),
        ],
    );
    create_overlay(
        &w,
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        "extended_l2=on,cluster_size=64k",
        None,
    );
    io(&w, "top.qcow2", &extended_l2_cmds());
    check_image(&w, "top.qcow2");
}

#[test]
fn extended_l2_preallocation_metadata() {
    let w = Work::new();
    create(
        &w,
        "img.qcow2",
        "extended_l2=on,cluster_size=32k,preallocation=metadata",
        2 * MIB,
    );
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0x31 1k 1k".to_string(),
            "write -z 64k 8k".to_string(),
        ],
    );
    check_image(&w, "img.qcow2");
}

// -------------------------------------------------------------------------------------------------
// backing chains

/// base.raw (1000123 bytes) <- mid.qcow2 (mid_size) <- top.qcow2 (top_size), with writes at each level.
fn three_deep_chain(mid_size: u64, top_size: u64) {
    let w = Work::new();
    let mut base = random_bytes(7, ODD_RAW_SIZE);
    base[..4096].copy_from_slice(&text_bytes(0, 4096));
    w.write_file("base.raw", &base);
    create_overlay(
        &w,
        "mid.qcow2",
        "base.raw",
        "raw",
        "cluster_size=4k",
        Some(mid_size),
    );
    let mut mid_cmds = vec![
        "write -P 0x41 8k 4k".to_string(),
        "write -z 64k 4k".into(),
        "discard 128k 8k".into(),
    ];
    if mid_size > 1_000_448 {
        mid_cmds.push(format!("write -P 0x42 {} 8k", 1_000_448 - 4096));
    }
    mid_cmds.push(format!("write -P 0x43 {} 4k", mid_size - 4096));
    io(&w, "mid.qcow2", &mid_cmds);
    create_overlay(&w, "top.qcow2", "mid.qcow2", "qcow2", "", Some(top_size));
    let top_cmds = vec![
        "write -P 0x51 0 1k".to_string(),
        "write -z 100k 2k".into(),
        format!("write -P 0x52 {} 512", top_size - 512),
    ];
    io(&w, "top.qcow2", &top_cmds);
    check_image(&w, "top.qcow2");
    check_image(&w, "mid.qcow2");
}

/// Middle overlay smaller than the raw base, top larger than both.
#[test]
fn chain_three_deep_odd_raw_base_mid_smaller_top_larger() {
    three_deep_chain(512 * KIB, 3 * MIB);
}

/// Middle overlay larger than the raw base, top smaller than both.
#[test]
fn chain_three_deep_odd_raw_base_mid_larger_top_smaller() {
    three_deep_chain(2 * MIB, 768 * KIB);
}

/// A raw file whose size is not a multiple of 512 read directly.
#[test]
fn raw_file_odd_size() {
    let w = Work::new();
    w.write_file("base.raw", &random_bytes(3, ODD_RAW_SIZE));
    check_image(&w, "base.raw");
}

/// overlay `top.qcow2` whose backing name is `sub/base.qcow2`.
#[test]
fn backing_file_in_subdirectory() {
    let w = Work::new();
    w.mkdir("sub");
    create(&w, "sub/base.qcow2", "", 2 * MIB);
    io(&w, "sub/base.qcow2", &["write -P 0x61 0 2M".to_string()]);
    create_overlay(&w, "top.qcow2", "sub/base.qcow2", "qcow2", "", None);
    io(&w, "top.qcow2", &["write -P 0x62 64k 64k".to_string()]);
    check_image(&w, "top.qcow2");
}

/// overlay `a/top.qcow2` whose backing name `../b/base.qcow2` is relative to the overlay's directory,
/// not to the working directory.
#[test]
fn backing_file_relative_to_overlay_directory() {
    let w = Work::new();
    w.mkdir("a");
    w.mkdir("b");
    create(&w, "b/base.qcow2", "", 2 * MIB);
    io(&w, "b/base.qcow2", &["write -P 0x63 0 2M".to_string()]);
    // qemu-img resolves -b relative to the new image's directory.
    create_overlay(&w, "a/top.qcow2", "../b/base.qcow2", "qcow2", "", None);
    io(&w, "a/top.qcow2", &["write -P 0x64 1M 4k".to_string()]);
    check_image(&w, "a/top.qcow2");
}

/// Backing file without backing_fmt: probed.
#[test]
fn backing_file_probed_format() {
    let w = Work::new();
    create(&w, "base.qcow2", "cluster_size=4k", 2 * MIB);
    io(&w, "base.qcow2", &["write -P 0x65 0 1M".to_string()]);
    create_overlay(&w, "top.qcow2", "base.qcow2", "qcow2", "", None);
    // Drop the backing format: turn its header extension into an unknown (ignored) one.
    let (ext, _) = common::find_header_extension(&w.p("top.qcow2"), 0xE279_2ACA)
        .expect("backing format extension present");
    common::put_be32(&w.p("top.qcow2"), ext, 0x7e57_0001);
    io(&w, "top.qcow2", &["write -P 0x66 4k 4k".to_string()]);
    check_image(&w, "top.qcow2");
}

// -------------------------------------------------------------------------------------------------
// external data files

fn data_file_case(raw: bool) {
    let w = Work::new();
    let opts = if raw {
        "data_file=img.data,data_file_raw=on"
    } else {
        "data_file=img.data"
    };
    create(&w, "img.qcow2", opts, 8 * MIB);
    io(
        &w,
        "img.qcow2",
        &mixed_workload(64 * KIB, 8 * MIB, l2_span(64 * KIB, false)),
    );
    check_image(&w, "img.qcow2");
}

#[test]
fn external_data_file() {
    data_file_case(false);
}

#[test]
fn external_data_file_raw() {
    data_file_case(true);
}

#[test]
fn external_data_file_over_backing() {
    let w = Work::new();
    create(&w, "base.qcow2", "", 4 * MIB);
    io(&w, "base.qcow2", &["write -P 0x71 0 4M".to_string()]);
    create_overlay(
        &w,
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        "data_file=top.data",
        None,
    );
    io(
        &w,
        "top.qcow2",
        &[
            "write -P 0x72 64k 64k".to_string(),
            "write -P 0x73 200k 1k".into(),
            "write -z 1M 128k".into(),
        ],
    );
    check_image(&w, "top.qcow2");
}

// -------------------------------------------------------------------------------------------------
// snapshots, preallocation, dirty images

#[test]
fn internal_snapshot_overwritten() {
    let w = Work::new();
    create(&w, "img.qcow2", "cluster_size=4k", 4 * MIB);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0x81 0 2M".to_string(),
            "write -P 0x82 3M 64k".into(),
        ],
    );
    w.qemu_img(&["snapshot", "-c", "snap1", "img.qcow2"]);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0x83 4k 4k".to_string(),
            "write -z 1M 64k".into(),
            "discard 1536k 64k".into(),
            "write -P 0x84 3M 1k".into(),
        ],
    );
    w.qemu_img(&["snapshot", "-c", "snap2", "img.qcow2"]);
    io(&w, "img.qcow2", &["write -P 0x85 6k 2k".to_string()]);
    check_image(&w, "img.qcow2");
}

#[test]
fn preallocation_metadata() {
    let w = Work::new();
    create(&w, "img.qcow2", "preallocation=metadata", 16 * MIB);
    io(
        &w,
        "img.qcow2",
        &[
            "write -P 0x91 0 100k".to_string(),
            "write -z 1M 64k".into(),
            "discard 2M 128k".into(),
        ],
    );
    check_image(&w, "img.qcow2");
}

#[test]
fn preallocation_metadata_small_clusters() {
    let w = Work::new();
    create(
        &w,
        "img.qcow2",
        "preallocation=metadata,cluster_size=4k",
        4 * MIB,
    );
    io(&w, "img.qcow2", &["write -P 0x92 10k 10k".to_string()]);
    check_image(&w, "img.qcow2");
}

#[test]
fn dirty_lazy_refcounts() {
    let w = Work::new();
    create(
        &w,
        "img.qcow2",
        "lazy_refcounts=on,cluster_size=4k",
        4 * MIB,
    );
    io(&w, "img.qcow2", &["write -P 0xa0 0 64k".to_string()]);
    let o = w.qemu_io_try(
        &["-f", "qcow2"],
        "img.qcow2",
        &[
            "write -P 0xa1 32k 64k",
            "write -P 0xa2 2M 8k",
            "write -z 1M 64k",
            "abort",
        ],
    );
    assert!(
        !o.success(),
        "qemu-io abort should kill qemu-io: {}",
        o.describe()
    );
    let info = common::parse_json(&w.qemu_img(&["info", "--output=json", "img.qcow2"]));
    assert_eq!(
        info["dirty-flag"],
        serde_json::json!(true),
        "recipe must leave a dirty image"
    );
    check_image(&w, "img.qcow2");
}

// -------------------------------------------------------------------------------------------------
// many scattered L2 tables read with a small L2 cache

#[test]
fn scattered_l2_tables_small_cache() {
    let w = Work::new();
    // 512-byte clusters: one L2 table maps 32 KiB; writes every 64 KiB over 32 MiB -> 512 L2 tables.
    let size = 32 * MIB;
    create(&w, "img.qcow2", "cluster_size=512", size);
    let mut cmds = Vec::new();
    for i in 0..512u64 {
        let off = i * 64 * KIB + (i * 512) % (32 * KIB);
        cmds.push(format!("write -P {} {} 512", i % 251 + 1, off));
    }
    // A few multi-cluster writes crossing L2 tables.
    cmds.push(format!("write -P 0xee {} 4096", 32 * KIB - 2048));
    cmds.push(format!("write -P 0xef {} 4096", 10 * MIB + 32 * KIB - 1024));
    io(&w, "img.qcow2", &cmds);
    check_image_env(&w, "img.qcow2", &[("QCOW2_L2_CACHE_SIZE", "4096")]);
}
