//! Compressed clusters with extended L2 (each read and decompressed once per request, not once per
//! subcluster), and reads larger than the read path's batch, against `qemu-img convert -O raw`.

mod common;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use common::*;
use qcow2_engine::{Image, OpenOptions};
use qcow2_io::{Backend, BackendOpen, HostStatus, OpenFlags, StdFileBackend};

/// Read calls per opened file path, for [`Counting`].
fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<AtomicUsize>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Arc<AtomicUsize>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The read-call counter of `path` (created on first use).
fn counter(path: &Path) -> Arc<AtomicUsize> {
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    registry().lock().unwrap().entry(key).or_default().clone()
}

/// A [`StdFileBackend`] that counts its `read_at` calls (per path, see [`counter`]).
struct Counting {
    inner: StdFileBackend,
    reads: Arc<AtomicUsize>,
}

impl Backend for Counting {
    async fn read_at(&self, buf: BytesMut, offset: u64) -> (io::Result<usize>, BytesMut) {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset).await
    }
    async fn write_at(&self, buf: Bytes, offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset).await
    }
    async fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        self.inner.writev_at(bufs, offset).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len).await
    }
    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len).await
    }
    async fn len(&self) -> io::Result<u64> {
        self.inner.len().await
    }
    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len).await
    }
    async fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        self.inner.host_status(offset, max_len).await
    }
    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size().await
    }
}

impl BackendOpen for Counting {
    async fn open(path: &Path, flags: OpenFlags) -> io::Result<Counting> {
        let inner = StdFileBackend::open(path, flags).await?;
        Ok(Counting {
            inner,
            reads: counter(path),
        })
    }
}

/// Writes `size` bytes of varied, compressible content (text-like runs, noisy runs, a zero run), in
/// 64 KiB blocks; block 1 is compressible non-zero data.
fn write_src(path: &Path, size: usize) {
    let mut v = vec![0u8; size];
    let mut x: u64 = 0x1234_5678_9abc_def1;
    for (i, b) in v.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = match (i >> 16) % 5 {
            0 => b"lorem ipsum dolor sit amet "[i % 27],
            1 => b'A' + (x % 16) as u8,
            2 => ((i / 7) % 251) as u8,
            3 => b"0123456789abcdef"[(x % 16) as usize] ^ ((i >> 12) as u8 & 1),
            _ => 0,
        };
    }
    std::fs::write(path, v).unwrap();
}

/// `qemu-img convert -c -O qcow2 -o cluster_size=CS,extended_l2=on src.raw NAME`.
fn convert_compressed(dir: &Path, cs: &str, name: &str) {
    let opts = format!("cluster_size={cs},extended_l2=on");
    qemu_img(
        dir,
        &[
            "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", name,
        ],
    );
}

/// Random unaligned reads (deterministic) compared with `expected`.
async fn random_reads<B: Backend>(img: &Image<B>, expected: &[u8], n: usize, max_len: u64) {
    let size = expected.len() as u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % size;
        let len = ((x >> 33) % max_len + 1).min(size - off) as usize;
        let mut buf = vec![0x5au8; len];
        img.read(off, &mut buf).await.unwrap();
        assert!(
            buf == expected[off as usize..off as usize + len],
            "read {off}+{len} differs"
        );
    }
}

/// Whether qemu-img map reports the whole of `[off, off + len)` as compressed.
fn compressed_in_map(dir: &Path, img: &str, off: u64, len: u64) -> bool {
    qemu_map(dir, img)
        .iter()
        .any(|e| e.6 && e.0 <= off && off + len <= e.0 + e.1)
}

