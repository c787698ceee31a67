//! Writes into images qemu-img made (issue 3, acceptance "Writes into images qemu-img made").
//!
//! Proves that our engine writes correctly into the on-disk states QEMU produces and that a fresh image
//! never has: (a) an internal snapshot (L2 tables and data clusters shared, COPIED cleared in L1 and L2),
//! (b) compressed images (`qemu-img convert -c`, zlib and zstd), (c) zero clusters that kept their
//! allocation (`write -z` over data: COPIED set, yet the data must not show through), (d) extended L2
//! with partially allocated and zeroed sub-clusters over a backing file; (a)-(c) also with extended L2,
//! and a v2 overlay of a backing file (where discards and zero writes differ most). Each image is copied
//! to a twin; the same seeded script of writes, zero writes (with and without unmap), discards and
//! flushes runs on the twin through qemu-io and on ours through the engine. Then `qemu-img compare` finds the two
//! identical, our engine reads what qemu-img reads, `qemu-img check` finds ours clean, and for (a) the
//! snapshot still reads as it did before the writes (`qemu-img snapshot -a` on a copy).
//!
//! Every setup is checked to really have the state it is about (`qemu-img map`/`snapshot -l`), so a
//! change in qemu-img's defaults cannot turn a case into a plain-image test unnoticed.

mod common;

use common::write::{
    assert_check_clean, assert_same, multi_thread_runtime, qemu_raw, read_all, rw_options, KIB, MIB,
};
use common::{parse_json, Work};
use qcow2::engine::Image;
use qcow2::io::StdFileBackend;
use serde_json::Value;

const SIZE: u64 = 4 * MIB;

/// One request of a script, applied to both twins.
#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, pattern: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

impl Op {
    /// The same request as a qemu-io command.
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write { off, len, pattern } => format!("write -P {pattern} {off} {len}"),
            Op::Zero {
                off,
                len,
                unmap: false,
            } => format!("write -z {off} {len}"),
            Op::Zero {
                off,
                len,
                unmap: true,
            } => format!("write -z -u {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
            Op::Flush => "flush".to_string(),
        }
    }
}

/// xorshift64* generator for the scripts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` seeded requests over the whole disk: 512-byte aligned writes of 512 B to three clusters, zero
/// writes and discards both cluster-aligned and not, and a few flushes; `fixed` requests come first.
fn script(seed: u64, cluster: u64, n: usize, fixed: &[Op]) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut ops = fixed.to_vec();
    for i in 0..n {
        let kind = r.below(100);
        let sectors = SIZE / 512;
        let op = if kind < 55 {
            let len = 512 * (1 + r.below(3 * cluster / 512));
            let off = 512 * r.below(sectors - len / 512);
            Op::Write {
                off,
                len,
                pattern: (1 + i % 250) as u8,
            }
        } else if kind < 95 {
            let (off, len) = if r.below(2) == 0 {
                // Whole clusters.
                let n = 1 + r.below(4);
                let c = r.below(SIZE / cluster - n);
                (c * cluster, n * cluster)
            } else {
                let len = 512 * (1 + r.below(3 * cluster / 512));
                (512 * r.below(sectors - len / 512), len)
            };
            match r.below(3) {
                0 => Op::Discard { off, len },
                1 => Op::Zero {
                    off,
                    len,
                    unmap: false,
                },
                _ => Op::Zero {
                    off,
                    len,
                    unmap: true,
                },
            }
        } else {
            Op::Flush
        };
        ops.push(op);
    }
    ops
}

/// Applies `ops` to `img.qcow2` with our engine (read-write, std backend) and returns what it reads
/// afterwards (before close).
fn run_ours(w: &Work, ops: &[Op]) -> Vec<u8> {
    let path = w.p("img.qcow2");
    multi_thread_runtime().block_on(async move {
        let img = Image::<StdFileBackend>::open(&path, &rw_options())
            .await
            .expect("open read-write");
        for (i, op) in ops.iter().enumerate() {
            let r = match *op {
                Op::Write { off, len, pattern } => {
                    img.write(off, &vec![pattern; len as usize]).await
                }
                Op::Zero { off, len, unmap } => img.write_zeroes(off, len, unmap).await,
                Op::Discard { off, len } => img.discard(off, len).await,
                Op::Flush => img.flush().await,
            };
            if let Err(e) = r {
                panic!("request {i} `{}` failed in our engine: {e}", op.qemu_io());
            }
        }
        let content = read_all(&img).await;
        img.close().await.expect("close");
        content
    })
}

