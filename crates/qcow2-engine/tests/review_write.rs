//! Review of the write engine: each test pins down one suspected defect (see the review report).
//! qemu-img / qemu-io are the oracle.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use common::{create_qcow2, open, qemu_io, qemu_map_json, skip_without_qemu, temp_dir};
use qcow2_engine::OpenOptions;
use qcow2_testkit::run;

fn rw() -> OpenOptions {
    OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `(data, zero)` flags of the extent of `qemu-img map` holding guest offset `off`.
fn flags_at(d: &Path, img: &str, off: u64) -> (bool, bool) {
    let map = qemu_map_json(d, img);
    for e in map.as_array().expect("array") {
        let s = e["start"].as_u64().unwrap();
        let l = e["length"].as_u64().unwrap();
        if s <= off && off < s + l {
            return (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        }
    }
    panic!("no extent at {off}");
}

fn assert_compare_and_check(d: &Path, ours: &str, theirs: &str) {
    let out = run(d, "qemu-img", &["compare", ours, theirs]);
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(d, "qemu-img", &["check", ours]);
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// QEMU 10 turns a zero write of part of a cluster whose rest already reads as zeros into a
/// metadata-only zero cluster (`qcow2_co_pwrite_zeroes`, head/tail `is_zero` check). The engine
/// (write.rs `write_zeroes` -> `write_zero_bytes`) allocates a data cluster and writes zeros.
#[test]
fn partial_write_zeroes_on_unallocated_cluster_allocates_unlike_qemu() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    for f in ["ours.qcow2", "theirs.qcow2"] {
        create_qcow2(d, f, "1M", "cluster_size=65536", None);
    }
    qemu_io(d, "theirs.qcow2", &["write -q -z 0 4k"]);
    rt().block_on(async {
        let img = open(d, "ours.qcow2", &rw()).await;
        img.write_zeroes(0, 4096, false).await.unwrap();
        img.close().await.unwrap();
    });
    assert_compare_and_check(d, "ours.qcow2", "theirs.qcow2");
    assert_eq!(
        flags_at(d, "ours.qcow2", 0),
        flags_at(d, "theirs.qcow2", 0),
        "(data, zero) of cluster 0 after `write -z 0 4k`: ours vs qemu"
    );
}

/// With extended L2 QEMU's write-zeroes alignment is the subcluster: a subcluster-aligned zero write
/// sets the zero bits (`zero_l2_subclusters`). The engine writes explicit zeros.
#[test]
fn subcluster_write_zeroes_ext_l2_writes_data_unlike_qemu() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    for f in ["ours.qcow2", "theirs.qcow2"] {
        create_qcow2(d, f, "1M", "cluster_size=65536,extended_l2=on", None);
        qemu_io(d, f, &["write -q -P 1 0 64k"]);
    }
    qemu_io(d, "theirs.qcow2", &["write -q -z 32k 16k"]);
    rt().block_on(async {
        let img = open(d, "ours.qcow2", &rw()).await;
        img.write_zeroes(32768, 16384, false).await.unwrap();
        img.close().await.unwrap();
    });
    assert_compare_and_check(d, "ours.qcow2", "theirs.qcow2");
    assert_eq!(
        flags_at(d, "ours.qcow2", 32768),
        flags_at(d, "theirs.qcow2", 32768),
        "(data, zero) of subclusters 16..24 after `write -z 32k 16k`: ours vs qemu"
    );
}

fn read_u64(f: &mut std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    u64::from_be_bytes(b)
}

fn write_u64(f: &mut std::fs::File, at: u64, v: u64) {
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&v.to_be_bytes()).unwrap();
}

/// An L2 table whose refcount drops to 0 (here: copied because its L1 entry lacks COPIED while its
/// refcount is 1) is freed by `apply_frees`, but its cached slices stay in the L2 cache (QEMU's
/// `update_refcount` discards cache entries of freed clusters). When the cluster is reused as a new
/// L2 table, `l2_table_for_write` writes zeros to disk, then `entry_for_write` hits the stale slice:
/// the new table maps guest clusters to the old table's data clusters, and a write to guest 2 MiB
/// goes in place into guest 0's data cluster.
#[test]
fn freed_l2_table_leaves_stale_slices_in_cache() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    create_qcow2(d, "a.qcow2", "8M", "cluster_size=4096", None);
    qemu_io(d, "a.qcow2", &["write -q -P 0xaa 0 4k"]);
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join("a.qcow2"))
            .unwrap();
        let l1 = read_u64(&mut f, 40);
        let e = read_u64(&mut f, l1);
        assert_ne!(e & (1 << 63), 0);
        write_u64(&mut f, l1, e & !(1 << 63));
    }
    rt().block_on(async {
        let img = open(d, "a.qcow2", &rw()).await;
        let mut buf = vec![0u8; 4096];
        img.read(0, &mut buf).await.unwrap(); // caches the slice of the old table
        assert!(buf.iter().all(|&b| b == 0xaa));
        img.write(4096, &[0xbb; 4096]).await.unwrap(); // copies the table, frees the old one on flush
        img.flush().await.unwrap();
        img.write(2 << 20, &[0xcc; 4096]).await.unwrap(); // new L2 table reuses the freed cluster
        img.flush().await.unwrap();
        img.read(0, &mut buf).await.unwrap();
        assert!(
            buf.iter().all(|&b| b == 0xaa),
            "guest 0 was overwritten by the write to guest 2 MiB (first byte {:#x})",
            buf[0]
        );
        img.close().await.unwrap();
    });
    let out = run(
        d,
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0xaa 0 4k",
            "-c",
            "read -P 0xcc 2M 4k",
            "a.qcow2",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
}

