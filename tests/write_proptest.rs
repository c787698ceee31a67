//! Property test of concurrent writes (issue 3, acceptance "Concurrency", second half).
//!
//! Proves that for random sets of byte-disjoint requests (writes of any length at any byte offset,
//! zero writes with and without unmap, discards; some cluster-aligned, some not; neighbours often
//! sharing a cluster), all issued at once from separate tasks in a random order with a flush among
//! them, the engine ends up with exactly the content an in-memory model predicts, read through our
//! engine before and after `close()` and through `qemu-img convert -O raw`, and that `qemu-img check`
//! finds the image clean. Since the requests never overlap byte-wise, any correct engine gives one
//! answer whatever the interleaving.
//!
//! Images are made by qemu-img with data already in them (converted from a raw file with data and zero
//! runs, or over a raw backing file with a few clusters of the overlay written by qemu-io), with cluster
//! sizes 512 B, 4 KiB and 64 KiB, with and without extended L2, refcount widths 1, 16 and 64, lazy
//! refcounts and compat 0.10 (v2 without a backing file, where discards and zero writes also read as
//! zeros). It runs on the multi-threaded Tokio runtime with the std-file backend, on the current-thread
//! tokio-uring runtime with the io_uring backend, and with the memory backend (the image file's bytes
//! loaded into it, written back for qemu-img after). The model itself is checked against qemu-io running
//! the same requests (with pattern data). Half the cases open the file with `O_DIRECT`, where unaligned
//! requests sharing a 4 KiB block must not lose each other's bytes in the backend's read-modify-write.

mod common;

use bytes::Bytes;
use common::write::{
    assert_check_clean, assert_same, data_bytes, multi_thread_runtime, qemu_raw, read_all,
    run_uring, rw_options, uring_or_skip, Model, KIB, MIB,
};
use common::Work;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use qcow2::engine::{Image, OpenOptions};
use qcow2::io::{Backend, MemoryBackend, StdFileBackend, UringBackend};

/// The image one case writes into.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    cluster: u64,
    extended_l2: bool,
    /// The overlay of a raw backing file (else converted from raw data).
    backing: bool,
    /// More `-o` options (refcount width, compat, lazy refcounts).
    extra: &'static str,
}

impl Geometry {
    /// Virtual size: several L2 tables at 512 B clusters, more than one at 4 KiB.
    fn size(&self) -> u64 {
        match self.cluster {
            512 => 256 * KIB,
            4096 => 3 * MIB,
            _ => 2 * MIB,
        }
    }

    fn options(&self) -> String {
        let mut o = format!("cluster_size={}", self.cluster);
        if self.extended_l2 {
            o.push_str(",extended_l2=on");
        }
        if !self.extra.is_empty() {
            o.push(',');
            o.push_str(self.extra);
        }
        o
    }
}

/// The kinds of request.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Write,
    Zero { unmap: bool },
    Discard,
}

/// One request as generated: placed after a gap behind the previous one.
#[derive(Debug, Clone, Copy)]
struct Spec {
    kind: Kind,
    /// Cluster-aligned start and whole-cluster length.
    aligned: bool,
    /// Gap before it, as a fraction (0..1000 per mille) of the largest gap, or with `near` of a cluster
    /// (so that it shares a cluster with the previous request).
    gap: u64,
    near: bool,
    /// Length in bytes (unaligned) or clusters (aligned), before clamping.
    len: u64,
}

/// A test case.
#[derive(Debug, Clone)]
struct Case {
    geometry: Geometry,
    specs: Vec<Spec>,
    /// Seed of the initial content, the written data and the issue order.
    seed: u64,
    /// Issue a flush after this many requests.
    flush_after: usize,
    /// Open with `O_DIRECT` (file backends): unaligned requests are bounced by the backend.
    direct: bool,
}

/// One placed request.
#[derive(Debug, Clone)]
enum Op {
    Write(u64, Bytes),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        6 => Just(Kind::Write),
        1 => Just(Kind::Zero { unmap: false }),
        1 => Just(Kind::Zero { unmap: true }),
        2 => Just(Kind::Discard),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        kind(),
        any::<bool>(),
        0u64..1000,
        any::<bool>(),
        1u64..200_000,
    )
        .prop_map(|(kind, aligned, gap, near, len)| Spec {
            kind,
            aligned,
            gap,
            near,
            len,
        })
}