/// Copies `img.qcow2` to `twin.qcow2`, runs `ops` on the twin with qemu-io and on ours with the engine,
/// and checks: twins identical, our reads equal qemu-img's, ours clean.
fn twin_run(w: &Work, ops: &[Op]) {
    std::fs::copy(w.p("img.qcow2"), w.p("twin.qcow2")).expect("copy twin");
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    w.qemu_io(&["-f", "qcow2"], "twin.qcow2", &cmds);
    let ours = run_ours(w, ops);
    let script = cmds.join("\n  ");
    let o = w.qemu_img_try(
        &["compare", "twin.qcow2", "img.qcow2"],
        common::ORACLE_TIMEOUT,
    );
    assert!(
        o.success() && o.stdout_str().contains("Images are identical"),
        "our image differs from qemu-io's twin: {}\nscript:\n  {script}",
        o.describe()
    );
    assert_same(
        &ours,
        &qemu_raw(w, "img.qcow2"),
        "our read of our image vs qemu-img's",
    );
    assert_check_clean(w, "img.qcow2");
}

/// Three seeds per case (`base`, `base + 100`, ...); `WRITE_TWIN_SEEDS=N` runs N when hunting.
fn seeds(base: u64) -> impl Iterator<Item = u64> {
    let n = std::env::var("WRITE_TWIN_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3u64);
    (0..n).map(move |i| base + 100 * i)
}

/// `qemu-img map --output=json img`, parsed.
fn map(w: &Work, img: &str) -> Vec<Value> {
    parse_json(&w.qemu_img(&["map", "--output=json", img]))
        .as_array()
        .expect("map is an array")
        .clone()
}

fn create(w: &Work, name: &str, options: &str, backing: Option<&str>) {
    let size = SIZE.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", options];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.push(name);
    if backing.is_none() {
        args.push(&size);
    }
    w.qemu_img(&args);
}

fn snapshot_case(options: &str, cluster: u64, seed: u64) {
    let w = Work::new();
    create(&w, "img.qcow2", options, None);
    w.qemu_io(
        &[],
        "img.qcow2",
        &[
            "write -P 0x31 0 1M",
            "write -P 0x32 1536k 1M",
            "write -z 3M 64k",
            "write -P 0x33 3200k 300k",
        ],
    );
    w.qemu_img(&["snapshot", "-c", "snap1", "img.qcow2"]);
    let list = w.qemu_img(&["snapshot", "-l", "img.qcow2"]).stdout_str();
    assert!(list.contains("snap1"), "snapshot not created: {list}");
    let before = qemu_raw(&w, "img.qcow2");

    let c = cluster;
    let fixed = [
        // A partial write into a shared cluster (COW of the cluster and of its L2 table).
        Op::Write {
            off: 512,
            len: 1024,
            pattern: 0xa1,
        },
        // Whole shared clusters zeroed, discarded, unmapped.
        Op::Zero {
            off: 4 * c,
            len: 2 * c,
            unmap: false,
        },
        Op::Discard {
            off: 8 * c,
            len: 2 * c,
        },
        Op::Zero {
            off: 12 * c,
            len: c,
            unmap: true,
        },
        // A write across shared and unallocated clusters.
        Op::Write {
            off: MIB - 1024,
            len: c + 2048,
            pattern: 0xa2,
        },
    ];
    twin_run(&w, &script(seed, cluster, 60, &fixed));

    std::fs::copy(w.p("img.qcow2"), w.p("reverted.qcow2")).expect("copy");
    w.qemu_img(&["snapshot", "-a", "snap1", "reverted.qcow2"]);
    assert_same(
        &qemu_raw(&w, "reverted.qcow2"),
        &before,
        "snapshot snap1 of our image (qemu-img snapshot -a) vs the content when it was taken",
    );
    assert_check_clean(&w, "reverted.qcow2");
}

#[test]
fn write_into_internal_snapshot_64k() {
    for seed in seeds(1) {
        snapshot_case("cluster_size=64k", 64 * KIB, seed);
    }
}

#[test]
fn write_into_internal_snapshot_4k() {
    for seed in seeds(2) {
        snapshot_case("cluster_size=4k", 4 * KIB, seed);
    }
}

#[test]
fn write_into_internal_snapshot_extended_l2() {
    for seed in seeds(7) {
        snapshot_case("cluster_size=64k,extended_l2=on", 64 * KIB, seed);
    }
}

fn compressed_case(options: &str, seed: u64) {
    let w = Work::new();
    create(&w, "src.qcow2", "cluster_size=64k", None);
    w.qemu_io(
        &[],
        "src.qcow2",
        &[
            "write -P 0x41 0 1M",
            "write -P 0x42 1052672 512k",
            "write -P 0x43 2M 1M",
            "write -P 0x44 3670016 4k",
        ],
    );
    w.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        options,
        "src.qcow2",
        "img.qcow2",
    ]);
    let compressed = map(&w, "img.qcow2")
        .iter()
        .filter(|e| e["compressed"] == true)
        .count();
    assert!(
        compressed > 0,
        "qemu-img convert -c made no compressed cluster"
    );

    let fixed = [
        // Partial writes into compressed clusters (decompress, COW, free the packed data).
        Op::Write {
            off: 4096,
            len: 512,
            pattern: 0xb1,
        },
        Op::Write {
            off: 65536 - 512,
            len: 1024,
            pattern: 0xb2,
        },
        // A zero write and a discard over whole compressed clusters.
        Op::Zero {
            off: 2 * MIB,
            len: 128 * KIB,
            unmap: false,
        },
        Op::Discard {
            off: 2 * MIB + 256 * KIB,
            len: 64 * KIB,
        },
        // A whole compressed cluster overwritten.
        Op::Write {
            off: 512 * KIB,
            len: 64 * KIB,
            pattern: 0xb3,
        },
    ];
    twin_run(&w, &script(seed, 64 * KIB, 60, &fixed));
}

