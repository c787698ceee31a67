//! `check_file` against `qemu-img check` on the same files: valid images of every kind qemu-img makes,
//! and images damaged on purpose. Every counter of `--output=json` and every stderr line must agree;
//! after our `-r all` (and `-r leaks`), `qemu-img check` must agree with our own re-check, and where
//! qemu-img can repair too, the fixed counts agree.

mod check_common;

use check_common::{assert_same, be64, field, ours, qemu_check, Layout};
use qcow2_engine::{check_file, Repair};
use qcow2_io::StdFileBackend;
use qcow2_testkit::{create_qcow2, qemu_img, qemu_io, run, skip_without_qemu, temp_dir};

/// Damages an image file in memory.
type Damage = fn(&mut [u8], &Layout);

/// A scenario: image options, qemu-io commands, extra qemu-img commands, and a damage.
struct Case {
    name: &'static str,
    opts: &'static str,
    io: &'static [&'static str],
    img_cmds: &'static [&'static [&'static str]],
    damage: Damage,
    /// qemu-img -r all repairs it fully too (compare the fixed counts and the outcome).
    qemu_repairs: bool,
}

fn no_damage(_: &mut [u8], _: &Layout) {}

async fn run_case(c: &Case) {
    let dir = temp_dir();
    let d = dir.path();
    create_qcow2(d, "img.qcow2", "64M", c.opts, None);
    if !c.io.is_empty() {
        qemu_io(d, &["-f", "qcow2"], "img.qcow2", c.io);
    }
    for cmd in c.img_cmds {
        qemu_img(d, cmd);
    }
    let path = d.join("img.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    let layout = Layout::of(&bytes);
    (c.damage)(&mut bytes, &layout);
    std::fs::write(&path, &bytes).unwrap();
    std::fs::write(d.join("q.qcow2"), &bytes).unwrap();
    std::fs::write(d.join("leaks.qcow2"), &bytes).unwrap();

    let what = format!("{} ({})", c.name, c.opts);
    let (code, j, stderr) = qemu_check(d, "img.qcow2", None);
    let r = ours(&path, Repair::None).await;
    assert_same(&what, &r, code, &j, &stderr);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "{what}: a check without -r wrote"
    );

    // -r all: ours leaves an image qemu-img finds clean; our re-check agrees with it.
    let fixed = ours(&path, Repair::All).await;
    let (code2, j2, stderr2) = qemu_check(d, "img.qcow2", None);
    assert_eq!(
        code2, 0,
        "{what}: after our -r all, qemu-img check: {j2}\n{stderr2:?}\nours: {fixed:?}"
    );
    assert_eq!(fixed.exit_code(), 0, "{what}: our -r all: {fixed:?}");
    assert_same(
        &format!("{what} after -r all"),
        &ours(&path, Repair::None).await,
        code2,
        &j2,
        &stderr2,
    );
    // Two references to one cluster overflow 1-bit refcounts: qemu-img cannot repair that (we copy).
    let overflow = c.name == "two entries, one cluster" && c.opts.contains("refcount_bits=1");
    if c.qemu_repairs && !overflow {
        let (qc, qj, _) = qemu_check(d, "q.qcow2", Some("all"));
        // Where qemu-img cannot repair everything (e.g. an extended L2 bitmap left behind by the
        // damage), ours still must (checked above); the fixed counts are compared where both can.
        if qc == 0 {
            assert_eq!(
                fixed.leaks_fixed,
                field(&qj, "leaks-fixed"),
                "{what}: leaks-fixed {qj} {fixed:?}"
            );
            assert_eq!(
                fixed.corruptions_fixed,
                field(&qj, "corruptions-fixed"),
                "{what}: corruptions-fixed {qj} {fixed:?}"
            );
        }
    }
    // -r leaks: same exit code and fixed counts as qemu-img's.
    let (lc, lj, lerr) = qemu_check(d, "q.qcow2", None);
    let _ = (lc, lj, lerr);
    let leaks_path = d.join("leaks.qcow2");
    let (qc, qj, qerr) = qemu_check(d, "leaks.qcow2", Some("leaks"));
    std::fs::write(&leaks_path, &bytes).unwrap();
    let r = check_file::<StdFileBackend>(&leaks_path, None, Repair::Leaks).await;
    match r {
        Ok(r) => {
            assert_eq!(
                r.exit_code(),
                qc,
                "{what}: -r leaks exit code; qemu {qj} {qerr:?}; ours {r:?}"
            );
            assert_eq!(r.leaks_fixed, field(&qj, "leaks-fixed"), "{what}: -r leaks");
        }
        Err(e) => panic!("{what}: -r leaks: {e}"),
    }
}

