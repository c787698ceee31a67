//! A read-write open of a lazy-refcounts image left dirty by a killed writer repairs it first (the
//! check's repair, as QEMU's open does): images written by qemu-io with lazy refcounts and left dirty
//! (`abort`), whose refcount blocks are then damaged on purpose (zeroed, saturated, cut off from the
//! table, or the table cut short), so that only a correct recount makes `qemu-img check` clean again;
//! the guest data must not change.

use std::path::Path;

use qcow2_engine::{Image, OpenOptions};
use qcow2_io::StdFileBackend;
use qcow2_testkit::{path_str, qemu_img, qemu_img_raw, run, skip_without_qemu, temp_dir};

/// How the refcount blocks are damaged before the rebuild.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Every refcount 0.
    Zero,
    /// Every byte 0xff (every refcount at its maximum).
    Saturate,
    /// Refcount table entries after the first cleared (blocks orphaned, counts missing).
    Orphan,
    /// The refcount table cut to its first cluster in the header (the rebuild must grow it again).
    Truncate,
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// `qemu-img check IMG`: (exit code, output).
fn check(dir: &Path, img: &str) -> (i32, String) {
    let out = run(dir, "qemu-img", &["check", img]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Creates an image with `opts`, runs the qemu-img commands `pre` on it, writes `before` with
/// qemu-io, takes a snapshot if asked, writes `dirty` and aborts; damages the refcounts, rebuilds,
/// and checks with qemu-img.
#[allow(clippy::too_many_arguments)]
async fn case(
    opts: &str,
    size: &str,
    pre: &[&[&str]],
    before: &[&str],
    snapshot: bool,
    dirty: &[&str],
    damage: Damage,
) {
    let dir = temp_dir();
    let d = dir.path();
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", size],
    );
    for cmd in pre {
        qemu_img(d, cmd);
    }
    let io_cmds = |cmds: &[&str], abort: bool| {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        if abort {
            args.extend(["-c", "abort"]);
        }
        args.push("img.qcow2");
        let out = run(d, "qemu-io", &args);
        assert!(
            abort || out.status.success(),
            "qemu-io {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    io_cmds(before, false);
    if snapshot {
        qemu_img(d, &["snapshot", "-c", "s1", "img.qcow2"]);
    }
    io_cmds(dirty, true);
    let path = d.join("img.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        bytes[79] & 1,
        1,
        "{opts}: qemu-io abort did not leave the image dirty"
    );
    let guest_before = qemu_img_raw(d, "img.qcow2", Some("qcow2"));

    // Damage the refcount blocks.
    let cs = 1usize << u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let rt = be64(&bytes, 48) as usize;
    let rt_len = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize * cs;
    for i in 0..rt_len / 8 {
        let block = be64(&bytes, rt + 8 * i) as usize;
        if block == 0 {
            continue;
        }
        match damage {
            Damage::Zero => bytes[block..block + cs].fill(0),
            Damage::Saturate => bytes[block..block + cs].fill(0xff),
            Damage::Orphan if i > 0 => bytes[rt + 8 * i..rt + 8 * i + 8].fill(0),
            Damage::Orphan | Damage::Truncate => {}
        }
    }
    if let Damage::Truncate = damage {
        assert!(
            rt_len > cs,
            "{opts}: qemu-img did not grow the refcount table"
        );
        bytes[56..60].copy_from_slice(&1u32.to_be_bytes());
    }
    std::fs::write(&path, &bytes).unwrap();
    let (code, text) = check(d, "img.qcow2");
    assert_ne!(code, 0, "{opts} {damage:?}: damage went unnoticed:\n{text}");

    // A read-write open repairs the dirty image (as QEMU's open runs its check with repairs); close.
    let rw = OpenOptions {
        read_only: false,
        follow_backing: false,
        ..OpenOptions::default()
    };
    let img = Image::<StdFileBackend>::open(&path, &rw)
        .await
        .unwrap_or_else(|e| panic!("{opts} {damage:?}: read-write open: {e}"));
    // The repaired image takes new allocations.
    img.write(0, &[7u8; 512]).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    assert_eq!(
        std::fs::read(&path).unwrap()[79] & 1,
        0,
        "{opts} {damage:?}: still dirty"
    );
    let (code, text) = check(d, "img.qcow2");
    assert_eq!(code, 0, "{opts} {damage:?}:\n{text}");
    let mut expected = guest_before;
    expected[..512].fill(7);
    assert!(
        qemu_img_raw(d, "img.qcow2", Some("qcow2")) == expected,
        "{opts} {damage:?}: guest data changed"
    );
    let _ = path_str(&path);
    if let Damage::Truncate = damage {
        let after = std::fs::read(&path).unwrap();
        assert_ne!(
            be64(&after, 48) as usize,
            rt,
            "{opts}: the table did not move"
        );
    }
}

#[tokio::test]
async fn repair_after_crash_with_snapshot_compressed_and_zero_clusters() {
    skip_without_qemu!();
    let before = [
        "write -P 1 0 300k",
        "write -c -P 2 1M 64k",
        "write -P 3 2M 64k",
        "write -z 2M 8k",
    ];
    let dirty = [
        "write -P 4 100k 50k",
        "write -c -P 5 1M 16k",
        "write -P 6 6M 200k",
        "discard 2060k 8k",
    ];
    for damage in [Damage::Zero, Damage::Saturate] {
        case(
            "lazy_refcounts=on,cluster_size=4096",
            "16M",
            &[],
            &before,
            true,
            &dirty,
            damage,
        )
        .await;
    }
    case(
        "lazy_refcounts=on,extended_l2=on",
        "64M",
        &[],
        &before,
        true,
        &dirty,
        Damage::Zero,
    )
    .await;
}

/// A persistent bitmap: its directory, table and data clusters count (autoclear bit 0 is set).
#[tokio::test]
async fn repair_counts_bitmaps() {
    skip_without_qemu!();
    case(
        "lazy_refcounts=on,cluster_size=4096",
        "64M",
        &[&["bitmap", "--add", "img.qcow2", "bm0"]],
        &["write -P 1 0 1M"],
        false,
        &["write -P 2 2M 1M"],
        Damage::Zero,
    )
    .await;
}

/// A read-write open clears the bitmaps autoclear bit (writes do not maintain bitmaps) and releases the
/// bitmap clusters: neither leaks nor errors afterwards, and a check of the open image agrees.
#[tokio::test]
async fn bitmap_references_are_dropped_with_the_autoclear_bit() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "img.qcow2",
            "64M",
        ],
    );
    qemu_img(d, &["bitmap", "--add", "img.qcow2", "bm0"]);
    let out = run(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 3M", "img.qcow2"],
    );
    assert!(out.status.success());
    let path = d.join("img.qcow2");
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let img = Image::<StdFileBackend>::open(&path, &rw).await.unwrap();
    img.write(4 << 20, &[3u8; 4096]).await.unwrap();
    let r = img.check(qcow2_engine::Repair::None).await.unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    img.close().await.unwrap();
    drop(img);
    let (code, text) = check(d, "img.qcow2");
    assert_eq!(code, 0, "{text}");
}