#[test]
fn write_into_compressed_zlib() {
    for seed in seeds(3) {
        compressed_case("cluster_size=64k,compression_type=zlib", seed);
    }
}

#[test]
fn write_into_compressed_zstd() {
    for seed in seeds(4) {
        compressed_case("cluster_size=64k,compression_type=zstd", seed);
    }
}

#[test]
fn write_into_compressed_extended_l2() {
    for seed in seeds(8) {
        compressed_case(
            "cluster_size=64k,extended_l2=on,compression_type=zstd",
            seed,
        );
    }
}

#[test]
fn write_into_kept_allocation_zero_clusters() {
    for seed in seeds(5) {
        kept_allocation_case("cluster_size=64k", seed);
    }
}

#[test]
fn write_into_kept_allocation_zero_clusters_extended_l2() {
    for seed in seeds(9) {
        kept_allocation_case("cluster_size=64k,extended_l2=on", seed);
    }
}

fn kept_allocation_case(options: &str, seed: u64) {
    let w = Work::new();
    create(&w, "img.qcow2", options, None);
    w.qemu_io(
        &[],
        "img.qcow2",
        &[
            "write -P 0x51 0 2M",
            "write -z 256k 512k",
            "write -z 1M 64k",
            "write -P 0x52 3M 256k",
            "write -z 3M 128k",
        ],
    );
    let kept = map(&w, "img.qcow2")
        .iter()
        .filter(|e| e["zero"] == true && e["offset"].is_u64())
        .count();
    assert!(
        kept > 0,
        "write -z made no zero cluster that kept its allocation"
    );

    let fixed = [
        // Partial writes into kept-allocation zero clusters: the rest must stay zero, not old data.
        Op::Write {
            off: 256 * KIB + 4096,
            len: 4096,
            pattern: 0xc1,
        },
        Op::Write {
            off: MIB + 60 * KIB,
            len: 8192,
            pattern: 0xc2,
        },
        Op::Write {
            off: 3 * MIB + 512,
            len: 512,
            pattern: 0xc3,
        },
        // Unmapping a kept-allocation zero cluster, and zeroing it again with a kept allocation.
        Op::Zero {
            off: 384 * KIB,
            len: 64 * KIB,
            unmap: true,
        },
        Op::Zero {
            off: 448 * KIB,
            len: 64 * KIB,
            unmap: false,
        },
        Op::Discard {
            off: 512 * KIB,
            len: 64 * KIB,
        },
    ];
    twin_run(&w, &script(seed, 64 * KIB, 60, &fixed));
}

