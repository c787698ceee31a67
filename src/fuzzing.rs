//! Bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz, nightly) and by the corpus replay test
//! (`tests/fuzz_corpus.rs`, stable), so that every committed corpus input keeps being checked in CI.
//!
//! Each function must return normally for every input: a panic, a hang or an unbounded allocation is a
//! bug. Errors are expected outcomes and are ignored.

use qcow2_engine::{Image, OpenOptions};
use qcow2_format::image_header::ImageHeader;
use qcow2_io::MemoryBackend;

/// Parses `data` as the first cluster of an image: header, extensions, backing file name, validation. A
/// header that parses must serialize to bytes that parse again to the same meaning (backing name,
/// extensions) and serialize to the same bytes: serialization is a normal form.
pub fn header(data: &[u8]) {
    let Ok(parsed) = ImageHeader::parse(data) else {
        return;
    };
    let cluster_size = parsed.geometry().cluster_size();
    let Ok(bytes) = parsed.serialize(cluster_size) else {
        return;
    };
    let again = ImageHeader::parse(&bytes).expect("a serialized valid header parses again");
    assert_eq!(
        again.backing_file, parsed.backing_file,
        "backing file survives a round trip"
    );
    assert_eq!(
        again.extensions, parsed.extensions,
        "extensions survive a round trip"
    );
    let bytes2 = again
        .serialize(cluster_size)
        .expect("a parsed serialized header serializes");
    assert!(bytes == bytes2, "serialization is not a normal form");
}

/// How much of the virtual disk the open-and-read target reads at most, to keep each run fast.
const READ_BUDGET: u64 = 8 << 20;
/// How many block-status calls the target makes at most.
const STATUS_BUDGET: usize = 512;

/// Opens `data` as an image on the memory backend (no backing chain, no data file) and exercises the read
/// path: block status over the disk, reads of the extents it reports, and reads at the start and end.
pub fn open_read(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime without I/O drivers always builds");
    rt.block_on(async {
        let backend = MemoryBackend::from_vec(data.to_vec()).with_max_size(64 << 20);
        let opts = OpenOptions {
            follow_backing: false,
            l2_cache_bytes: Some(64 << 10),
            ..OpenOptions::default()
        };
        let Ok(image) = Image::open_backend(backend, "fuzz.img", &opts).await else {
            return;
        };
        let size = image.virtual_size();
        let _ = image.info();
        let mut budget = READ_BUDGET;
        let mut buf = vec![0u8; 128 << 10];
        let mut offset = 0u64;
        for _ in 0..STATUS_BUDGET {
            if offset >= size {
                break;
            }
            let Ok(st) = image.block_status(offset, size - offset).await else {
                break;
            };
            assert!(
                st.len > 0 && st.len <= size - offset,
                "block status length out of range"
            );
            let n = st.len.min(buf.len() as u64).min(budget);
            if n > 0 {
                let _ = image.read(offset, &mut buf[..n as usize]).await;
                budget -= n;
            }
            offset += st.len;
        }
        if size > 0 {
            let n = size.min(4096);
            let _ = image.read(size - n, &mut buf[..n as usize]).await;
        }
    });
}
