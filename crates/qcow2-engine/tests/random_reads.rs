//! Random reads (proptest) and many concurrent readers, against `qemu-img convert -O raw` output.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use qcow2_engine::{Image, OpenOptions};
use qcow2_io::StdFileBackend;

/// A chain: compressed zstd base (64 KiB clusters) <- overlay with extended L2 and scattered writes.
struct Fixture {
    _dir: qcow2_testkit::TempDir,
    top: PathBuf,
    expected: Vec<u8>,
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        skip_without_qemu!(None);
        let dir = temp_dir();
        let d = dir.path();
        let mut src = vec![0u8; 8 << 20];
        for (i, b) in src.iter_mut().enumerate() {
            *b = ((i / 3) % 29) as u8 ^ ((i >> 14) as u8);
        }
        std::fs::write(d.join("src.raw"), &src).unwrap();
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
                "-o",
                "compression_type=zstd",
                "src.raw",
                "base.qcow2",
            ],
        );
        create_qcow2(
            d,
            "top.qcow2",
            "9M",
            "extended_l2=on",
            Some(("base.qcow2", "qcow2")),
        );
        let mut cmds = Vec::new();
        for i in 0..60u64 {
            let off = (i * 140_333) % (9 << 20);
            let off = off - off % 512;
            match i % 4 {
                0 => cmds.push(format!("write -P {} {off} 3k", i + 1)),
                1 => cmds.push(format!("write -z {off} 6k")),
                2 => cmds.push(format!("write -P {} {off} 70k", i + 1)),
                _ => cmds.push(format!("discard {} 64k", off - off % 65536)),
            }
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, "top.qcow2", &cmds);
        let expected = qemu_raw(d, "top.qcow2");
        Some(Fixture {
            top: d.join("top.qcow2"),
            expected,
            _dir: dir,
        })
    })
    .as_ref()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_match_qemu(off in 0u64..(9 << 20), len in 1usize..300_000) {
        let Some(f) = fixture() else { return Ok(()) };
        let size = f.expected.len() as u64;
        let off = off.min(size - 1);
        let len = len.min((size - off) as usize);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let got = rt.block_on(async {
            let img = Image::<StdFileBackend>::open(&f.top, &OpenOptions::default()).await.unwrap();
            let mut buf = vec![0x5au8; len];
            img.read(off, &mut buf).await.unwrap();
            buf
        });
        prop_assert!(got == f.expected[off as usize..off as usize + len], "read {}+{} differs", off, len);
    }
}

#[test]
fn many_concurrent_readers() {
    let Some(f) = fixture() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A small cache makes readers contend on the metadata lock and on evictions too.
        let opts = OpenOptions {
            l2_cache_bytes: Some(8192),
            ..OpenOptions::default()
        };
        let img = Image::<StdFileBackend>::open(&f.top, &opts).await.unwrap();
        let expected = std::sync::Arc::new(f.expected.clone());
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let img = img.clone();
            let expected = expected.clone();
            tasks.push(tokio::spawn(async move {
                let size = img.virtual_size();
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..60 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % size;
                    let len = ((x >> 40) % 200_000 + 1).min(size - off) as usize;
                    let mut buf = vec![0u8; len];
                    img.read(off, &mut buf).await.unwrap();
                    assert!(
                        buf == expected[off as usize..off as usize + len],
                        "task {t}: read {off}+{len}"
                    );
                    let st = img.block_status(off, len as u64).await.unwrap();
                    assert!(st.len >= 1 && st.len <= len as u64);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn local_backend_in_uring_runtime() {
    let Some(f) = fixture() else { return };
    let top = f.top.clone();
    let got = qcow2_io::start_local(async move {
        let img = Image::<qcow2_io::LocalBackend>::open(&top, &OpenOptions::default())
            .await
            .unwrap();
        let mut buf = vec![0u8; img.virtual_size() as usize];
        // Many concurrent reads on one thread (the io_uring model).
        let chunks: Vec<(u64, usize)> = (0..buf.len())
            .step_by(300_000)
            .map(|o| (o as u64, 300_000.min(buf.len() - o)))
            .collect();
        let reads = chunks.iter().map(|&(o, n)| {
            let img = img.clone();
            async move {
                let mut b = vec![0u8; n];
                img.read(o, &mut b).await.unwrap();
                (o as usize, b)
            }
        });
        for (o, b) in futures::future::join_all(reads).await {
            buf[o..o + b.len()].copy_from_slice(&b);
        }
        buf
    })
    .unwrap();
    assert!(got == f.expected);
}
