//! Tests of the refcount module against an in-memory model and against `qemu-img check` as the oracle:
//! images are made by qemu-img, refcounts changed through this module on a [`MemoryBackend`], and the
//! result written to a file that qemu-img checks. Clusters allocated here and referenced by nothing must
//! show up as exactly that many leaks, and nothing else may be wrong: that validates the counts, new
//! self-describing blocks and a moved table.

use std::path::{Path, PathBuf};

use qcow2_format::image_header::ImageHeader;
use qcow2_io::{Backend, MemoryBackend};
use qcow2_testkit::{path_str, qemu_img, run, skip_without_qemu, temp_dir, TempDir};

use super::*;

/// An image made by `qemu-img create -o OPTS img SIZE`, with its bytes.
fn make_image(opts: &str, size: &str) -> (TempDir, PathBuf, Vec<u8>) {
    let dir = temp_dir();
    let path = dir.path().join("img.qcow2");
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            path_str(&path),
            size,
        ],
    );
    let bytes = std::fs::read(&path).expect("read image");
    (dir, path, bytes)
}

/// The opened pieces: backend, header, file length.
async fn open(bytes: Vec<u8>) -> (MemoryBackend, ImageHeader, u64) {
    let len = bytes.len() as u64;
    let file = MemoryBackend::from_vec(bytes);
    let header = crate::qcow2::read_image_header(&file, "img", len)
        .await
        .expect("header");
    (file, header, len)
}

fn meta_io<'a>(file: &'a MemoryBackend, header: &ImageHeader) -> MetaIo<'a, MemoryBackend> {
    MetaIo {
        file,
        name: "img",
        geom: header.geometry(),
    }
}

/// The overlap map of a fresh image: header, L1 table, refcount structures.
fn overlap_map(header: &ImageHeader, rc: &Refcounts) -> OverlapMap {
    let mut map = OverlapMap::new();
    map.insert(0, header.cluster_size(), MetaKind::Header);
    map.insert(
        header.l1_table_offset().0,
        header.l1_table_bytes(),
        MetaKind::ActiveL1,
    );
    rc.register_metadata(&mut map);
    map
}

