//! Hostile images at write time (issue 4, item 6), the cases `tests/write_overlap.rs` does not cover.
//!
//! `write_overlap.rs` patches an L2 entry to point at the L1 table, the refcount table, an L2 table, a
//! refcount block, the snapshot table or an inactive L1 table, and proves that a write through it is
//! refused. The header cannot be reached that way (an L2 entry with host offset 0 is unallocated). Here:
//!
//! - The hostile image lies in its refcounts: the refcount of a live metadata cluster (the L1 table, the
//!   refcount table, the refcount block) is set to 0, so the cluster allocator sees it as free and may
//!   hand it out for guest data, which is how peers overwrote metadata. A guest write into an
//!   unallocated cluster must then be refused by the overlap checks before anything lands in the
//!   metadata: it fails with an error for which `Error::is_corruption()` is true, the metadata cluster's
//!   bytes are unchanged, the image is marked corrupt (`qemu-img info` says `corrupt: true`). qemu-io,
//!   given the same write on a copy, prevents it as a write on metadata too, which shows each patched
//!   image is the case the overlap check exists for.
//! - The header's refcount set to 0: our allocator never hands out cluster 0 (QEMU's does, and its
//!   overlap check then refuses the write), so the write succeeds elsewhere and the header is untouched.
//! - The header as a target of a metadata write: the L1 table offset is set to 0, so the L1 table
//!   overlaps the header and a write that needs a new L2 table updates "L1 entry 0", the header's first
//!   8 bytes. The overlap check must refuse that L1 update (as QEMU's does; ours when the update is
//!   written back, at the flush) and mark the image corrupt, the header otherwise untouched.
//!   (A refcount table at offset 0 is refused at open already.)
//!
//! Then the corrupt bit: an image that has it opens read-only only; a read-write open fails with a
//! message telling to run `qcow2 check -r all`, and `qcow2 io` in read-write mode prints that message
//! while `qcow2 io -r` still reads the data.

mod common;

use std::time::Duration;

use common::write::{multi_thread_runtime, rw_options, KIB};
use common::{get_be64, Work};
use qcow2::engine::{Error, Image, OpenOptions};
use qcow2::io::StdFileBackend;

const CLUSTER: u64 = 64 * KIB;
/// Offset mask of an L1 / refcount table entry's offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Incompatible feature bit 1: the image is corrupt.
const CORRUPT_BIT: u64 = 1 << 1;
/// Offset of the incompatible features field in a v3 header.
const INCOMPATIBLE: u64 = 72;
/// Guest offset of the write that needs a fresh data cluster (nothing is allocated there).
const GUEST_WRITE: u64 = 1 << 20;
/// The advice a corrupt image's read-write open must give.
const ADVICE: &str = "qcow2 check -r all";

/// The metadata cluster whose refcount the hostile image sets to 0.
#[derive(Debug, Clone, Copy)]
enum Target {
    Header,
    L1Table,
    RefcountTable,
    RefcountBlock,
}

/// Builds `img.qcow2`: 64 KiB clusters, 16-bit refcounts, data (0x11) in guest clusters 0 and 1.
fn base(w: &Work) {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k,refcount_bits=16",
        "img.qcow2",
        "4M",
    ]);
    w.qemu_io(&[], "img.qcow2", &["write -P 0x11 0 128k"]);
}

/// Builds the [`base`] image, sets the refcount of `target`'s cluster to 0 and returns the cluster's offset.
fn build(w: &Work, target: Target) -> u64 {
    base(w);
    let p = w.p("img.qcow2");
    let l1 = get_be64(&p, 40);
    let reftable = get_be64(&p, 48);
    let refblock = get_be64(&p, reftable) & OFFSET_MASK;
    assert!(
        l1 != 0 && reftable != 0 && refblock != 0,
        "unexpected layout: L1 {l1:#x} reftable {reftable:#x} refblock {refblock:#x}"
    );
    let t = match target {
        Target::Header => 0,
        Target::L1Table => l1,
        Target::RefcountTable => reftable,
        Target::RefcountBlock => refblock,
    };
    assert_eq!(
        t % CLUSTER,
        0,
        "{target:?} at {t:#x} is not cluster-aligned"
    );
    // 16-bit refcounts: entry i of the first block is at refblock + 2 i. The first block covers the
    // first 2 GiB of the file, so every target's refcount is in it.
    let mut d = w.read_file("img.qcow2");
    let at = (refblock + 2 * (t / CLUSTER)) as usize;
    assert_eq!(
        u16::from_be_bytes([d[at], d[at + 1]]),
        1,
        "{target:?}: refcount before the damage"
    );
    d[at..at + 2].copy_from_slice(&[0, 0]);
    w.write_file("img.qcow2", &d);
    t
}

/// The bytes of the cluster at `off` in `name`, with the corrupt bit cleared when the cluster is the
/// header (the only header change a refused write may make).
fn cluster_bytes(w: &Work, name: &str, off: u64) -> Vec<u8> {
    let d = w.read_file(name);
    let mut c = d[off as usize..(off + CLUSTER) as usize].to_vec();
    if off == 0 {
        let f = INCOMPATIBLE as usize;
        c[f + 7] &= !(CORRUPT_BIT as u8);
    }
    c
}