const WRITES: &[&str] = &[
    "write -P 1 0 200k",
    "write -P 2 1M 64k",
    "write -z 2M 64k",
    "write -P 3 5M 4k",
];

fn leak(b: &mut [u8], l: &Layout) {
    // Drop the L2 entry of guest cluster 0: its data cluster stays counted.
    let e = l.l2_entry(b, 0);
    b[e..e + 8].fill(0);
}
fn refcount_zero(b: &mut [u8], l: &Layout) {
    let e = l.l2_entry(b, 1);
    let host = be64(b, e) & 0x00ff_ffff_ffff_fe00;
    l.set_refcount(b, host / l.cs, 0);
}
fn refcount_two(b: &mut [u8], l: &Layout) {
    let e = l.l2_entry(b, 1);
    let host = be64(b, e) & 0x00ff_ffff_ffff_fe00;
    l.set_refcount(b, host / l.cs, 2);
}
fn copied_cleared(b: &mut [u8], l: &Layout) {
    let e = l.l2_entry(b, 1);
    b[e] &= 0x7f;
}
fn shared(b: &mut [u8], l: &Layout) {
    let e0 = l.l2_entry(b, 0);
    let e1 = l.l2_entry(b, 1);
    let v = b[e0..e0 + 8].to_vec();
    b[e1..e1 + 8].copy_from_slice(&v);
}
fn unaligned(b: &mut [u8], l: &Layout) {
    let e = l.l2_entry(b, 1);
    let v = be64(b, e) + 512;
    b[e..e + 8].copy_from_slice(&v.to_be_bytes());
}
fn past_eof(b: &mut [u8], l: &Layout) {
    let e = l.l2_entry(b, 1);
    let end = (b.len() as u64).div_ceil(l.cs) * l.cs + 16 * l.cs;
    let v = (1u64 << 63) | end;
    b[e..e + 8].copy_from_slice(&v.to_be_bytes());
}

#[tokio::test]
async fn valid_images_agree_with_qemu_img() {
    skip_without_qemu!();
    let cases = [
        ("default", ""),
        ("512", "cluster_size=512"),
        ("4k refcount 1", "cluster_size=4096,refcount_bits=1"),
        ("2M", "cluster_size=2M"),
        ("extended L2", "extended_l2=on"),
        ("v2", "compat=0.10"),
        ("refcount 64", "refcount_bits=64,cluster_size=4096"),
    ];
    for (name, opts) in cases {
        run_case(&Case {
            name,
            opts,
            io: WRITES,
            img_cmds: &[],
            damage: no_damage,
            qemu_repairs: true,
        })
        .await;
    }
    run_case(&Case {
        name: "snapshot",
        opts: "cluster_size=4096",
        io: WRITES,
        img_cmds: &[&["snapshot", "-c", "s1", "img.qcow2"]],
        damage: no_damage,
        qemu_repairs: true,
    })
    .await;
}

#[tokio::test]
async fn damaged_images_agree_with_qemu_img() {
    skip_without_qemu!();
    let damages: [(&str, Damage, bool); 7] = [
        ("leak", leak, true),
        ("refcount 0", refcount_zero, true),
        ("refcount 2", refcount_two, true),
        ("COPIED cleared", copied_cleared, true),
        ("two entries, one cluster", shared, true),
        ("unaligned entry", unaligned, false),
        ("entry past EOF", past_eof, false),
    ];
    for opts in ["", "cluster_size=512", "cluster_size=4096,refcount_bits=1"] {
        for (name, damage, qemu_repairs) in damages {
            run_case(&Case {
                name,
                opts,
                io: WRITES,
                img_cmds: &[],
                damage,
                qemu_repairs,
            })
            .await;
        }
    }
}