/// The last, partial cluster of a disk whose size is not a multiple of the cluster size, against
/// qemu-io.
#[test]
fn last_partial_cluster_ops_match_qemu() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    let size: u64 = 100_352; // 64 KiB + 34 KiB
    for f in ["ours.qcow2", "theirs.qcow2"] {
        create_qcow2(d, f, &size.to_string(), "cluster_size=65536", None);
    }
    qemu_io(
        d,
        "theirs.qcow2",
        &[
            "write -q -P 7 99840 512",
            "write -q -P 8 65536 1024",
            "write -q -z 98304 2048",
            "write -q -P 9 0 100352",
            "write -q -z -u 65536 34816",
            "write -q -P 10 69632 512",
            "discard -q 65536 34816",
            "write -q -P 11 66048 512",
        ],
    );
    rt().block_on(async {
        let img = open(d, "ours.qcow2", &rw()).await;
        img.write(99840, &[7; 512]).await.unwrap();
        img.write(65536, &[8; 1024]).await.unwrap();
        img.write_zeroes(98304, 2048, false).await.unwrap();
        img.write(0, &vec![9; size as usize]).await.unwrap();
        img.write_zeroes(65536, 34816, true).await.unwrap();
        img.write(69632, &[10; 512]).await.unwrap();
        img.discard(65536, 34816).await.unwrap();
        img.write(66048, &[11; 512]).await.unwrap();
        img.close().await.unwrap();
    });
    assert_compare_and_check(d, "ours.qcow2", "theirs.qcow2");
}

/// Offsets and lengths near u64::MAX are refused, not panics.
#[test]
fn huge_offsets_are_errors() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    create_qcow2(d, "a.qcow2", "1M", "", None);
    rt().block_on(async {
        let img = open(d, "a.qcow2", &rw()).await;
        assert!(img.write(u64::MAX - 511, &[1; 512]).await.is_err());
        assert!(img.write(1 << 20, &[1; 1]).await.is_err());
        assert!(img.write_zeroes(u64::MAX, 1, true).await.is_err());
        assert!(img.write_zeroes(512, u64::MAX, true).await.is_err());
        assert!(img.discard(1 << 63, 1 << 63).await.is_err());
        assert!(img.discard(0, u64::MAX).await.is_err());
        img.write(0, &[]).await.unwrap();
        img.close().await.unwrap();
    });
}