/// Checks one compressed extended-L2 image: whole-image and random reads, map, and one backend read for
/// a whole-cluster read of compressed cluster 1.
async fn check_compressed(cs: u64, cs_opt: &str, src_size: usize) {
    let t = temp_dir();
    let d = t.path();
    write_src(&d.join("src.raw"), src_size);
    convert_compressed(d, cs_opt, "c.qcow2");
    assert_same_as_qemu(d, "c.qcow2").await;
    let expected = qemu_raw(d, "c.qcow2");

    let img = Image::<Counting>::open(d.join("c.qcow2"), &OpenOptions::default())
        .await
        .unwrap();
    random_reads(&img, &expected, 150, 3 * cs).await;

    assert!(
        compressed_in_map(d, "c.qcow2", cs, cs),
        "cluster 1 of the {cs_opt} image is not compressed"
    );
    let reads = counter(&d.join("c.qcow2"));
    // Warm the L2 slice (cluster 0 and 1 share it), then count the reads of cluster 1 alone.
    let mut buf = vec![0u8; cs as usize];
    img.read(0, &mut buf).await.unwrap();
    reads.store(0, Ordering::SeqCst);
    img.read(cs, &mut buf).await.unwrap();
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "backend reads for one cluster"
    );
    assert!(buf == expected[cs as usize..2 * cs as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_extended_l2_64k() {
    skip_without_qemu!();
    check_compressed(64 << 10, "64k", 6 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_extended_l2_2m() {
    skip_without_qemu!();
    check_compressed(2 << 20, "2M", 7 << 20).await;
}

/// A compressed base under an extended-L2 overlay with scattered subcluster writes: the backing
/// cluster arrives as several pieces and is still read once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_backing_under_extended_l2_overlay() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    write_src(&d.join("src.raw"), 4 << 20);
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "base.qcow2",
        ],
    );
    create_qcow2(
        d,
        "top.qcow2",
        "4M",
        "extended_l2=on",
        Some(("base.qcow2", "qcow2")),
    );
    // Cluster 1 (64 KiB, subclusters of 2 KiB): a few subclusters written in the overlay.
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0x61 68k 2k",
            "write -P 0x62 80k 4k",
            "write -z 100k 2k",
            "write -P 0x63 1M 10k",
        ],
    );
    assert_same_as_qemu(d, "top.qcow2").await;
    let expected = qemu_raw(d, "top.qcow2");
    assert!(compressed_in_map(d, "base.qcow2", 64 << 10, 64 << 10));
    let img = Image::<Counting>::open(d.join("top.qcow2"), &OpenOptions::default())
        .await
        .unwrap();
    random_reads(&img, &expected, 150, 200_000).await;
    let base_reads = counter(&d.join("base.qcow2"));
    let mut buf = vec![0u8; 64 << 10];
    img.read(0, &mut buf).await.unwrap();
    base_reads.store(0, Ordering::SeqCst);
    img.read(64 << 10, &mut buf).await.unwrap();
    assert_eq!(
        base_reads.load(Ordering::SeqCst),
        1,
        "backing reads for one cluster"
    );
    assert!(buf == expected[64 << 10..128 << 10]);
}

/// Reads larger than the read path's 32 MiB batch over a long host-contiguous run, a fragmented
/// (reverse-order) run and compressed clusters, in one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_larger_than_batch() {
    skip_without_qemu!();
    let t = temp_dir();
    let d = t.path();
    create_qcow2(d, "f.qcow2", "80M", "", None);
    let mut cmds = vec!["write -P 0x17 0 40M".to_owned()];
    // 24 MiB from 40 MiB written cluster by cluster backwards: host order reversed.
    for i in (0..384u64).rev() {
        let off = (40 << 20) + i * 65536;
        cmds.push(format!("write -P {} {off} 64k", i % 250 + 1));
    }
    cmds.push("write -z 50M 1M".to_owned());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(d, "f.qcow2", &cmds);
    let expected = qemu_raw(d, "f.qcow2");
    let img = open(d, "f.qcow2", &OpenOptions::default()).await;
    let mut buf = vec![0xa5u8; expected.len()];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf == expected, "whole 80 MiB read differs");
    let mut buf = vec![0xa5u8; 50 << 20];
    img.read(12_345, &mut buf).await.unwrap();
    assert!(
        buf == expected[12_345..12_345 + (50 << 20)],
        "unaligned 50 MiB read differs"
    );

    // Compressed: 40 MiB of compressed 64 KiB extended-L2 clusters in one read.
    write_src(&d.join("src.raw"), 40 << 20);
    convert_compressed(d, "64k", "c.qcow2");
    let expected = qemu_raw(d, "c.qcow2");
    let img = open(d, "c.qcow2", &OpenOptions::default()).await;
    let mut buf = vec![0xa5u8; expected.len() - 777];
    img.read(777, &mut buf).await.unwrap();
    assert!(buf == expected[777..], "compressed 40 MiB read differs");
}
