//! Overlap checks on the write path (issue 3, acceptance "Overlap checks").
//!
//! Proves that a guest write whose L2 entry was corrupted to point at metadata is refused before it
//! reaches the disk: in an image qemu-img made, the L2 entry of guest cluster 0 is patched to a NORMAL
//! entry with COPIED set (so the write takes the in-place fast path) whose host offset is the cluster of
//! the L1 table, the refcount table, the L2 table itself, the first refcount block, the snapshot table or
//! a snapshot's (inactive) L1 table. A write through it at guest offset 0 (so it would land on the
//! structure's first bytes) fails with a corruption error; the metadata cluster's bytes on disk are
//! unchanged; the corrupt bit (incompatible feature bit 1) is set on disk, which `qemu-img info`
//! reports too; later reads and writes on that handle fail; a fresh read-write open fails with
//! `CorruptBitSet` while a read-only open works and reads the untouched clusters as before.
//!
//! qemu-io, given the same write on a copy, reports the overlap and marks its copy corrupt, which shows
//! that each patched image really is the case QEMU's overlap check exists for.
//!
//! The header cluster cannot be a target: an L2 entry with host offset 0 means "unallocated" to QEMU.

mod common;

use common::write::{multi_thread_runtime, rw_options, KIB};
use common::{get_be64, put_be64, Work};
use qcow2::engine::{Error, Image, OpenOptions};
use qcow2::io::StdFileBackend;

const CLUSTER: u64 = 64 * KIB;
/// Offset mask of an L1 or standard L2 entry (bits 9..=55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The COPIED flag of L1/L2 entries.
const COPIED: u64 = 1 << 63;
/// Incompatible feature bit 1: the image is corrupt.
const CORRUPT_BIT: u64 = 1 << 1;

/// Which metadata structure the corrupted L2 entry points at.
#[derive(Debug, Clone, Copy)]
enum Target {
    L1Table,
    RefcountTable,
    L2Table,
    RefcountBlock,
    /// The snapshot table (needs an internal snapshot).
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    InactiveL1,
}

/// Builds `img.qcow2` with data in guest clusters 0 and 1 and returns the host offset of `target`.
fn build(w: &Work, target: Target) -> u64 {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        "img.qcow2",
        "4M",
    ]);
    w.qemu_io(&[], "img.qcow2", &["write -P 0x11 0 128k"]);
    if matches!(target, Target::SnapshotTable | Target::InactiveL1) {
        // Rewriting cluster 0 after the snapshot gives the active L2 table and cluster 0 back COPIED.
        w.qemu_img(&["snapshot", "-c", "snap1", "img.qcow2"]);
        w.qemu_io(&[], "img.qcow2", &["write -P 0x11 0 64k"]);
    }
    let p = w.p("img.qcow2");
    let l1 = get_be64(&p, 40);
    let reftable = get_be64(&p, 48);
    let l2 = get_be64(&p, l1) & OFFSET_MASK;
    let refblock = get_be64(&p, reftable) & OFFSET_MASK;
    assert!(
        l1 != 0 && reftable != 0 && l2 != 0 && refblock != 0,
        "unexpected layout: L1 {l1:#x} reftable {reftable:#x} L2 {l2:#x} refblock {refblock:#x}"
    );
    let t = match target {
        Target::L1Table => l1,
        Target::RefcountTable => reftable,
        Target::L2Table => l2,
        Target::RefcountBlock => refblock,
        Target::SnapshotTable => get_be64(&p, 64),
        // The first snapshot table entry starts with its L1 table offset.
        Target::InactiveL1 => get_be64(&p, get_be64(&p, 64)),
    };
    assert_ne!(t, 0, "{target:?}: not found in the header");
    assert_eq!(
        t % CLUSTER,
        0,
        "{target:?} at {t:#x} is not cluster-aligned"
    );
    // Guest cluster 0's L2 entry: NORMAL, COPIED, pointing at the metadata cluster.
    put_be64(&p, l2, COPIED | t);
    t
}

/// The bytes of the cluster at `off` in the image file.
fn cluster_bytes(w: &Work, off: u64) -> Vec<u8> {
    let d = w.read_file("img.qcow2");
    d[off as usize..(off + CLUSTER) as usize].to_vec()
}