#[test]
fn write_extended_l2_partial_subclusters_over_backing() {
    for seed in seeds(6) {
        extended_l2_over_backing_case(seed);
    }
}

fn extended_l2_over_backing_case(seed: u64) {
    let w = Work::new();
    create(&w, "base.qcow2", "cluster_size=64k", None);
    w.qemu_io(
        &[],
        "base.qcow2",
        &["write -P 0x61 0 4M", "write -P 0x62 1M 64k"],
    );
    create(
        &w,
        "img.qcow2",
        "cluster_size=64k,extended_l2=on",
        Some("base.qcow2"),
    );
    // Sub-clusters are 2 KiB: allocate some, zero some, leave the rest to the backing file.
    w.qemu_io(
        &[],
        "img.qcow2",
        &[
            "write -P 0x63 2k 2k",
            "write -P 0x64 70k 6k",
            "write -z 200k 8k",
            "write -P 0x65 1M 2k",
            "write -z 1032k 4k",
            "write -P 0x66 2M 64k",
        ],
    );
    let top = map(&w, "img.qcow2")
        .iter()
        .filter(|e| e["depth"] == 0)
        .count();
    let below = map(&w, "img.qcow2")
        .iter()
        .filter(|e| e["depth"] == 1)
        .count();
    assert!(
        top > 0 && below > 0,
        "expected a mix of this image's and the backing file's sub-clusters"
    );

    let fixed = [
        // Partial sub-cluster writes next to allocated, zero and backing sub-clusters.
        Op::Write {
            off: 4096 + 512,
            len: 512,
            pattern: 0xd1,
        },
        Op::Write {
            off: 68 * KIB,
            len: 3 * KIB,
            pattern: 0xd2,
        },
        Op::Write {
            off: 202 * KIB + 512,
            len: 512,
            pattern: 0xd3,
        },
        Op::Write {
            off: MIB + 1024,
            len: 4096,
            pattern: 0xd4,
        },
        // Whole-cluster zero and discard of partially allocated clusters.
        Op::Zero {
            off: 64 * KIB,
            len: 64 * KIB,
            unmap: false,
        },
        Op::Discard {
            off: 192 * KIB,
            len: 64 * KIB,
        },
        // A sub-cluster-aligned zero write inside a cluster.
        Op::Zero {
            off: 2 * MIB + 4 * KIB,
            len: 8 * KIB,
            unmap: true,
        },
    ];
    twin_run(&w, &script(seed, 64 * KIB, 60, &fixed));
}

/// Not one of the four states, but the one where QEMU's semantics differ most: on a v2 overlay
/// a discard does nothing and a zero write writes explicit zeros.
#[test]
fn write_v2_overlay_of_backing_file() {
    for seed in seeds(10) {
        let w = Work::new();
        create(&w, "base.qcow2", "cluster_size=64k", None);
        w.qemu_io(&[], "base.qcow2", &["write -P 0x71 0 4M"]);
        create(
            &w,
            "img.qcow2",
            "cluster_size=4k,compat=0.10",
            Some("base.qcow2"),
        );
        w.qemu_io(&[], "img.qcow2", &["write -P 0x72 8k 64k"]);
        let fixed = [
            Op::Discard {
                off: 8 * KIB,
                len: 16 * KIB,
            },
            Op::Zero {
                off: 32 * KIB,
                len: 8 * KIB,
                unmap: true,
            },
            Op::Zero {
                off: MIB,
                len: 8 * KIB,
                unmap: false,
            },
        ];
        twin_run(&w, &script(seed, 4 * KIB, 60, &fixed));
    }
}
