//! `Image::read_owned` returns the same bytes as `Image::read` (and as `qemu-img convert -O raw`) for
//! random ranges, on the fast path (one host extent, zeros, unallocated down the chain) and the general
//! one (mixed kinds, compressed clusters, a shorter backing image), with the std backend and with the
//! io_uring backend under `O_DIRECT`.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::BytesMut;
use common::*;
use qcow2_engine::{Image, OpenOptions};
use qcow2_io::aligned::aligned_bytes_mut;
use qcow2_io::StdFileBackend;

/// A chain: raw 4 MiB base <- compressed zstd middle (64 KiB clusters, 8 MiB) <- top with extended L2
/// (9 MiB) and scattered data, zero and discarded ranges.
struct Fixture {
    _dir: qcow2_testkit::TempDir,
    top: PathBuf,
    raw: PathBuf,
    expected: Vec<u8>,
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        skip_without_qemu!(None);
        let dir = temp_dir();
        let d = dir.path();
        let mut base = vec![0u8; 4 << 20];
        for (i, b) in base.iter_mut().enumerate() {
            *b = ((i / 7) % 251) as u8 ^ ((i >> 16) as u8);
        }
        std::fs::write(d.join("base.raw"), &base).unwrap();
        create_qcow2(
            d,
            "mid.qcow2",
            "8M",
            "compression_type=zstd",
            Some(("base.raw", "raw")),
        );
        qcow2_testkit::qemu_io(
            d,
            &[],
            "mid.qcow2",
            &["write -c -P 0x33 1M 1M", "write -c -P 0x44 5M 512k"],
        );
        create_qcow2(
            d,
            "top.qcow2",
            "9M",
            "extended_l2=on",
            Some(("mid.qcow2", "qcow2")),
        );
        let mut cmds = Vec::new();
        for i in 0..48u64 {
            let off = (i * 190_011) % (9 << 20);
            let off = off - off % 512;
            match i % 4 {
                0 => cmds.push(format!("write -P {} {off} 4k", i + 1)),
                1 => cmds.push(format!("write -z {off} 8k")),
                2 => cmds.push(format!("write -P {} {off} 130k", i + 1)),
                _ => cmds.push(format!("discard {} 64k", off - off % 65536)),
            }
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, "top.qcow2", &cmds);
        qemu_img(d, &["check", "-q", "top.qcow2"]);
        let expected = qemu_raw(d, "top.qcow2");
        Some(Fixture {
            top: d.join("top.qcow2"),
            raw: d.join("base.raw"),
            expected,
            _dir: dir,
        })
    })
    .as_ref()
}

/// Deterministic pseudo-random ranges inside `size`: a mix of 512-aligned cluster-sized requests (the
/// fast path) and arbitrary ones.
fn ranges(size: u64, n: usize, seed: u64) -> Vec<(u64, usize)> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (off, len) = match i % 3 {
            0 => {
                let off = (x % size) & !4095;
                (off, 4096)
            }
            1 => {
                let off = (x % size) & !65535;
                (off, 65536)
            }
            _ => (x % size, ((x >> 40) % 200_000 + 1) as usize),
        };
        let len = len.min((size - off) as usize);
        out.push((off, len));
    }
    out
}

#[test]
fn read_owned_equals_read_std_backend() {
    let Some(f) = fixture() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let img = Image::<StdFileBackend>::open(&f.top, &OpenOptions::default())
            .await
            .unwrap();
        let size = img.virtual_size();
        assert_eq!(size as usize, f.expected.len());
        for (off, len) in ranges(size, 600, 0x1234_5678_9abc_def1) {
            let mut by_read = vec![0x5au8; len];
            img.read(off, &mut by_read).await.unwrap();
            // A dirty, unaligned buffer: read_owned must overwrite every byte.
            let mut dirty = BytesMut::with_capacity(len + 1);
            dirty.resize(len + 1, 0xee);
            let dirty = dirty.split_off(1);
            let got = img.read_owned(off, dirty).await.unwrap();
            assert_eq!(got.len(), len);
            let want = &f.expected[off as usize..off as usize + len];
            assert!(by_read == want, "read {off}+{len} differs from qemu");
            assert!(&got[..] == want, "read_owned {off}+{len} differs from qemu");
        }
        // Edge cases: empty, the very end, out of range.
        let empty = img.read_owned(size, BytesMut::new()).await.unwrap();
        assert!(empty.is_empty());
        let tail = img
            .read_owned(size - 4096, aligned_bytes_mut(4096))
            .await
            .unwrap();
        assert!(tail[..] == f.expected[size as usize - 4096..]);
        assert!(img
            .read_owned(size - 4095, aligned_bytes_mut(4096))
            .await
            .is_err());
        assert!(img
            .read_owned(u64::MAX, aligned_bytes_mut(1))
            .await
            .is_err());
    });
}

#[test]
fn read_owned_raw_image() {
    let Some(f) = fixture() else { return };
    let expected = std::fs::read(&f.raw).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let img = Image::<StdFileBackend>::open(&f.raw, &OpenOptions::default())
            .await
            .unwrap();
        for (off, len) in ranges(img.virtual_size(), 100, 77) {
            let got = img.read_owned(off, aligned_bytes_mut(len)).await.unwrap();
            assert!(
                got[..] == expected[off as usize..off as usize + len],
                "raw read_owned {off}+{len}"
            );
        }
    });
}

#[test]
fn read_owned_uring_direct() {
    let Some(f) = fixture() else { return };
    let top = f.top.clone();
    let expected = &f.expected;
    qcow2_io::start_local(async move {
        let opts = OpenOptions {
            direct: true,
            ..OpenOptions::default()
        };
        let img = Image::<qcow2_io::LocalBackend>::open(&top, &opts)
            .await
            .unwrap();
        let size = img.virtual_size();
        // Concurrent requests on one thread, as the io_uring bench issues them; aligned buffers (no
        // bounce) and unaligned ones (bounced) alike.
        let checks =
            ranges(size, 300, 0xdead_beef)
                .into_iter()
                .enumerate()
                .map(|(i, (off, len))| {
                    let img = img.clone();
                    async move {
                        let buf = if i % 2 == 0 {
                            aligned_bytes_mut(len)
                        } else {
                            let mut b = BytesMut::zeroed(len + 3);
                            b.split_off(3)
                        };
                        let got = img.read_owned(off, buf).await.unwrap();
                        assert!(
                            got[..] == expected[off as usize..off as usize + len],
                            "uring read_owned {off}+{len}"
                        );
                    }
                });
        futures::future::join_all(checks).await;
    })
    .unwrap();
}
