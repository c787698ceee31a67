//! End to end through the write path: many scattered writes into images with small clusters and narrow
//! or wide refcounts, so that refcount blocks are created and the refcount table moves (more than once)
//! while the engine allocates, then freed and reused clusters (discards); after `close` qemu-img check
//! must find no error and no leak, and qemu-img must read what was written.
//!
//! Also a dirty lazy-refcounts image left by a killed qemu-io: opened read-write, its refcounts are
//! rebuilt first, and after writes and close qemu-img check is clean.

mod common;

use common::{create_qcow2, open, qemu_img, skip_without_qemu, temp_dir};
use qcow2_engine::OpenOptions;
use qcow2_testkit::{qemu_img_raw, run};

/// `qemu-img check IMG`: (exit code, last lines of its output).
fn check(dir: &std::path::Path, img: &str) -> (i32, String) {
    let out = run(dir, "qemu-img", &["check", img]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tail: Vec<&str> = text.lines().rev().take(12).collect();
    (out.status.code().unwrap_or(-1), tail.join("\n"))
}

/// A small deterministic generator (xorshift), so that failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes `rounds` random 512-byte-aligned chunks (with some discards) through the engine, mirrors
/// them in a model, closes, and compares with qemu-img's view and check.
/// Returns the number of refcount table clusters at the end.
async fn scatter(opts: &str, size: u64, rounds: usize, seed: u64) -> u32 {
    let dir = temp_dir();
    let d = dir.path();
    create_qcow2(d, "img.qcow2", &size.to_string(), opts, None);
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let img = open(d, "img.qcow2", &rw).await;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    for i in 0..rounds {
        let len = 512 * (1 + rng.next() % 16);
        let off = (rng.next() % ((size - len) / 512)) * 512;
        if i % 11 == 10 {
            img.discard(off, len).await.unwrap();
            // Only whole clusters are discarded (they read as zeros afterwards).
            let cs = 1u64 << cluster_bits(opts);
            let start = off.div_ceil(cs) * cs;
            let end = (off + len) / cs * cs;
            if end > start {
                model[start as usize..end as usize].fill(0);
            }
        } else {
            let byte = (rng.next() % 255 + 1) as u8;
            let data = vec![byte; len as usize];
            img.write(off, &data).await.unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if i % 50 == 49 {
            img.flush().await.unwrap();
        }
    }
    img.close().await.unwrap();
    drop(img);
    let (code, text) = check(d, "img.qcow2");
    assert_eq!(code, 0, "{opts}: qemu-img check:\n{text}");
    assert!(
        qemu_img_raw(d, "img.qcow2", Some("qcow2")) == model,
        "{opts}: content differs from the model"
    );
    let header = std::fs::read(d.join("img.qcow2")).unwrap();
    u32::from_be_bytes(header[56..60].try_into().unwrap())
}

/// log2 of the `cluster_size=` option (default 64 KiB).
fn cluster_bits(opts: &str) -> u32 {
    opts.split(',')
        .find_map(|kv| kv.strip_prefix("cluster_size="))
        .map(|v| v.parse::<u64>().unwrap().trailing_zeros())
        .unwrap_or(16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refcount_structures_grow_under_writes() {
    skip_without_qemu!();
    // 512-byte clusters with 64-bit refcounts: a block describes 64 clusters (32 KiB), the first table
    // 64 blocks (2 MiB): a few MiB of scattered writes grow it.
    let clusters = scatter("cluster_size=512,refcount_bits=64", 8 << 20, 1500, 1).await;
    assert!(clusters > 1, "the refcount table did not grow");
    scatter("cluster_size=512,refcount_bits=16", 16 << 20, 1500, 2).await;
    scatter("cluster_size=512,refcount_bits=1", 16 << 20, 800, 3).await;
    scatter("cluster_size=4096,refcount_bits=2", 32 << 20, 800, 4).await;
    scatter(
        "cluster_size=512,refcount_bits=64,lazy_refcounts=on",
        8 << 20,
        1500,
        5,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refcount_dirty_image_is_rebuilt_on_open() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            "img.qcow2",
            "64M",
        ],
    );
    qemu_img(d, &["snapshot", "-c", "s1", "img.qcow2"]);
    let out = run(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 3M 2M",
            "-c",
            "abort",
            "img.qcow2",
        ],
    );
    assert!(!out.status.success());
    let (code, text) = check(d, "img.qcow2");
    assert_ne!(
        code, 0,
        "the killed qemu-io left consistent refcounts:\n{text}"
    );
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let img = open(d, "img.qcow2", &rw).await;
    img.write(512 * 1024, &[7u8; 8192]).await.unwrap();
    img.write(10 << 20, &[8u8; 65536]).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    let (code, text) = check(d, "img.qcow2");
    assert_eq!(code, 0, "after rebuild, writes and close:\n{text}");
    let raw = qemu_img_raw(d, "img.qcow2", Some("qcow2"));
    assert!(raw[..512 * 1024].iter().all(|&b| b == 1));
    assert!(raw[512 * 1024..512 * 1024 + 8192].iter().all(|&b| b == 7));
    assert!(raw[(3 << 20)..(5 << 20)].iter().all(|&b| b == 2));
    assert!(raw[(10 << 20)..(10 << 20) + 65536].iter().all(|&b| b == 8));
}