fn allocation_case(target: Target) {
    let w = Work::new();
    let meta = build(&w, target);
    let before = cluster_bytes(&w, "img.qcow2", meta);
    let path = w.p("img.qcow2");

    // The oracle: QEMU's allocator hands out the same cluster and its overlap check refuses the write.
    std::fs::copy(&path, w.p("qemu.qcow2")).expect("copy");
    let cmd = format!("write -P 0xee {GUEST_WRITE} 4k");
    let q = w.qemu_io_try(&["-f", "qcow2"], "qemu.qcow2", &[&cmd]);
    let text = format!("{}{}", q.stdout_str(), q.stderr);
    assert!(
        text.contains("Preventing invalid write on metadata"),
        "{target:?}: qemu-io did not see an overlap: {}",
        q.describe()
    );
    assert_ne!(get_be64(&w.p("qemu.qcow2"), INCOMPATIBLE) & CORRUPT_BIT, 0);

    multi_thread_runtime().block_on(async {
        let img = Image::<StdFileBackend>::open(&path, &rw_options())
            .await
            .expect("read-write open (the damage is only in a refcount)");
        let err = img
            .write(GUEST_WRITE, &[0xee; 4096])
            .await
            .expect_err("a write whose new cluster is live metadata must fail");
        assert!(
            err.is_corruption(),
            "{target:?}: expected a corruption error, got {err:?}"
        );
        assert_eq!(
            cluster_bytes(&w, "img.qcow2", meta),
            before,
            "{target:?}: the metadata cluster at {meta:#x} changed on disk"
        );
        assert_ne!(
            get_be64(&path, INCOMPATIBLE) & CORRUPT_BIT,
            0,
            "{target:?}: the corrupt bit is not set on disk"
        );
        let r = img.write(GUEST_WRITE + CLUSTER, &[0x22; 512]).await;
        assert!(
            r.is_err(),
            "{target:?}: a write after the corruption succeeded"
        );
        drop(img);
    });
    assert_eq!(
        cluster_bytes(&w, "img.qcow2", meta),
        before,
        "{target:?}: the metadata cluster changed after the handle was dropped"
    );
    let info = common::parse_json(&w.qemu_img(&["info", "--output=json", "img.qcow2"]));
    assert_eq!(
        info["format-specific"]["data"]["corrupt"], true,
        "{target:?}: qemu-img info does not report the image as corrupt: {info}"
    );
    // The data written before the damage still reads back, read-only.
    multi_thread_runtime().block_on(async {
        let ro = Image::<StdFileBackend>::open(&path, &OpenOptions::default())
            .await
            .expect("read-only open of an image with the corrupt bit");
        let mut buf = vec![0u8; 2 * CLUSTER as usize];
        ro.read(0, &mut buf).await.expect("read-only read");
        assert!(
            buf.iter().all(|&b| b == 0x11),
            "{target:?}: guest clusters 0-1 no longer read as written"
        );
    });
    println!("{target:?}: allocation into metadata at {meta:#x} refused, image marked corrupt");
}

/// The header's refcount is 0: the allocator must not hand out cluster 0 (ours never does), and the
/// header stays intact whatever happens to the write.
#[test]
fn allocation_never_takes_the_header() {
    let w = Work::new();
    build(&w, Target::Header);
    let before = cluster_bytes(&w, "img.qcow2", 0);
    let path = w.p("img.qcow2");
    multi_thread_runtime().block_on(async {
        let img = Image::<StdFileBackend>::open(&path, &rw_options())
            .await
            .expect("read-write open (the damage is only in a refcount)");
        match img.write(GUEST_WRITE, &[0xee; 4096]).await {
            Ok(()) => {
                let mut buf = vec![0u8; 4096];
                img.read(GUEST_WRITE, &mut buf).await.expect("read back");
                assert!(
                    buf.iter().all(|&b| b == 0xee),
                    "the write does not read back"
                );
                img.close().await.expect("close");
            }
            Err(e) => assert!(e.is_corruption(), "expected a corruption error, got {e:?}"),
        }
    });
    assert_eq!(
        cluster_bytes(&w, "img.qcow2", 0),
        before,
        "the header cluster changed"
    );
    let info = common::parse_json(&w.qemu_img(&["info", "--output=json", "img.qcow2"]));
    assert_eq!(
        info["format"], "qcow2",
        "the image is no longer qcow2: {info}"
    );
    println!("header refcount 0: the header cluster was not handed out");
}