/// Content of guest cluster `i` of the compressed image: half pseudo-random (so compressed clusters
/// are ~32 KiB and few share a host cluster), half constant.
fn cluster_content(i: u64, cs: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = vec![(i % 251) as u8 + 1; cs];
    for b in v[..cs / 2].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

/// Reads of a read-write layer pin only `Kind::Data` host clusters (qcow2/mod.rs `map_inner`), not the
/// host range of `Kind::Compressed` extents. A reader that mapped a compressed cluster and reads it
/// after the mutex is dropped races a discard + flush that frees (punches, reuses) that host range:
/// the read fails to decompress or returns another cluster's bytes. Stochastic: readers of the whole
/// disk (mapped in one batch, read afterwards) against discard + flush + rewrite of each cluster.
#[test]
fn compressed_reads_not_pinned_against_discard() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    let cs = 65536usize;
    let n = 512u64;
    let mut raw = Vec::with_capacity(cs * n as usize);
    for i in 0..n {
        raw.extend_from_slice(&cluster_content(i, cs));
    }
    std::fs::write(d.join("src.raw"), &raw).unwrap();
    common::qemu_img(
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
            "cluster_size=65536",
            "src.raw",
            "c.qcow2",
        ],
    );
    let raw = std::sync::Arc::new(raw);
    let failures = rt().block_on(async {
        let img = open(d, "c.qcow2", &rw()).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..3 {
            let img = img.clone();
            let stop = stop.clone();
            let raw = raw.clone();
            readers.push(tokio::spawn(async move {
                let mut bad = Vec::new();
                let total = cs * n as usize;
                let mut buf = vec![0u8; total];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && bad.len() < 5 {
                    match img.read(0, &mut buf).await {
                        Err(e) => bad.push(format!("read error: {e}")),
                        Ok(()) => {
                            for i in 0..n as usize {
                                let got = &buf[i * cs..(i + 1) * cs];
                                let ok = got == &raw[i * cs..(i + 1) * cs]
                                    || got.iter().all(|&b| b == 0)
                                    || got.iter().all(|&b| b == 0xee);
                                if !ok {
                                    bad.push(format!("cluster {i}: wrong content"));
                                }
                            }
                        }
                    }
                }
                bad
            }));
        }
        for i in 0..n {
            img.discard(i * cs as u64, cs as u64).await.unwrap();
            img.flush().await.unwrap();
            if i >= 2 {
                // Reuses the host clusters just freed.
                img.write((i - 2) * cs as u64, &vec![0xee; cs])
                    .await
                    .unwrap();
            }
            tokio::task::yield_now().await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = Vec::new();
        for r in readers {
            all.extend(r.await.unwrap());
        }
        img.close().await.unwrap();
        all
    });
    assert!(
        failures.is_empty(),
        "{} bad reads, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// With `data_file_raw`, the raw data file must stay a valid image of the guest disk. QEMU's discard
/// passes through to the data file (`qcow2_free_any_cluster` -> `bdrv_pdiscard(s->data_file)`), so
/// the discarded range reads as zeros there too. The engine's discard (write.rs `discard`) changes L2
/// only (zero.rs skips the release for data files), so the raw file keeps the old data while the
/// guest reads zeros.
#[test]
fn discard_leaves_raw_data_file_stale() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    for (img, raw) in [("ours.qcow2", "ours.raw"), ("theirs.qcow2", "theirs.raw")] {
        let o = format!("data_file={},data_file_raw=on", d.join(raw).display());
        create_qcow2(d, img, "1M", &o, None);
        qemu_io(d, img, &["write -q -P 5 0 128k"]);
    }
    qemu_io(d, "theirs.qcow2", &["discard -q 0 64k"]);
    rt().block_on(async {
        let img = open(d, "ours.qcow2", &rw()).await;
        img.discard(0, 65536).await.unwrap();
        let mut buf = vec![1u8; 65536];
        img.read(0, &mut buf).await.unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "guest reads zeros after discard"
        );
        img.close().await.unwrap();
    });
    let theirs = std::fs::read(d.join("theirs.raw")).unwrap();
    assert!(
        theirs[..65536].iter().all(|&b| b == 0),
        "qemu punches the raw data file"
    );
    let ours = std::fs::read(d.join("ours.raw")).unwrap();
    assert!(
        ours[..65536].iter().all(|&b| b == 0),
        "the raw data file still holds the discarded data (first byte {:#x}) while the guest reads zeros",
        ours[0]
    );
}

/// Cancellation: a fast-path write future dropped after it submitted its host write drops its
/// `BusyGuard` (data.rs `write_step`) while the host write keeps running (the std backend's pool runs
/// a job whose caller went away to completion; io_uring does the same). A discard + flush then frees
/// the host cluster, a new allocation reuses it, and the stale write lands over the new data.
/// Stochastic (the stale 32 MiB write must still be running when the reuse completes). Does NOT
/// reproduce on ext4 with the std backend: the punch of the freed cluster (fallocate) takes the inode
/// lock and so waits for the running buffered pwrite. Kept, ignored, as the scenario's executable form
/// (backends/filesystems where a punch does not serialise with in-flight writes, or punch unsupported).
#[test]
#[ignore = "does not reproduce on ext4 + std backend (punch serialises with the stale write)"]
fn cancelled_fast_path_write_lands_on_reused_cluster() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    create_qcow2(d, "a.qcow2", "64M", "cluster_size=65536", None);
    qemu_io(d, "a.qcow2", &["write -q -P 1 0 32M"]);
    let cs = 65536u64;
    let mut hits = 0;
    for round in 0..5u8 {
        let ok = rt().block_on(async {
            use futures::FutureExt;
            let img = open(d, "a.qcow2", &rw()).await;
            let mut b = vec![0u8; 512];
            img.read(0, &mut b).await.unwrap(); // caches the L2 slice
            let big = vec![2u8; 32 << 20];
            // Poll once (submits the host write), then drop: the request is cancelled.
            assert!(
                img.write(0, &big).now_or_never().is_none(),
                "write finished at once"
            );
            let last = (32 << 20) - cs;
            img.discard(last, cs).await.unwrap();
            img.flush().await.unwrap();
            let target = (40 << 20) + u64::from(round) * cs;
            img.write(target, &vec![0x33; cs as usize]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let mut got = vec![0u8; cs as usize];
            img.read(target, &mut got).await.unwrap();
            img.close().await.unwrap();
            got.iter().all(|&x| x == 0x33)
        });
        if !ok {
            hits += 1;
        }
    }
    assert_eq!(
        hits, 0,
        "in {hits} of 5 rounds a cancelled write overwrote a reused cluster"
    );
}