fn geometry(with_backing: bool) -> impl Strategy<Value = Geometry> {
    let g = |cluster, extended_l2, backing, extra| Geometry {
        cluster,
        extended_l2,
        backing,
        extra,
    };
    let mut all = vec![
        g(512, false, false, ""),
        g(512, false, false, "refcount_bits=1"),
        g(4096, false, false, ""),
        g(4096, false, false, "lazy_refcounts=on"),
        g(65536, false, false, ""),
        g(65536, false, false, "compat=0.10"),
        g(65536, false, false, "refcount_bits=64"),
        g(65536, true, false, ""),
    ];
    if with_backing {
        all.extend([g(4096, false, true, ""), g(65536, true, true, "")]);
    }
    proptest::sample::select(all)
}

fn case(with_backing: bool) -> impl Strategy<Value = Case> {
    (
        geometry(with_backing),
        proptest::collection::vec(spec(), 1..64),
        any::<u64>(),
        0usize..64,
        any::<bool>(),
    )
        .prop_map(|(geometry, specs, seed, flush_after, direct)| Case {
            geometry,
            specs,
            seed,
            flush_after,
            direct,
        })
}

/// xorshift64* for the parts derived from the case seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Lays the requests out left to right, byte-disjoint, dropping what does not fit; returns them in a
/// shuffled issue order with the flush inserted. With `pattern_writes`, each write's data is one repeated
/// byte, as qemu-io's `write -P` writes.
fn place(c: &Case, pattern_writes: bool) -> Vec<Op> {
    let g = c.geometry;
    let size = g.size();
    let max_gap = size / 16;
    let mut cursor = 0u64;
    let mut ops = Vec::new();
    for (i, s) in c.specs.iter().enumerate() {
        let gap = if s.near {
            g.cluster * s.gap / 1000
        } else {
            max_gap * s.gap / 1000
        };
        let mut off = cursor + gap;
        let len = if s.aligned {
            off = off.div_ceil(g.cluster) * g.cluster;
            (1 + s.len % 4) * g.cluster
        } else {
            1 + s.len % (3 * g.cluster)
        };
        if off + len > size {
            break;
        }
        cursor = off + len;
        ops.push(match s.kind {
            Kind::Write if pattern_writes => {
                Op::Write(off, Bytes::from(vec![(i % 250 + 1) as u8; len as usize]))
            }
            Kind::Write => Op::Write(
                off,
                Bytes::from(data_bytes(c.seed ^ (i as u64 + 1), len as usize)),
            ),
            Kind::Zero { unmap } => Op::Zero(off, len, unmap),
            Kind::Discard => Op::Discard(off, len),
        });
    }
    let mut r = Rng::new(c.seed);
    for i in (1..ops.len()).rev() {
        let j = r.below(i as u64 + 1) as usize;
        ops.swap(i, j);
    }
    ops.insert(c.flush_after.min(ops.len()), Op::Flush);
    ops
}

/// Initial guest content: runs of data and of zeros, 512-byte granular.
fn initial_content(seed: u64, size: u64) -> Vec<u8> {
    let data = data_bytes(seed ^ 0x5555, size as usize);
    let mut out = vec![0u8; size as usize];
    let mut r = Rng::new(seed ^ 0xaaaa);
    let mut off = 0u64;
    let mut is_data = r.below(2) == 0;
    while off < size {
        let run = (512 * (1 + r.below(256))).min(size - off);
        if is_data {
            let (a, b) = (off as usize, (off + run) as usize);
            out[a..b].copy_from_slice(&data[a..b]);
        }
        off += run;
        is_data = !is_data;
    }
    out
}

