//! Handcrafted images on the memory backend: the lookup, the read path and the corruption checks.

use qcow2_engine::{Error, Image, ImageFormat, OpenOptions};
use qcow2_io::MemoryBackend;

const CS: u64 = 65536;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// A v3 image with 64 KiB clusters: header at 0, L1 at cluster 1, refcount table at 2, refcount block
/// at 3, one L2 table at 4, data clusters from 5. `l2` are the raw L2 entries (standard L2).
fn image(size: u64, l1: &[u64], l2: &[u64], data_clusters: usize, incompatible: u64) -> Vec<u8> {
    let total = (5 + data_clusters as u64) * CS;
    let mut v = vec![0u8; total as usize];
    let put32 =
        |v: &mut Vec<u8>, off: usize, x: u32| v[off..off + 4].copy_from_slice(&x.to_be_bytes());
    let put64 =
        |v: &mut Vec<u8>, off: usize, x: u64| v[off..off + 8].copy_from_slice(&x.to_be_bytes());
    v[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut v, 4, 3);
    put32(&mut v, 20, 16);
    put64(&mut v, 24, size);
    put32(&mut v, 36, 8192.min(l1.len().max(1) as u32));
    put64(&mut v, 40, CS);
    put64(&mut v, 48, 2 * CS);
    put32(&mut v, 56, 1);
    put64(&mut v, 72, incompatible);
    put32(&mut v, 96, 4);
    put32(&mut v, 100, 112);
    for (i, e) in l1.iter().enumerate() {
        put64(&mut v, (CS as usize) + 8 * i, *e);
    }
    put64(&mut v, 2 * CS as usize, 3 * CS);
    for i in 0..(5 + data_clusters) {
        v[3 * CS as usize + 2 * i..3 * CS as usize + 2 * i + 2]
            .copy_from_slice(&1u16.to_be_bytes());
    }
    for (i, e) in l2.iter().enumerate() {
        put64(&mut v, 4 * CS as usize + 8 * i, *e);
    }
    for c in 0..data_clusters {
        let start = ((5 + c as u64) * CS) as usize;
        for (j, b) in v[start..start + CS as usize].iter_mut().enumerate() {
            *b = (c as u8).wrapping_mul(31) ^ (j as u8);
        }
    }
    v
}

fn data_byte(cluster: usize, j: usize) -> u8 {
    (cluster as u8).wrapping_mul(31) ^ (j as u8)
}

async fn open(bytes: Vec<u8>) -> qcow2_engine::Result<Image<MemoryBackend>> {
    Image::open_backend(
        MemoryBackend::from_vec(bytes),
        "mem.qcow2",
        &OpenOptions::default(),
    )
    .await
}

#[tokio::test]
async fn reads_data_zero_and_unallocated() {
    let l2 = [(5 * CS) | COPIED, 1, 0, (6 * CS) | COPIED, 5 * CS];
    let img = open(image(10 * CS + 1000, &[(4 * CS) | COPIED], &l2, 2, 0))
        .await
        .unwrap();
    assert_eq!(img.virtual_size(), 10 * CS + 512); // whole sectors, as QEMU
    assert_eq!(img.format(), ImageFormat::Qcow2);
    let mut buf = vec![0xffu8; 5 * CS as usize];
    img.read(0, &mut buf).await.unwrap();
    for j in 0..CS as usize {
        assert_eq!(buf[j], data_byte(0, j));
        assert_eq!(buf[CS as usize + j], 0);
        assert_eq!(buf[2 * CS as usize + j], 0);
        assert_eq!(buf[3 * CS as usize + j], data_byte(1, j));
        assert_eq!(buf[4 * CS as usize + j], data_byte(0, j));
    }
    // Unaligned read crossing clusters.
    let mut small = vec![0u8; 3000];
    img.read(CS * 3 - 1000, &mut small).await.unwrap();
    assert!(small[..1000].iter().all(|&b| b == 0));
    assert_eq!(small[1000], data_byte(1, 0));
    // Last bytes, and out of range.
    let mut tail = vec![1u8; 12];
    img.read(10 * CS + 500, &mut tail).await.unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    let e = img.read(10 * CS + 500, &mut [0u8; 13]).await.unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }));

    let st = img.block_status(0, 10 * CS).await.unwrap();
    assert_eq!(
        (st.len, st.data, st.zero, st.present, st.offset),
        (CS, true, false, true, Some(5 * CS))
    );
    let st = img.block_status(CS, 10 * CS).await.unwrap();
    assert_eq!(
        (st.len, st.data, st.zero, st.present, st.offset),
        (CS, false, true, true, None)
    );
    let st = img.block_status(2 * CS, 10 * CS).await.unwrap();
    assert_eq!(
        (st.len, st.data, st.zero, st.present),
        (CS, false, true, false)
    );
}

