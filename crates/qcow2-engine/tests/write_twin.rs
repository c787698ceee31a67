//! The engine's write path against qemu-io, at the API level: the same seeded random operations
//! (writes with patterns, zero writes with and without unmap, discards, flushes) go through
//! `Image::write`/`write_zeroes`/`discard`/`flush` on one image and through qemu-io on its twin, both
//! made by qemu-img; then `qemu-img compare` must call them identical and `qemu-img check` must find
//! our image clean (no corruption, no leak). The CLI-level twin test with concurrent aio scripts is
//! tests/twin_io.rs at the workspace root; this one needs no CLI and pins engine bugs down faster.

use std::path::Path;

use qcow2_engine::{Image, OpenOptions};
use qcow2_io::StdFileBackend;
use qcow2_testkit::{create_qcow2, qemu_io, run, run_ok, skip_without_qemu, temp_dir};

/// A small deterministic generator (xorshift), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One operation, as qemu-io spells it.
#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, pattern: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write { off, len, pattern } => format!("write -q -P {pattern} {off} {len}"),
            Op::Zero { off, len, unmap } => {
                format!("write -q -z {}{off} {len}", if unmap { "-u " } else { "" })
            }
            Op::Discard { off, len } => format!("discard -q {off} {len}"),
            Op::Flush => "flush".into(),
        }
    }
}

fn script(seed: u64, size: u64, cs: u64, count: usize) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut ops = Vec::new();
    for _ in 0..count {
        // Lengths from 512 B to 1 MiB, biased to cluster-ish sizes; 512-aligned offsets.
        let max = (1 << 20).min(size);
        let len = match r.below(4) {
            0 => 512 * (1 + r.below(8)),
            1 => cs * (1 + r.below(4)),
            2 => 512 * (1 + r.below(max / 512)),
            _ => (cs / 2).max(512),
        }
        .min(max);
        let off = 512 * r.below((size - len) / 512 + 1);
        let op = match r.below(20) {
            0..=11 => Op::Write {
                off,
                len,
                pattern: (1 + r.below(250)) as u8,
            },
            12..=14 => Op::Zero {
                off,
                len,
                unmap: r.below(2) == 0,
            },
            15..=17 => Op::Discard { off, len },
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}

async fn apply(img: &Image<StdFileBackend>, ops: &[Op]) {
    for (i, op) in ops.iter().enumerate() {
        let res = match *op {
            Op::Write { off, len, pattern } => img.write(off, &vec![pattern; len as usize]).await,
            Op::Zero { off, len, unmap } => img.write_zeroes(off, len, unmap).await,
            Op::Discard { off, len } => img.discard(off, len).await,
            Op::Flush => img.flush().await,
        };
        res.unwrap_or_else(|e| panic!("op {i} {op:?}: {e}"));
    }
    img.close().await.expect("close");
}

/// Runs one configuration: `opts` for qemu-img create, an optional backing file filled by qemu-io.
fn twin(name: &str, size: u64, cs: u64, opts: &str, backing: bool, seeds: std::ops::Range<u64>) {
    twin_prep(name, size, cs, opts, backing, seeds, &|_, _| {});
}

/// As [`twin`], with `prep(dir, file)` run on each twin after it is created (snapshots, compression).
fn twin_prep(
    name: &str,
    size: u64,
    cs: u64,
    opts: &str,
    backing: bool,
    seeds: std::ops::Range<u64>,
    prep: &dyn Fn(&Path, &str),
) {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    if backing {
        create_qcow2(
            d,
            "base.qcow2",
            &size.to_string(),
            "cluster_size=65536",
            None,
        );
        qemu_io(
            d,
            &["-f", "qcow2"],
            "base.qcow2",
            &[
                "write -q -P 0x11 0 1M",
                "write -q -P 0x22 3M 2M",
                "write -q -z 8M 1M",
            ],
        );
    }
    // QCOW2_TWIN_SEEDS=N runs N seeds per configuration instead of the default few.
    let seeds = match std::env::var("QCOW2_TWIN_SEEDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(n) => seeds.start..seeds.start + n,
        None => seeds,
    };
    // QCOW2_TWIN_SEEDS=N runs N seeds per configuration instead of the default few.
    let seeds = match std::env::var("QCOW2_TWIN_SEEDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(n) => seeds.start..seeds.start + n,
        None => seeds,
    };
    for seed in seeds {
        for f in ["ours.qcow2", "theirs.qcow2"] {
            let _ = std::fs::remove_file(d.join(f));
            create_qcow2(
                d,
                f,
                if backing { "" } else { "64M" },
                opts,
                backing.then_some(("base.qcow2", "qcow2")),
            );
            prep(d, f);
        }
        let ops = script(seed, size, cs, 120);
        let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
        let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, &["-f", "qcow2"], "theirs.qcow2", &cmd_refs);
        let path = d.join("ours.qcow2");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let opts = OpenOptions {
                read_only: false,
                ..OpenOptions::default()
            };
            let img = Image::<StdFileBackend>::open(&path, &opts)
                .await
                .unwrap_or_else(|e| panic!("{name} seed {seed}: open: {e}"));
            apply(&img, &ops).await;
        });
        check_twins(d, name, seed, &ops);
    }
}

