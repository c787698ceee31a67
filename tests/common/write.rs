//! Shared helpers of the write-path tests (`write_*.rs`): an in-memory model of the guest disk with QEMU's
//! write/zero/discard semantics, whole-image reads through our engine, the qemu-img oracle calls they
//! need (`convert -O raw`, `check --output=json`), deterministic data, and the two runtimes the engine
//! must serve (multi-threaded Tokio with the std backend, current-thread tokio-uring with io_uring).

use std::fmt::Write as _;

use qcow2::engine::{Image, OpenOptions};
use qcow2::io::Backend;
use serde_json::Value;

use super::{parse_json, Work, ORACLE_TIMEOUT};

/// 1 KiB.
pub const KIB: u64 = 1024;
/// 1 MiB.
pub const MIB: u64 = 1024 * 1024;

/// Options for a read-write open of the top image (backing files stay read-only).
pub fn rw_options() -> OpenOptions {
    OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    }
}

/// What the guest disk must read as, updated with the semantics QEMU gives each request on a v3 image
/// (DESIGN.md, "Facts that are easy to get wrong").
#[derive(Clone)]
pub struct Model {
    /// The guest bytes.
    pub data: Vec<u8>,
    /// Cluster size of the image (discard works on whole clusters only).
    pub cluster_size: u64,
}

impl Model {
    /// A model whose disk reads as `data` before any request.
    pub fn new(data: Vec<u8>, cluster_size: u64) -> Model {
        Model { data, cluster_size }
    }

    /// A write of `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let o = off as usize;
        self.data[o..o + data.len()].copy_from_slice(data);
    }

    /// A zero write (with or without unmap: the range reads as zeros either way).
    pub fn write_zeroes(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
    }

    /// A discard on v3: every whole cluster inside the range becomes a zero cluster (with or without a
    /// backing file); partial clusters at either end are left as they are.
    pub fn discard(&mut self, off: u64, len: u64) {
        let cs = self.cluster_size;
        let start = off.div_ceil(cs) * cs;
        let end = (off + len) / cs * cs;
        if start < end {
            self.data[start as usize..end as usize].fill(0);
        }
    }
}

/// Deterministic bytes for `seed`: never all equal over a 512-byte run, so that a copy from the wrong
/// offset shows, and with no zero byte, so that data never reads like a zero cluster.
pub fn data_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        for b in r.to_le_bytes() {
            if v.len() < len {
                v.push(b | 1);
            }
        }
    }
    v
}

/// `None` when equal, else a description of the first differing byte and the extent of differences.
pub fn first_diff(actual: &[u8], expected: &[u8]) -> Option<String> {
    if actual == expected {
        return None;
    }
    let mut msg = String::new();
    if actual.len() != expected.len() {
        let _ = write!(
            msg,
            "lengths differ: {} vs {} expected; ",
            actual.len(),
            expected.len()
        );
    }
    let n = actual.len().min(expected.len());
    if let Some(i) = (0..n).find(|&i| actual[i] != expected[i]) {
        let last = (0..n)
            .rev()
            .find(|&i| actual[i] != expected[i])
            .unwrap_or(i);
        let count = (i..=last).filter(|&k| actual[k] != expected[k]).count();
        let hex = |b: &[u8]| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let e = (i + 16).min(n);
        let _ = write!(
            msg,
            "first difference at byte {i:#x}, last at {last:#x}, {count} bytes differ; \
             got [{}] expected [{}]",
            hex(&actual[i..e]),
            hex(&expected[i..e])
        );
    }
    Some(msg)
}

/// Panics with [`first_diff`]'s description when `actual != expected`.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(d) = first_diff(actual, expected) {
        panic!("{what}: content differs from the model: {d}");
    }
}

/// The whole virtual disk of `img`, read through our engine in pieces that cross clusters.
pub async fn read_all<B: Backend>(img: &Image<B>) -> Vec<u8> {
    let size = img.virtual_size();
    let mut out = vec![0u8; size as usize];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(200_000);
        img.read(off, &mut out[off as usize..(off + n) as usize])
            .await
            .unwrap_or_else(|e| panic!("our read of {n} bytes at {off}: {e}"));
        off += n;
    }
    out
}

/// The guest data of `image` as `qemu-img convert -O raw` writes it.
pub fn qemu_raw(w: &Work, image: &str) -> Vec<u8> {
    let raw = format!("{image}.oracle.raw");
    w.qemu_img(&["convert", "-O", "raw", image, &raw]);
    let data = w.read_file(&raw);
    let _ = std::fs::remove_file(w.p(&raw));
    data
}

/// A count of `qemu-img check --output=json` (absent keys are 0, as qemu-img omits zero counts).
pub fn check_count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs `qemu-img check --output=json image` and asserts it is clean: exit status 0, no corruption,
/// no leak, no check error. Returns the JSON (for `allocated-clusters`, `image-end-offset`, ...).
pub fn assert_check_clean(w: &Work, image: &str) -> Value {
    let o = w.qemu_img_try(&["check", "--output=json", image], ORACLE_TIMEOUT);
    let v: Option<Value> = serde_json::from_slice(&o.stdout).ok();
    let clean = o.success()
        && v.as_ref().is_some_and(|v| {
            ["corruptions", "leaks", "check-errors"]
                .iter()
                .all(|k| check_count(v, k) == 0)
        });
    assert!(
        clean,
        "qemu-img check of {image} is not clean: {}",
        o.describe()
    );
    match v {
        Some(v) => v,
        None => parse_json(&o),
    }
}

/// `qemu-img compare a b`; panics unless qemu-img says the images are identical.
pub fn assert_qemu_identical(w: &Work, a: &str, b: &str) {
    let o = w.qemu_img_try(&["compare", a, b], ORACLE_TIMEOUT);
    assert!(
        o.success() && o.stdout_str().contains("Images are identical"),
        "qemu-img compare {a} {b}: {}",
        o.describe()
    );
}

/// A multi-threaded Tokio runtime (4 workers, so tasks really run in parallel on the 2 cores).
pub fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build a multi-threaded runtime")
}

/// True when io_uring works in this process; otherwise prints why `test` is skipped and returns false.
pub fn uring_or_skip(test: &str) -> bool {
    if qcow2::io::uring_available() {
        return true;
    }
    eprintln!("{test}: io_uring is not available in this process (kernel or seccomp): skipping");
    false
}

/// Runs `fut` on the current-thread tokio-uring runtime (`qcow2_io::start_local`), asserting that it
/// really is the io_uring runtime (call [`uring_or_skip`] first).
pub fn run_uring<F: std::future::Future>(fut: F) -> F::Output {
    qcow2::io::start_local(async move {
        assert!(
            qcow2::io::in_uring_runtime(),
            "start_local did not start a tokio-uring runtime although io_uring is available"
        );
        fut.await
    })
    .expect("start the tokio-uring runtime")
}