fn refblock_overlaps_l1(b: &mut [u8], l: &Layout) {
    // Refcount table entry 0 now points at the L1 table's cluster: the structure must be rebuilt.
    let l1 = l.l1 & !(l.cs - 1);
    let at = l.reftable as usize;
    b[at..at + 8].copy_from_slice(&l1.to_be_bytes());
}
fn reftable_entry_unaligned(b: &mut [u8], l: &Layout) {
    let at = l.reftable as usize;
    let v = be64(b, at) + 512;
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[tokio::test]
async fn more_damages_agree_with_qemu_img() {
    skip_without_qemu!();
    let damages: [(&str, Damage, bool); 5] = [
        ("leak", leak, true),
        ("refcount 0", refcount_zero, true),
        ("refcount 2", refcount_two, true),
        ("COPIED cleared", copied_cleared, true),
        ("two entries, one cluster", shared, true),
    ];
    for opts in ["extended_l2=on", "cluster_size=2M", "compat=0.10"] {
        for (name, damage, qemu_repairs) in damages {
            run_case(&Case {
                name,
                opts,
                io: WRITES,
                img_cmds: &[],
                damage,
                qemu_repairs,
            })
            .await;
        }
    }
    for (name, damage) in [
        (
            "refcount block overlaps the L1 table",
            refblock_overlaps_l1 as Damage,
        ),
        ("refcount table entry unaligned", reftable_entry_unaligned),
    ] {
        for opts in ["", "cluster_size=512"] {
            run_case(&Case {
                name,
                opts,
                io: WRITES,
                img_cmds: &[],
                damage,
                qemu_repairs: true,
            })
            .await;
        }
    }
}

#[tokio::test]
async fn compressed_and_snapshot_images_agree_with_qemu_img() {
    skip_without_qemu!();
    for opts in ["cluster_size=4096", "extended_l2=on"] {
        for damage in [no_damage as Damage, refcount_two, copied_cleared, leak] {
            run_case(&Case {
                name: "snapshot",
                opts,
                io: WRITES,
                img_cmds: &[
                    &["snapshot", "-c", "s1", "img.qcow2"],
                    &["snapshot", "-c", "s2", "img.qcow2"],
                ],
                damage,
                qemu_repairs: true,
            })
            .await;
        }
    }
    // Compressed clusters (qemu-io write -c), sharing host clusters.
    for opts in ["cluster_size=4096", "", "extended_l2=on"] {
        run_case(&Case {
            name: "compressed",
            opts,
            io: &[
                "write -c -P 1 0 64k",
                "write -c -P 2 64k 64k",
                "write -P 3 1M 64k",
            ],
            img_cmds: &[],
            damage: no_damage,
            qemu_repairs: true,
        })
        .await;
    }
}

/// A lazy-refcounts image whose writer died with the dirty bit set: the stored refcounts lag.
#[tokio::test]
async fn lazy_refcounts_image_killed_while_dirty() {
    skip_without_qemu!();
    for opts in ["lazy_refcounts=on", "lazy_refcounts=on,cluster_size=512"] {
        let dir = temp_dir();
        let d = dir.path();
        create_qcow2(d, "img.qcow2", "64M", opts, None);
        let mut args = vec!["-f", "qcow2"];
        for c in WRITES.iter().chain(&["write -P 9 8M 300k", "abort"]) {
            args.extend(["-c", c]);
        }
        args.push("img.qcow2");
        let out = run(d, "qemu-io", &args);
        assert!(!out.status.success());
        let path = d.join("img.qcow2");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[79] & 1, 1, "not dirty");
        std::fs::write(d.join("q.qcow2"), &bytes).unwrap();
        let (code, j, stderr) = qemu_check(d, "img.qcow2", None);
        assert_ne!(code, 0, "the kill left nothing to find: {j}");
        let r = ours(&path, Repair::None).await;
        assert_same(opts, &r, code, &j, &stderr);
        let fixed = ours(&path, Repair::All).await;
        let (qc, qj, _) = qemu_check(d, "q.qcow2", Some("all"));
        assert_eq!(
            (
                fixed.exit_code(),
                fixed.corruptions_fixed,
                fixed.leaks_fixed
            ),
            (
                qc,
                field(&qj, "corruptions-fixed"),
                field(&qj, "leaks-fixed")
            ),
            "{opts}: {qj} {fixed:?}"
        );
        let (code, j, _) = qemu_check(d, "img.qcow2", None);
        assert_eq!(code, 0, "{opts}: {j}");
        assert_eq!(
            std::fs::read(&path).unwrap()[79] & 1,
            0,
            "{opts}: still dirty"
        );
        assert_eq!(
            qcow2_testkit::qemu_img_raw(d, "img.qcow2", None),
            qcow2_testkit::qemu_img_raw(d, "q.qcow2", None),
            "{opts}: guest data differs from qemu-img's repair"
        );
    }
}