fn overlap_case(target: Target) {
    let w = Work::new();
    let meta = build(&w, target);
    let before = cluster_bytes(&w, meta);
    let path = w.p("img.qcow2");

    // The oracle: QEMU refuses the same write on a copy as an overlap with metadata.
    std::fs::copy(&path, w.p("qemu.qcow2")).expect("copy");
    let q = w.qemu_io_try(&["-f", "qcow2"], "qemu.qcow2", &["write -P 0xee 0 4k"]);
    let text = format!("{}{}", q.stdout_str(), q.stderr);
    assert!(
        text.contains("Preventing invalid write on metadata"),
        "{target:?}: qemu-io did not see an overlap: {}",
        q.describe()
    );
    assert_ne!(get_be64(&w.p("qemu.qcow2"), 72) & CORRUPT_BIT, 0);

    multi_thread_runtime().block_on(async {
        let img = Image::<StdFileBackend>::open(&path, &rw_options())
            .await
            .expect("read-write open of the patched image (the corruption is only in an L2 entry)");
        assert!(!img.is_read_only());
        let err = img
            .write(0, &[0xee; 4096])
            .await
            .expect_err("a write through an L2 entry pointing at metadata must fail");
        assert!(
            err.is_corruption(),
            "{target:?}: expected a corruption error, got {err:?}"
        );
        assert_eq!(
            cluster_bytes(&w, meta),
            before,
            "{target:?}: the metadata cluster at {meta:#x} changed on disk"
        );
        assert_ne!(
            get_be64(&path, 72) & CORRUPT_BIT,
            0,
            "{target:?}: the corrupt bit is not set on disk"
        );
        // The handle refuses further I/O, also where the metadata is fine.
        let mut buf = vec![0u8; 4096];
        let r = img.read(CLUSTER, &mut buf).await;
        assert!(
            r.is_err(),
            "{target:?}: a read after the corruption succeeded"
        );
        let r = img.write(2 * CLUSTER, &[0x22; 512]).await;
        assert!(
            r.is_err(),
            "{target:?}: a write after the corruption succeeded"
        );
        let r = img.write_zeroes(3 * CLUSTER, CLUSTER, false).await;
        assert!(
            r.is_err(),
            "{target:?}: a zero write after the corruption succeeded"
        );
    });
    assert_eq!(
        cluster_bytes(&w, meta),
        before,
        "{target:?}: the metadata cluster changed after the handle was dropped"
    );

    let info = common::parse_json(&w.qemu_img(&["info", "--output=json", "img.qcow2"]));
    assert_eq!(
        info["format-specific"]["data"]["corrupt"], true,
        "{target:?}: qemu-img info does not report the image as corrupt: {info}"
    );

    multi_thread_runtime().block_on(async {
        match Image::<StdFileBackend>::open(&path, &rw_options()).await {
            Err(Error::CorruptBitSet { .. }) => {}
            Err(e) => panic!("{target:?}: read-write reopen failed with {e:?}, not CorruptBitSet"),
            Ok(_) => panic!("{target:?}: read-write reopen of a corrupt image succeeded"),
        }
        let ro = Image::<StdFileBackend>::open(&path, &OpenOptions::default())
            .await
            .expect("read-only open of an image with the corrupt bit");
        let mut buf = vec![0u8; CLUSTER as usize];
        ro.read(CLUSTER, &mut buf).await.expect("read-only read");
        assert!(
            buf.iter().all(|&b| b == 0x11),
            "{target:?}: guest cluster 1 no longer reads as written"
        );
    });
}

#[test]
fn write_into_l1_table_is_refused() {
    overlap_case(Target::L1Table);
}

#[test]
fn write_into_refcount_table_is_refused() {
    overlap_case(Target::RefcountTable);
}

#[test]
fn write_into_active_l2_table_is_refused() {
    overlap_case(Target::L2Table);
}

#[test]
fn write_into_refcount_block_is_refused() {
    overlap_case(Target::RefcountBlock);
}

#[test]
fn write_into_snapshot_table_is_refused() {
    overlap_case(Target::SnapshotTable);
}

#[test]
fn write_into_inactive_l1_table_is_refused() {
    overlap_case(Target::InactiveL1);
}
