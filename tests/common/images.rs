//! Image recipes shared by the oracle tests: qemu-img/qemu-io wrappers, deterministic data, workloads.
#![allow(dead_code)]

use super::Work;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// `qemu-img create -f qcow2 [-o opts] name size`.
pub fn create(w: &Work, name: &str, opts: &str, size: u64) {
    let size = size.to_string();
    if opts.is_empty() {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, &size]);
    } else {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, &size]);
    }
}

/// `qemu-img create -f qcow2 -b backing -F fmt [-o opts] name [size]`.
pub fn create_overlay(
    w: &Work,
    name: &str,
    backing: &str,
    fmt: &str,
    opts: &str,
    size: Option<u64>,
) {
    let mut args: Vec<String> = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(name.into());
    if let Some(s) = size {
        args.push(s.to_string());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    w.qemu_img(&a);
}

/// Runs qemu-io commands on `img` (format probed; `-f qcow2` given explicitly).
pub fn io(w: &Work, img: &str, cmds: &[String]) {
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    w.qemu_io(&["-f", "qcow2"], img, &c);
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Compressible but non-trivial bytes (text-like).
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = seed;
    while v.len() < len {
        v.extend_from_slice(format!("line {i:08} of the qcow2 oracle test data; ").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// A mixed workload scaled to the cluster size `cs` on an image of `size` bytes: unaligned and
/// cluster-crossing writes, zero writes over unallocated and allocated clusters, whole- and
/// partial-cluster discards, an L2-table-crossing write where the image is large enough, and a write
/// at the very end of the image.
pub fn mixed_workload(cs: u64, size: u64, l2_span: u64) -> Vec<String> {
    let mut c = vec![
        format!("write -P 0x11 0 {}", 3 * cs + 512),
        format!("write -P 0x22 {} 1024", 5 * cs - 512),
        format!("write -P 0x23 {} 512", 6 * cs + cs / 2),
        format!("write -z {} {}", 8 * cs, 2 * cs),
        format!("write -P 0x33 {} {}", 10 * cs, cs),
        format!("write -z {} {}", 10 * cs, cs),
        format!("write -P 0x44 {} {}", 12 * cs, 3 * cs),
        format!("discard {} {}", 12 * cs, cs),
        format!("discard {} 512", 13 * cs + 512),
        format!("write -z {} 512", 14 * cs + 1024),
    ];
    if l2_span + 2 * cs <= size {
        c.push(format!("write -P 0x55 {} {}", l2_span - 1024, 2048));
    }
    c.push(format!("write -P 0x66 {} 4096", size - 4096));
    c
}

pub fn l2_span(cs: u64, extended: bool) -> u64 {
    let entry = if extended { 16 } else { 8 };
    cs * (cs / entry)
}

/// Raw source for compression tests: per cluster, in turn text (compressible), random
/// (incompressible: stored uncompressed), zeros (left unallocated), half random / half zero, half text /
/// half random; a final partial cluster of text.
pub fn compressed_source(cs: u64) -> Vec<u8> {
    let cs = cs as usize;
    let mut v = Vec::new();
    for i in 0..10u64 {
        match i % 5 {
            0 => v.extend(text_bytes(i * 1000, cs)),
            1 => v.extend(random_bytes(i, cs)),
            2 => v.extend(std::iter::repeat_n(0u8, cs)),
            3 => {
                v.extend(random_bytes(i, cs / 2));
                v.extend(std::iter::repeat_n(0u8, cs / 2));
            }
            _ => {
                v.extend(text_bytes(i * 1000, cs / 2));
                v.extend(random_bytes(i, cs / 2));
            }
        }
    }
    v.extend(text_bytes(99_999, cs / 2 + 512));
    v
}

/// Sub-cluster writes (2 KiB sub-clusters at 64 KiB clusters), zero writes, discards.
pub fn extended_l2_cmds() -> Vec<String> {
    vec![
        // One sub-cluster, aligned.
        "write -P 0x11 0 2k".into(),
        // Unaligned inside sub-clusters 2..4 of cluster 0.
        "write -P 0x12 5k 3k".into(),
        // Zero sub-clusters of an allocated cluster.
        "write -z 32k 4k".into(),
        // Zero sub-clusters of an unallocated cluster.
        "write -z 70k 6k".into(),
        // A full cluster, then zero and discard parts of it.
        "write -P 0x13 128k 64k".into(),
        "write -z 130k 2k".into(),
        "discard 140k 8k".into(),
        // Whole-cluster discard.
        "write -P 0x14 256k 64k".into(),
        "discard 256k 64k".into(),
        // Cluster-crossing unaligned write.
        "write -P 0x15 383k 3k".into(),
        // Zero with unmap over sub-clusters.
        "write -P 0x16 512k 64k".into(),
        "write -z -u 514k 4k".into(),
        // Last sub-cluster of a cluster.
        "write -P 0x17 702k 2k".into(),
        // Data near the end.
        "write -P 0x18 4092k 4k".into(),
    ]
}

/// Size of the odd-sized raw base file (not a multiple of 512).
pub const ODD_RAW_SIZE: usize = 1_000_000 + 123;