fn check_twins(d: &Path, name: &str, seed: u64, ops: &[Op]) {
    let out = run(
        d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "ours.qcow2",
            "theirs.qcow2",
        ],
    );
    let ctx = || {
        format!(
            "{name} seed {seed}: {}\nscript:\n{}",
            String::from_utf8_lossy(&out.stdout),
            ops.iter().map(Op::qemu_io).collect::<Vec<_>>().join("\n")
        )
    };
    assert!(out.status.success(), "compare differs: {}", ctx());
    let out = run(d, "qemu-img", &["check", "--output=json", "ours.qcow2"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{name} seed {seed}: check output: {e}"));
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            json.get(key).and_then(|v| v.as_u64()).unwrap_or(0),
            0,
            "{name} seed {seed}: qemu-img check {key}: {json}"
        );
    }
}

#[test]
fn twin_64k() {
    twin("64k", 64 << 20, 65536, "", false, 1..4);
}

#[test]
fn twin_512() {
    twin("512", 64 << 20, 512, "cluster_size=512", false, 1..3);
}

#[test]
fn twin_4k_refcount1() {
    twin(
        "4k-rc1",
        64 << 20,
        4096,
        "cluster_size=4096,refcount_bits=1",
        false,
        1..3,
    );
}

#[test]
fn twin_2m_refcount64() {
    twin(
        "2m-rc64",
        64 << 20,
        2 << 20,
        "cluster_size=2M,refcount_bits=64",
        false,
        1..3,
    );
}

#[test]
fn twin_v2() {
    twin("v2", 64 << 20, 65536, "compat=0.10", false, 1..3);
}

#[test]
fn twin_lazy() {
    twin("lazy", 64 << 20, 65536, "lazy_refcounts=on", false, 1..3);
}

#[test]
fn twin_extended_l2() {
    twin("ext", 64 << 20, 65536, "extended_l2=on", false, 1..3);
}

#[test]
fn twin_backing() {
    twin("backing", 64 << 20, 65536, "", true, 1..3);
}

#[test]
fn twin_extended_l2_backing() {
    twin(
        "ext-backing",
        64 << 20,
        65536,
        "extended_l2=on,cluster_size=65536",
        true,
        1..3,
    );
}

#[test]
fn twin_v2_backing() {
    twin("v2-backing", 64 << 20, 65536, "compat=0.10", true, 1..3);
}

/// Data in every other cluster, as the images below start from.
const FILL: [&str; 4] = [
    "write -q -P 0x31 0 3M",
    "write -q -P 0x32 5M 1M",
    "write -q -z 7M 1M",
    "write -q -P 0x33 9M 6M",
];

#[test]
fn twin_internal_snapshot() {
    twin_prep("snapshot", 64 << 20, 65536, "", false, 1..3, &|d, f| {
        qemu_io(d, &["-f", "qcow2"], f, &FILL);
        run_ok(d, "qemu-img", &["snapshot", "-c", "snap1", f]);
    });
}

#[test]
fn twin_compressed() {
    for (name, ctype) in [("zlib", "zlib"), ("zstd", "zstd")] {
        twin_prep(name, 64 << 20, 65536, "", false, 1..3, &|d, f| {
            let src = format!("{f}.src");
            let _ = std::fs::remove_file(d.join(&src));
            create_qcow2(d, &src, "64M", "", None);
            qemu_io(d, &["-f", "qcow2"], &src, &FILL);
            let _ = std::fs::remove_file(d.join(f));
            let o = format!("compression_type={ctype}");
            run_ok(
                d,
                "qemu-img",
                &["convert", "-c", "-O", "qcow2", "-o", &o, &src, f],
            );
        });
    }
}

#[test]
fn twin_kept_zero_clusters() {
    twin_prep("kept-zero", 64 << 20, 65536, "", false, 1..3, &|d, f| {
        qemu_io(d, &["-f", "qcow2"], f, &FILL);
        qemu_io(
            d,
            &["-f", "qcow2"],
            f,
            &["write -q -z 0 2M", "write -q -z 9M 1M"],
        );
    });
}

/// A persistent bitmap: writes do not maintain bitmaps, so a read-write open clears the "bitmaps
/// consistent" autoclear bit and releases the bitmaps' clusters; qemu-img check must find no leak.
#[test]
fn twin_with_bitmap() {
    twin_prep("bitmap", 64 << 20, 65536, "", false, 1..3, &|d, f| {
        qemu_io(d, &["-f", "qcow2"], f, &FILL);
        run_ok(d, "qemu-img", &["bitmap", "--add", f, "b0"]);
        run_ok(d, "qemu-img", &["bitmap", "--add", f, "b1"]);
    });
}