/// The L1 table offset is 0, so the L1 table overlaps the header: the L1 update of a write that needs
/// a new L2 table would overwrite the header's magic. It must be refused as a write on metadata.
#[test]
fn l1_table_over_header_is_refused() {
    let w = Work::new();
    base(&w);
    let p = w.p("img.qcow2");
    common::put_be64(&p, 40, 0);
    let before = cluster_bytes(&w, "img.qcow2", 0);

    std::fs::copy(&p, w.p("qemu.qcow2")).expect("copy");
    let q = w.qemu_io_try(&["-f", "qcow2"], "qemu.qcow2", &["write -P 0xee 0 4k"]);
    let text = format!("{}{}", q.stdout_str(), q.stderr);
    assert!(
        text.contains("overlaps with qcow2_header"),
        "qemu-io did not see an overlap with the header: {}",
        q.describe()
    );

    let opened = multi_thread_runtime().block_on(async {
        let img = match Image::<StdFileBackend>::open(&p, &rw_options()).await {
            Ok(img) => img,
            // Refusing such an image at open is fine too: nothing can be written then.
            Err(e) => {
                assert!(
                    e.is_corruption(),
                    "open failed with a non-corruption error: {e:?}"
                );
                return false;
            }
        };
        // The L1 update may be written with the request or deferred to the next flush: one of them
        // must fail, as a corruption.
        let err = match img.write(0, &[0xee; 4096]).await {
            Err(e) => e,
            Ok(()) => img
                .flush()
                .await
                .expect_err("the L1 update of the write lands in the header: the flush must fail"),
        };
        assert!(
            err.is_corruption(),
            "expected a corruption error, got {err:?}"
        );
        let mut buf = vec![0u8; 512];
        assert!(
            img.read(CLUSTER, &mut buf).await.is_err(),
            "the handle still serves reads after the corruption"
        );
        let _ = img.close().await;
        drop(img);
        assert_ne!(
            get_be64(&p, INCOMPATIBLE) & CORRUPT_BIT,
            0,
            "the corrupt bit is not set on disk"
        );
        true
    });
    assert_eq!(
        cluster_bytes(&w, "img.qcow2", 0),
        before,
        "the header cluster changed"
    );
    if !opened {
        println!("L1 table over the header: refused at open");
        return;
    }
    let info = common::parse_json(&w.qemu_img(&["info", "--output=json", "img.qcow2"]));
    assert_eq!(
        info["format-specific"]["data"]["corrupt"], true,
        "qemu-img info does not report the image as corrupt: {info}"
    );
    println!("L1 table over the header: the L1 update was refused, image marked corrupt");
}

#[test]
fn allocation_into_l1_table_is_refused() {
    allocation_case(Target::L1Table);
}

#[test]
fn allocation_into_refcount_table_is_refused() {
    allocation_case(Target::RefcountTable);
}

#[test]
fn allocation_into_refcount_block_is_refused() {
    allocation_case(Target::RefcountBlock);
}

/// An image with the corrupt bit set (by qemu-io's overlap check) opens read-only only; the read-write
/// open's message tells to run `qcow2 check -r all`, in the library and in `qcow2 io`.
#[test]
fn corrupt_image_opens_read_only_with_advice() {
    let w = Work::new();
    build(&w, Target::Header);
    let cmd = format!("write -P 0xee {GUEST_WRITE} 4k");
    w.qemu_io_try(&["-f", "qcow2"], "img.qcow2", &[&cmd]);
    let path = w.p("img.qcow2");
    assert_ne!(
        get_be64(&path, INCOMPATIBLE) & CORRUPT_BIT,
        0,
        "qemu-io did not mark the image corrupt"
    );
    let file_before = w.read_file("img.qcow2");

    multi_thread_runtime().block_on(async {
        let err = match Image::<StdFileBackend>::open(&path, &rw_options()).await {
            Err(e) => e,
            Ok(_) => panic!("read-write open of a corrupt image succeeded"),
        };
        assert!(
            matches!(err, Error::CorruptBitSet { .. }),
            "expected CorruptBitSet, got {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(ADVICE), "message lacks the advice: {msg}");
        assert!(
            msg.contains("read-only"),
            "message does not say read-only: {msg}"
        );
        let ro = Image::<StdFileBackend>::open(&path, &OpenOptions::default())
            .await
            .expect("read-only open of a corrupt image");
        assert!(ro.is_read_only());
        let mut buf = vec![0u8; 4096];
        ro.read(0, &mut buf).await.expect("read-only read");
        assert!(buf.iter().all(|&b| b == 0x11));
    });

    let t = Duration::from_secs(60);
    let rw = w.qcow2_try(&["io", "-c", "write -P 0x33 0 512", "img.qcow2"], &[], t);
    assert!(
        !rw.success(),
        "qcow2 io opened a corrupt image read-write: {}",
        rw.describe()
    );
    assert!(
        rw.stderr.contains(ADVICE),
        "qcow2 io does not print the advice: {}",
        rw.describe()
    );
    let ro = w.qcow2_try(
        &["io", "-r", "-c", "read -P 0x11 0 512", "img.qcow2"],
        &[],
        t,
    );
    assert!(
        ro.success(),
        "qcow2 io -r failed on a corrupt image: {}",
        ro.describe()
    );
    assert!(
        w.read_file("img.qcow2") == file_before,
        "opening a corrupt image changed it"
    );
    println!("corrupt image: read-write open refused with '{ADVICE}', read-only works");
}