/// Makes `img.qcow2` for the case; returns the model of its content.
fn setup(w: &Work, c: &Case) -> Model {
    let g = c.geometry;
    let size = g.size();
    let init = initial_content(c.seed, size);
    let opts = g.options();
    let mut model = Model::new(init, g.cluster);
    if g.backing {
        w.write_file("base.raw", &model.data);
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "base.raw",
            "-F",
            "raw",
            "img.qcow2",
        ]);
        // Some clusters of the overlay allocated (fast path) and one zero cluster over the backing data.
        let (a, z) = (2 * g.cluster, 3 * g.cluster);
        let cmds = [
            format!("write -P 0x77 0 {a}"),
            format!("write -z {z} {}", g.cluster),
        ];
        w.qemu_io(&["-f", "qcow2"], "img.qcow2", &[&cmds[0], &cmds[1]]);
        model.write(0, &vec![0x77; a as usize]);
        model.write_zeroes(z, g.cluster);
    } else {
        w.write_file("init.raw", &model.data);
        w.qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opts,
            "init.raw",
            "img.qcow2",
        ]);
    }
    model
}

/// Performs one request.
async fn apply<B: Backend>(img: Image<B>, op: Op) -> Result<(), String> {
    let r = match &op {
        Op::Write(off, data) => img.write_bytes(*off, data.clone()).await,
        Op::Zero(off, len, unmap) => img.write_zeroes(*off, *len, *unmap).await,
        Op::Discard(off, len) => img.discard(*off, *len).await,
        Op::Flush => img.flush().await,
    };
    r.map_err(|e| format!("{}: {e}", describe(&op)))
}

fn describe(op: &Op) -> String {
    match op {
        Op::Write(off, d) => format!("write {off} {}", d.len()),
        Op::Zero(off, len, unmap) => format!("write_zeroes {off} {len} unmap={unmap}"),
        Op::Discard(off, len) => format!("discard {off} {len}"),
        Op::Flush => "flush".into(),
    }
}

/// The request as a qemu-io command (writes must come from `place(_, true)`).
fn qemu_io_cmd(op: &Op) -> String {
    match op {
        Op::Write(off, d) => format!("write -P {} {off} {}", d[0], d.len()),
        Op::Zero(off, len, false) => format!("write -z {off} {len}"),
        Op::Zero(off, len, true) => format!("write -z -u {off} {len}"),
        Op::Discard(off, len) => format!("discard {off} {len}"),
        Op::Flush => "flush".into(),
    }
}

/// The model against QEMU: the same requests run one after another by qemu-io give the content the
/// model predicts, so a mismatch in the engine tests is the engine's, not the model's.
fn run_qemu_io(c: &Case) {
    let w = Work::new();
    let model = setup(&w, c);
    let ops = place(c, true);
    let expected = model_after(model, &ops).data;
    let cmds: Vec<String> = ops.iter().map(qemu_io_cmd).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    w.qemu_io(&["-f", "qcow2"], "img.qcow2", &cmds);
    assert_same(
        &qemu_raw(&w, "img.qcow2"),
        &expected,
        "qemu-io's result vs the model",
    );
}

fn model_after(mut model: Model, ops: &[Op]) -> Model {
    for op in ops {
        match op {
            Op::Write(off, d) => model.write(*off, d),
            Op::Zero(off, len, _) => model.write_zeroes(*off, *len),
            Op::Discard(off, len) => model.discard(*off, *len),
            Op::Flush => {}
        }
    }
    model
}

/// Collects the results of the request tasks; panics listing the failures.
async fn join_all(handles: Vec<tokio::task::JoinHandle<Result<(), String>>>) {
    let mut errors = Vec::new();
    for h in handles {
        if let Err(e) = h.await.expect("request task panicked") {
            errors.push(e);
        }
    }
    assert!(errors.is_empty(), "requests failed: {errors:#?}");
}

/// Reads the whole disk, closes, reads again; both must equal `expected`.
async fn verify_and_close<B: Backend>(img: &Image<B>, expected: &[u8]) {
    assert_same(&read_all(img).await, expected, "our read before close");
    img.close().await.expect("close");
    assert_same(&read_all(img).await, expected, "our read after close");
}

/// The qemu-img side: the content and a clean check.
fn oracle(w: &Work, image: &str, expected: &[u8]) {
    assert_same(
        &qemu_raw(w, image),
        expected,
        "qemu-img convert -O raw after close",
    );
    assert_check_clean(w, image);
}

