//! Helpers for the engine's oracle tests: run qemu-img / qemu-io, compare against their output.
#![allow(dead_code)]

use std::path::Path;

use qcow2_engine::{Image, OpenOptions};
use qcow2_io::StdFileBackend;
pub use qcow2_testkit::{create_qcow2, qemu_img, qemu_map_json, skip_without_qemu, temp_dir};

/// `qemu-io -c CMD1 -c CMD2 ... IMG` in `dir` (the format is probed).
pub fn qemu_io(dir: &Path, img: &str, cmds: &[&str]) {
    qcow2_testkit::qemu_io(dir, &[], img, cmds);
}

/// The raw contents of `img` as `qemu-img convert -O raw` produces them (the format is probed).
pub fn qemu_raw(dir: &Path, img: &str) -> Vec<u8> {
    qcow2_testkit::qemu_img_raw(dir, img, None)
}

/// Opens `img` (relative to `dir`) with the std backend.
pub async fn open(dir: &Path, img: &str, opts: &OpenOptions) -> Image<StdFileBackend> {
    Image::<StdFileBackend>::open(dir.join(img), opts)
        .await
        .unwrap_or_else(|e| panic!("open {img}: {e}"))
}

/// Reads the whole virtual disk in chunks of `chunk` bytes.
pub async fn read_all(img: &Image<StdFileBackend>, chunk: usize) -> Vec<u8> {
    let size = img.virtual_size() as usize;
    let mut out = vec![0xa5u8; size];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        img.read(off as u64, &mut out[off..off + n])
            .await
            .unwrap_or_else(|e| panic!("read {off}+{n}: {e}"));
        off += n;
    }
    out
}

/// Asserts that our reads of `img` equal qemu-img's raw conversion, with two chunk sizes.
pub async fn assert_same_as_qemu(dir: &Path, img: &str) {
    let expected = qemu_raw(dir, img);
    let image = open(dir, img, &OpenOptions::default()).await;
    assert_eq!(
        image.virtual_size() as usize,
        expected.len(),
        "virtual size of {img}"
    );
    for chunk in [1 << 20, 12_345] {
        let got = read_all(&image, chunk).await;
        if got != expected {
            let first = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{img}: data differs from qemu-img convert (chunk {chunk}) first at byte {first}"
            );
        }
    }
    assert_map_same_as_qemu(dir, img, &image).await;
}

/// One merged map extent: (start, length, depth, present, zero, data, compressed, offset).
pub type MapEntry = (u64, u64, u64, bool, bool, bool, bool, Option<u64>);

/// `qemu-img map --output=json` of `img`.
pub fn qemu_map(dir: &Path, img: &str) -> Vec<MapEntry> {
    qemu_map_json(dir, img)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["depth"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
                e["compressed"].as_bool().unwrap_or(false),
                e.get("offset").and_then(|o| o.as_u64()),
            )
        })
        .collect()
}

/// Our map: block status over the whole disk, merged as qemu-img merges.
pub async fn our_map(image: &Image<StdFileBackend>) -> Vec<MapEntry> {
    let size = image.virtual_size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = 0;
    while off < size {
        let st = image.block_status(off, size - off).await.unwrap();
        assert!(st.len > 0 && st.len <= size - off);
        let e: MapEntry = (
            off,
            st.len,
            st.depth as u64,
            st.present,
            st.zero,
            st.data,
            st.compressed,
            st.offset,
        );
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.7, e.7) {
                (Some(a), Some(b)) => a + last.1 == b,
                (None, None) => true,
                _ => false,
            };
            if last.2 == e.2
                && last.3 == e.3
                && last.4 == e.4
                && last.5 == e.5
                && last.6 == e.6
                && contiguous
            {
                last.1 += e.1;
                off += st.len;
                continue;
            }
        }
        out.push(e);
        off += st.len;
    }
    out
}

/// Asserts our map equals qemu-img's.
pub async fn assert_map_same_as_qemu(dir: &Path, img: &str, image: &Image<StdFileBackend>) {
    let expected = qemu_map(dir, img);
    let got = our_map(image).await;
    assert_eq!(got, expected, "map of {img} differs from qemu-img map");
}