/// What `qemu-img check` says: (exit code, leaked clusters, whether any error was reported).
fn qemu_check(dir: &Path, path: &Path) -> (i32, u64, bool, String) {
    let out = run(dir, "qemu-img", &["check", path_str(path)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let leaks = text
        .lines()
        .find(|l| l.contains("leaked clusters were found"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let errors = text.contains("ERROR") || text.contains("errors were found");
    (out.status.code().unwrap_or(-1), leaks, errors, text)
}

/// Writes the backend's contents (extended to cover everything allocated) to `path`.
async fn save(file: &MemoryBackend, rc: &Refcounts, path: &Path) {
    let len = file.len().await.unwrap();
    if rc.alloc_end() > len {
        file.set_len(rc.alloc_end()).await.unwrap();
    }
    std::fs::write(path, file.contents()).unwrap();
}

#[tokio::test]
async fn alloc_increment_free_reuse_every_width() {
    skip_without_qemu!();
    for order in 0..=6u32 {
        let bits = 1u32 << order;
        let (dir, path, bytes) =
            make_image(&format!("cluster_size=4096,refcount_bits={bits}"), "16M");
        let (file, header, len) = open(bytes).await;
        let io = meta_io(&file, &header);
        let mut rc = Refcounts::load(&io, &header, len).await.unwrap();
        let mut map = overlap_map(&header, &rc);
        let cs = 4096;

        let a = rc.alloc(&io, &mut map, 3).await.unwrap();
        assert_eq!(a.clusters, 3);
        assert!(
            a.offset >= len,
            "width {bits}: {a:?} inside the file of {len}"
        );
        assert!(a.fresh);
        let b = rc.alloc(&io, &mut map, 1).await.unwrap();
        assert_eq!(b.offset, a.offset + 3 * cs, "width {bits}");
        assert!(b.fresh);
        for k in 0..3 {
            assert_eq!(rc.get(&io, a.offset + k * cs).await.unwrap(), 1);
        }
        assert!(rc.is_dirty());

        // A second reference: overflows with 1-bit refcounts, and then nothing changed.
        let inc = rc.increment(&io, &mut map, a.offset + 100, 10).await;
        if bits == 1 {
            match inc {
                Err(Error::RefcountOverflow { offset, max, .. }) => {
                    assert_eq!((offset, max), (a.offset, 1));
                }
                other => panic!("expected overflow, got {other:?}"),
            }
            assert_eq!(rc.get(&io, a.offset).await.unwrap(), 1);
        } else {
            inc.unwrap();
            assert_eq!(rc.get(&io, a.offset).await.unwrap(), 2);
            rc.defer_decrement(a.offset, 1);
        }
        // Drop the run: nothing changes until applied.
        rc.defer_decrement(a.offset, 3 * cs);
        assert!(rc.has_deferred());
        assert_eq!(rc.get(&io, a.offset + cs).await.unwrap(), 1);
        let freed = rc
            .apply_deferred(&io, &|_| false, &|_| false)
            .await
            .unwrap();
        assert_eq!(freed, vec![(a.offset, 3 * cs)], "width {bits}");
        assert!(!rc.has_deferred());
        assert_eq!(rc.get(&io, a.offset).await.unwrap(), 0);

        // Freed clusters are reused, and are not fresh any more.
        let c = rc.alloc(&io, &mut map, 2).await.unwrap();
        assert_eq!(c.offset, a.offset, "width {bits}");
        assert!(!c.fresh);
        // A run that does not fit in the hole goes after everything.
        let d = rc.alloc(&io, &mut map, 2).await.unwrap();
        assert_eq!(d.offset, b.offset + cs, "width {bits}");
        assert!(d.fresh);

        assert!(rc.write_back(&io, &map).await.unwrap());
        assert!(!rc.is_dirty());
        assert!(!rc.write_back(&io, &map).await.unwrap());
        save(&file, &rc, &path).await;
        // c (2) + b (1) + d (2) are allocated and referenced by nothing.
        let (code, leaks, errors, text) = qemu_check(dir.path(), &path);
        assert_eq!(
            (code, leaks, errors),
            (3, 5, false),
            "width {bits}:\n{text}"
        );
    }
}

#[tokio::test]
async fn deferred_decrements_wait_for_busy_clusters_and_underflow_is_corruption() {
    let (_dir, _path, bytes) = {
        skip_without_qemu!();
        make_image("cluster_size=65536", "1G")
    };
    let (file, header, len) = open(bytes).await;
    let io = meta_io(&file, &header);
    let mut rc = Refcounts::load(&io, &header, len).await.unwrap();
    let mut map = overlap_map(&header, &rc);
    let cs = 65536;
    let a = rc.alloc(&io, &mut map, 3).await.unwrap();
    rc.defer_decrement(a.offset, 3 * cs);
    let busy = a.offset + cs;
    let freed = rc
        .apply_deferred(&io, &|o| o == busy, &|_| false)
        .await
        .unwrap();
    assert_eq!(freed, vec![(a.offset, cs), (a.offset + 2 * cs, cs)]);
    assert!(rc.has_deferred());
    assert_eq!(rc.get(&io, busy).await.unwrap(), 1);
    let freed = rc
        .apply_deferred(&io, &|_| false, &|_| false)
        .await
        .unwrap();
    assert_eq!(freed, vec![(busy, cs)]);
    // The lowest freed cluster comes back first.
    assert_eq!(rc.alloc(&io, &mut map, 1).await.unwrap().offset, a.offset);

    // Dropping a reference to a free cluster (and one to an allocated one, in the same batch): an
    // error, and nothing changes.
    rc.defer_decrement(a.offset, 1);
    rc.defer_decrement(busy, 1);
    let err = rc
        .apply_deferred(&io, &|_| false, &|_| false)
        .await
        .unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains("underflow"), "{err}");
    assert_eq!(rc.get(&io, a.offset).await.unwrap(), 1);
    assert_eq!(rc.get(&io, busy).await.unwrap(), 0);
    // The header cluster is never handed out, and refcounts beyond the table read as 0.
    assert_eq!(rc.get(&io, 0).await.unwrap(), 1);
    assert_eq!(rc.get(&io, 1 << 50).await.unwrap(), 0);
}

/// 512-byte clusters: a refcount block describes 4096 / bits clusters and a one-cluster table 64
/// blocks, so a few thousand allocations create blocks and move the table (more than once for wide
/// refcounts). Runs of various lengths, some freed and reused; qemu-img check must see exactly the
/// allocated clusters as leaks.
#[tokio::test]
async fn blocks_and_table_grow_self_describing() {
    skip_without_qemu!();
    for (bits, total) in [(64u32, 9000u64), (16, 20000), (1, 40000)] {
        let (dir, path, bytes) =
            make_image(&format!("cluster_size=512,refcount_bits={bits}"), "1G");
        let (file, header, len) = open(bytes).await;
        let io = meta_io(&file, &header);
        let mut rc = Refcounts::load(&io, &header, len).await.unwrap();
        let mut map = overlap_map(&header, &rc);
        let old_table = rc.table_offset();
        let mut live: Vec<HostAlloc> = Vec::new();
        let mut allocated = 0u64;
        let mut i = 0u64;
        while allocated < total {
            let n = 1 + i % 7;
            let a = rc.alloc(&io, &mut map, n).await.unwrap();
            assert!(a.offset >= 512 && a.offset.is_multiple_of(512));
            // No overlap with what is live, nor with metadata.
            assert_eq!(
                map.check(a.offset, n * 512, None),
                Ok(()),
                "bits {bits}: {a:?}"
            );
            live.push(a);
            allocated += n;
            // Free every fifth run a little later (its clusters are reused).
            if i % 5 == 4 {
                let f = live.remove(live.len() / 2);
                rc.defer_decrement(f.offset, f.clusters * 512);
                allocated -= f.clusters;
                rc.apply_deferred(&io, &|_| false, &|_| false)
                    .await
                    .unwrap();
            }
            if i.is_multiple_of(97) {
                rc.write_back(&io, &map).await.unwrap();
            }
            i += 1;
        }
        // 1-bit refcounts: 64 blocks describe 262144 clusters, more than this test allocates.
        if bits > 1 {
            assert_ne!(
                rc.table_offset(),
                old_table,
                "bits {bits}: the table did not move"
            );
        }
        // The header names the new table.
        let h = file.contents();
        assert_eq!(h[48..56], rc.table_offset().to_be_bytes());
        assert_eq!(h[56..60], (rc.table_clusters() as u32).to_be_bytes());
        rc.write_back(&io, &map).await.unwrap();
        save(&file, &rc, &path).await;
        let (code, leaks, errors, text) = qemu_check(dir.path(), &path);
        assert_eq!(
            (code, leaks, errors),
            (3, allocated, false),
            "bits {bits}:\n{}",
            text.lines().rev().take(8).collect::<Vec<_>>().join("\n")
        );
    }
}

#[tokio::test]
async fn a_new_block_overlapping_metadata_is_refused() {
    let (_dir, _path, bytes) = {
        skip_without_qemu!();
        make_image("cluster_size=512", "16M")
    };
    let (file, header, len) = open(bytes).await;
    let io = meta_io(&file, &header);
    let mut rc = Refcounts::load(&io, &header, len).await.unwrap();
    let mut map = overlap_map(&header, &rc);
    // 16-bit refcounts: block 1 describes clusters 256..512 and will be placed at cluster 256. Pretend
    // an active L2 table sits there.
    map.insert(256 * 512, 512, MetaKind::ActiveL2);
    let mut result = Ok(());
    for _ in 0..300 {
        if let Err(e) = rc.alloc(&io, &mut map, 1).await {
            result = Err(e);
            break;
        }
    }
    let err = result.unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(
        err.to_string()
            .contains("would overlap the active L2 table at 0x20000"),
        "{err}"
    );
    // Nothing was written there.
    assert!(file.contents().len() <= 256 * 512);
}

#[tokio::test]
async fn invalid_refcount_table_entries_are_corruption() {
    let (_dir, _path, mut bytes) = {
        skip_without_qemu!();
        make_image("cluster_size=65536", "1G")
    };
    let table = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    for (raw, what) in [
        (0x10200u64, "unaligned"),
        (0x100u64 << 9, "inside the header cluster"),
        (0x7_0000_0000, "past the end of the file"),
    ] {
        let raw = if what == "inside the header cluster" {
            0x200
        } else {
            raw
        };
        bytes[table + 8..table + 16].copy_from_slice(&raw.to_be_bytes());
        let (file, header, len) = open(bytes.clone()).await;
        let io = meta_io(&file, &header);
        let err = match Refcounts::load(&io, &header, len).await {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => e,
        };
        assert!(err.is_corruption(), "{what}: {err}");
        assert!(
            err.to_string().contains("refcount table entry 1"),
            "{what}: {err}"
        );
    }
}

/// Allocation cost on the benchmark's shape (1 GiB of 64 KiB clusters, one cluster per allocation, a
/// write-back every 32 allocations, some frees): prints the time per allocation. Run with
/// `--ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn alloc_speed() {
    let (_dir, _path, bytes) = {
        skip_without_qemu!();
        make_image("cluster_size=65536", "1G")
    };
    let (file, header, len) = open(bytes).await;
    let io = meta_io(&file, &header);
    let mut rc = Refcounts::load(&io, &header, len).await.unwrap();
    let mut map = overlap_map(&header, &rc);
    let t = std::time::Instant::now();
    let n = 16_000u64;
    for i in 0..n {
        let a = rc.alloc(&io, &mut map, 1).await.unwrap();
        if i % 100 == 0 {
            rc.defer_decrement(a.offset, 1);
            rc.apply_deferred(&io, &|_| false, &|_| false)
                .await
                .unwrap();
        }
        if i % 32 == 31 {
            rc.write_back(&io, &map).await.unwrap();
        }
    }
    let per = t.elapsed() / n as u32;
    eprintln!("alloc: {per:?} per cluster");
}