#[tokio::test]
async fn repair_with_many_blocks_and_wide_or_narrow_refcounts() {
    skip_without_qemu!();
    let before = ["write -P 1 0 700k"];
    let dirty = ["write -P 2 300k 1200k", "write -c -P 3 3M 4k"];
    case(
        "lazy_refcounts=on,cluster_size=512,refcount_bits=64",
        "8M",
        &[],
        &before,
        false,
        &dirty,
        Damage::Saturate,
    )
    .await;
    case(
        "lazy_refcounts=on,cluster_size=512,refcount_bits=2",
        "8M",
        &[],
        &before,
        true,
        &dirty,
        Damage::Zero,
    )
    .await;
}

#[tokio::test]
async fn repair_creates_missing_blocks() {
    skip_without_qemu!();
    let before = ["write -P 1 0 700k"];
    let dirty = ["write -P 2 300k 1200k"];
    case(
        "lazy_refcounts=on,cluster_size=512",
        "8M",
        &[],
        &before,
        false,
        &dirty,
        Damage::Orphan,
    )
    .await;
    // 64 entries of 64 refcounts of 512-byte clusters describe 2 MiB: 3 MiB of data made qemu-img
    // grow the table, which is cut back here.
    case(
        "lazy_refcounts=on,cluster_size=512,refcount_bits=64",
        "8M",
        &[],
        &["write -P 1 0 1M"],
        false,
        &["write -P 2 1M 2M"],
        Damage::Truncate,
    )
    .await;
}