#[tokio::test]
async fn l1_entry_past_eof_is_corruption() {
    let img = open(image(CS * 8192 * 2, &[4 * CS, 100 * CS], &[], 0, 0))
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    img.read(0, &mut buf).await.unwrap();
    let e = img.read(CS * 8192, &mut buf).await.unwrap_err();
    assert!(e.is_corruption(), "{e}");
    assert!(e.to_string().contains("mem.qcow2"), "{e}");
    assert!(e.to_string().contains("L1"), "{e}");
}

#[tokio::test]
async fn unaligned_l1_and_l2_entries_are_corruption() {
    let img = open(image(
        CS * 8192 * 2,
        &[4 * CS, 4 * CS + 512],
        &[5 * CS + 512],
        1,
        0,
    ))
    .await
    .unwrap();
    let mut buf = vec![0u8; 512];
    assert!(img.read(0, &mut buf).await.unwrap_err().is_corruption());
    assert!(img
        .read(CS * 8192, &mut buf)
        .await
        .unwrap_err()
        .is_corruption());
    assert!(img.block_status(0, 512).await.unwrap_err().is_corruption());
}

#[tokio::test]
async fn data_cluster_past_eof_or_in_header_is_corruption() {
    let img = open(image(4 * CS, &[4 * CS], &[1000 * CS, 0, 0], 0, 0))
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let e = img.read(0, &mut buf).await.unwrap_err();
    assert!(
        e.is_corruption() && e.to_string().contains("past the end"),
        "{e}"
    );
    // Unallocated neighbours still read.
    img.read(CS, &mut buf).await.unwrap();
}

#[tokio::test]
async fn compressed_garbage_and_out_of_file_descriptors() {
    // cluster_bits 16: sector count field starts at bit 62 - 8 = 54.
    let desc = |off: u64, sectors: u64| COMPRESSED | ((sectors - 1) << 54) | off;
    let l2 = [
        desc(5 * CS + 100, 4),
        desc(500 * CS, 256),
        desc(5 * CS, 256),
    ];
    let img = open(image(4 * CS, &[4 * CS], &l2, 1, 0)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..3 {
        let e = img.read(i * CS, &mut buf).await.unwrap_err();
        assert!(e.is_corruption(), "cluster {i}: {e}");
    }
    let st = img.block_status(0, CS).await.unwrap();
    assert!(st.compressed && st.data && st.offset.is_none());
}

#[tokio::test]
async fn header_problems_are_refused() {
    // An empty file probes as raw (as in QEMU); forced to qcow2 it is refused.
    assert_eq!(open(Vec::new()).await.unwrap().format(), ImageFormat::Raw);
    let q = OpenOptions {
        format: Some(ImageFormat::Qcow2),
        ..OpenOptions::default()
    };
    let e = Image::open_backend(MemoryBackend::new(), "e", &q)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    let good = image(4 * CS, &[4 * CS], &[], 0, 0);
    assert!(matches!(
        open(good[..50].to_vec()).await.unwrap_err(),
        Error::Format { .. }
    ));
    // Unknown incompatible bit 20.
    let e = open(image(4 * CS, &[0], &[], 0, 1 << 20))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    // External data file bit without a name.
    let e = open(image(4 * CS, &[0], &[], 0, 1 << 2)).await.unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e}");
    assert!(e.to_string().contains("'data-file' is required"), "{e}");
    // Corrupt bit: read-only is fine, read-write is refused.
    let bytes = image(4 * CS, &[0], &[], 0, 1 << 1);
    open(bytes.clone()).await.unwrap();
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let e = Image::open_backend(MemoryBackend::from_vec(bytes), "c", &rw)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::CorruptBitSet { .. }));
}

#[tokio::test]
async fn raw_on_memory_backend() {
    let opts = OpenOptions {
        format: Some(ImageFormat::Raw),
        ..OpenOptions::default()
    };
    let img = Image::open_backend(MemoryBackend::from_vec(vec![9u8; 1000]), "r", &opts)
        .await
        .unwrap();
    assert_eq!(img.virtual_size(), 1024);
    let mut buf = vec![1u8; 1024];
    img.read(0, &mut buf).await.unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 9) && buf[1000..].iter().all(|&b| b == 0));
    // Probing an arbitrary byte image finds raw.
    let img = open(vec![1u8; 4096]).await.unwrap();
    assert_eq!(img.format(), ImageFormat::Raw);
}