/// Read-write, with `O_DIRECT` when the case says so.
fn file_options(c: &Case) -> OpenOptions {
    OpenOptions {
        direct: c.direct,
        ..rw_options()
    }
}

fn run_std(c: &Case) {
    let w = Work::new();
    let model = setup(&w, c);
    let ops = place(c, false);
    let expected = model_after(model, &ops).data;
    let path = w.p("img.qcow2");
    multi_thread_runtime().block_on(async {
        let img = Image::<StdFileBackend>::open(&path, &file_options(c))
            .await
            .expect("open read-write");
        let handles = ops
            .iter()
            .map(|op| tokio::spawn(apply(img.clone(), op.clone())))
            .collect();
        join_all(handles).await;
        verify_and_close(&img, &expected).await;
    });
    oracle(&w, "img.qcow2", &expected);
}

fn run_on_uring(c: &Case) {
    let w = Work::new();
    let model = setup(&w, c);
    let ops = place(c, false);
    let expected = model_after(model, &ops).data;
    let path = w.p("img.qcow2");
    run_uring(async {
        let img = Image::<UringBackend>::open(&path, &file_options(c))
            .await
            .expect("open read-write with io_uring");
        let handles = ops
            .iter()
            .map(|op| tokio::task::spawn_local(apply(img.clone(), op.clone())))
            .collect();
        join_all(handles).await;
        verify_and_close(&img, &expected).await;
    });
    oracle(&w, "img.qcow2", &expected);
}

fn run_memory(c: &Case) {
    let w = Work::new();
    let model = setup(&w, c);
    let ops = place(c, false);
    let expected = model_after(model, &ops).data;
    let mem = MemoryBackend::from_vec(w.read_file("img.qcow2"));
    let handle = mem.clone();
    multi_thread_runtime().block_on(async {
        let img = Image::open_backend(mem, "img.qcow2", &rw_options())
            .await
            .expect("open the memory backend read-write");
        let handles = ops
            .iter()
            .map(|op| tokio::spawn(apply(img.clone(), op.clone())))
            .collect();
        join_all(handles).await;
        verify_and_close(&img, &expected).await;
    });
    w.write_file("mem.qcow2", &handle.contents());
    oracle(&w, "mem.qcow2", &expected);
}

/// 24 cases per property (about 15 s in debug); `PROPTEST_CASES=N` runs more when hunting.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_agrees_with_qemu_io(c in case(true)) {
        run_qemu_io(&c);
    }

    #[test]
    fn disjoint_concurrent_requests_std_multi_thread(c in case(true)) {
        run_std(&c);
    }

    #[test]
    fn disjoint_concurrent_requests_uring_current_thread(c in case(true)) {
        if uring_or_skip("disjoint_concurrent_requests_uring_current_thread") {
            run_on_uring(&c);
        }
    }

    #[test]
    fn disjoint_concurrent_requests_memory_backend(c in case(false)) {
        run_memory(&c);
    }
}

/// The generator itself: placed requests are byte-disjoint and inside the disk, so the model's answer
/// does not depend on the order (what the property relies on).
#[test]
fn placed_requests_are_disjoint_and_in_range() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&case(true), |c| {
            let ops = place(&c, false);
            let mut ranges: Vec<(u64, u64)> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Write(o, d) => Some((*o, *o + d.len() as u64)),
                    Op::Zero(o, l, _) | Op::Discard(o, l) => Some((*o, *o + *l)),
                    Op::Flush => None,
                })
                .collect();
            ranges.sort_unstable();
            for r in &ranges {
                prop_assert!(r.0 < r.1 && r.1 <= c.geometry.size(), "{r:?}");
            }
            for p in ranges.windows(2) {
                prop_assert!(p[0].1 <= p[1].0, "overlap {:?} {:?}", p[0], p[1]);
            }
            prop_assert_eq!(ops.iter().filter(|o| matches!(o, Op::Flush)).count(), 1);
            Ok(())
        })
        .expect("generator invariant");
}