#[tokio::test]
async fn small_cache_evicts_and_stays_correct() {
    // Two L1 entries sharing one L2 table (as after a snapshot): cached once by host offset.
    let l2: Vec<u64> = (0..8192u64)
        .map(|i| if i % 2 == 0 { (5 * CS) | COPIED } else { 0 })
        .collect();
    let bytes = image(CS * 8192 * 2, &[4 * CS, 4 * CS], &l2, 1, 0);
    let opts = OpenOptions {
        l2_cache_bytes: Some(8192),
        ..OpenOptions::default()
    };
    let img = Image::open_backend(MemoryBackend::from_vec(bytes), "m", &opts)
        .await
        .unwrap();
    let mut buf = vec![0u8; 100];
    for i in (0..16384u64).step_by(97) {
        img.read(i * CS + 7, &mut buf).await.unwrap();
        let expect_data = i % 2 == 0;
        assert_eq!(
            buf[0],
            if expect_data { data_byte(0, 7) } else { 0 },
            "cluster {i}"
        );
    }
    let st = img.l2_cache_stats().await.unwrap();
    assert_eq!(st.slice_bytes, 4096);
    assert_eq!(st.capacity, 2);
    assert!(st.misses > 2);
}

mod mutated {
    use super::*;
    use proptest::prelude::*;

    /// A valid image with data, zero, compressed and unallocated entries, then `edits` applied.
    fn mutated(edits: &[(usize, u8)]) -> Vec<u8> {
        let desc = COMPRESSED | (3u64 << 54) | (6 * CS + 10);
        let l2 = [(5 * CS) | COPIED, 1, desc, 0, (6 * CS) | COPIED];
        let mut v = image(8 * CS + 4096, &[(4 * CS) | COPIED], &l2, 2, 0);
        for &(pos, byte) in edits {
            // Hit the interesting areas: header, L1, refcount table, L2, and anywhere.
            let areas = [0usize, CS as usize, 2 * CS as usize, 4 * CS as usize];
            let pos = if pos % 2 == 0 {
                areas[(pos / 2) % 4] + (pos / 8) % 128
            } else {
                pos % v.len()
            };
            v[pos] = byte;
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Whatever the bytes, open/read/block_status return (Ok or Err) without panicking.
        #[test]
        fn no_panic_on_mutated_images(edits in proptest::collection::vec((0usize..1 << 24, any::<u8>()), 1..8)) {
            let bytes = mutated(&edits);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let Ok(img) = open(bytes).await else { return };
                let size = img.virtual_size().min(64 * CS);
                let mut buf = vec![0u8; 3 * CS as usize];
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(buf.len() as u64) as usize;
                    let _ = img.read(off, &mut buf[..n]).await;
                    off += n as u64;
                }
                let mut off = 0;
                while off < size {
                    match img.block_status(off, size - off).await {
                        Ok(st) => off += st.len,
                        Err(_) => off += CS,
                    }
                }
            });
        }
    }
}

#[tokio::test]
async fn v2_zero_flag_is_corruption_and_size_rounds_down() {
    let mut bytes = image(
        4 * CS + 100,
        &[(4 * CS) | COPIED],
        &[1, (5 * CS) | COPIED],
        1,
        0,
    );
    bytes[4..8].copy_from_slice(&2u32.to_be_bytes());
    let img = open(bytes).await.unwrap();
    // A qcow2 header size is counted in whole sectors, as QEMU does.
    assert_eq!(img.virtual_size(), 4 * CS);
    assert_eq!(img.info().qcow2.unwrap().compat, "0.10");
    let mut buf = vec![0u8; 512];
    let e = img.read(0, &mut buf).await.unwrap_err();
    assert!(e.is_corruption() && e.to_string().contains("pre-v3"), "{e}");
    img.read(CS, &mut buf).await.unwrap();
    assert_eq!(buf[0], data_byte(0, 0));
}

#[tokio::test]
async fn block_status_does_not_read_compressed_data() {
    let desc = COMPRESSED | (3u64 << 54) | 100; // points into the header cluster
    let img = open(image(4 * CS, &[4 * CS], &[desc], 0, 0)).await.unwrap();
    let st = img.block_status(0, 4 * CS).await.unwrap();
    assert!(st.compressed && st.data && st.present && st.len == CS);
    let e = img.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(e.to_string().contains("inside the header cluster"), "{e}");
}

#[tokio::test]
async fn metadata_only_tolerates_a_missing_data_file() {
    let bytes = image(4 * CS, &[0], &[], 0, 1 << 2);
    let opts = OpenOptions {
        metadata_only: true,
        ..OpenOptions::default()
    };
    let img = Image::open_backend(MemoryBackend::from_vec(bytes), "d", &opts)
        .await
        .unwrap();
    assert!(img.info().qcow2.is_some());
    let e = img.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(e.to_string().contains("metadata-only"), "{e}");
    assert!(img.block_status(0, 512).await.is_err());
}
