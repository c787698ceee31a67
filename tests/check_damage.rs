//! The damage matrix: valid images made by qemu-img / qemu-io, damaged in one place by patching their
//! bytes (tables found by parsing the header, L1 and refcount table here), then checked by both tools.
//!
//! For each damage and image variant (64 KiB clusters, 512-byte clusters, extended L2, 1-bit
//! refcounts, an internal snapshot sharing most clusters, compressed clusters packed into shared host
//! clusters, an overlay over a backing file where the damage
//! concerns a guest cluster):
//! - `qcow2 check --output=json` reports the same `corruptions`, `leaks` and `check-errors` counts and
//!   the same exit code as `qemu-img check --output=json` (each on its own copy);
//! - `qcow2 check -r all` repairs our copy, after which `qemu-img check` finds it clean (exit code 0)
//!   (except for an inconsistent snapshot table, which neither tool repairs: then the counts and exit
//!   code after `-r all` must be qemu-img's);
//!   the guest data is what qemu-img's own repair gives (`qemu-img compare` with qemu-img's repaired
//!   copy) where qemu-img can repair, and otherwise (unaligned and past-the-end L2 entries, which
//!   qemu-img cannot repair) every cluster reads back as written except the damaged one, which reads as
//!   unallocated (zeros, or the backing file's data);
//! - where qemu-img's `-r all` leaves a clean image, our exit code after `-r all` is its exit code;
//! - `-r leaks` on both tools leaves the same counts and exit code.
//!
//! Every discrepancy is collected and printed (with the image recipe) before the test fails, so one run
//! lists them all.

mod common;
mod common_check;

use common::{images::KIB, images::MIB, Work};
use common_check::{copy, counts, exit_code, our_check, qemu_check, Counts, Layout, COPIED};

/// An image variant.
#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    /// `-o` options of qemu-img create.
    opts: &'static str,
    cs: u64,
    /// Over a backing file filled with [`BACKING_PATTERN`].
    backing: bool,
    /// With an internal snapshot taken after the first writes, and guest cluster 0 rewritten after it
    /// (so that it has a cluster of its own while the others are shared with the snapshot).
    snapshot: bool,
    /// Made by `qemu-img convert -c`: every written cluster compressed, several to a host cluster.
    compressed: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "64k",
        opts: "",
        cs: 64 * KIB,
        backing: false,
        snapshot: false,
        compressed: false,
    },
    Variant {
        name: "512",
        opts: "cluster_size=512",
        cs: 512,
        backing: false,
        snapshot: false,
        compressed: false,
    },
    Variant {
        name: "extended_l2",
        opts: "extended_l2=on",
        cs: 64 * KIB,
        backing: false,
        snapshot: false,
        compressed: false,
    },
    Variant {
        name: "refcount_bits=1",
        opts: "refcount_bits=1",
        cs: 64 * KIB,
        backing: false,
        snapshot: false,
        compressed: false,
    },
    Variant {
        name: "overlay",
        opts: "",
        cs: 64 * KIB,
        backing: true,
        snapshot: false,
        compressed: false,
    },
    Variant {
        name: "snapshot",
        opts: "",
        cs: 64 * KIB,
        backing: false,
        snapshot: true,
        compressed: false,
    },
    Variant {
        name: "compressed",
        opts: "",
        cs: 64 * KIB,
        backing: false,
        snapshot: false,
        compressed: true,
    },
];

const SIZE: u64 = 4 * MIB;
const BACKING_PATTERN: u8 = 0x77;

/// The damages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    Clean,
    /// A cluster past the used ones (the file extended by one cluster) given refcount 1.
    LeakRefcount,
    /// An L2 entry zeroed: its data cluster is no longer referenced.
    LeakL2Dropped,
    /// Refcount 0 on a used data cluster.
    RefcountZero,
    /// Refcount 2 on a data cluster referenced once.
    RefcountTwo,
    /// COPIED cleared in an L2 entry.
    L2CopiedCleared,
    /// COPIED cleared in an L1 entry.
    L1CopiedCleared,
    /// Two L2 entries pointing at one data cluster.
    DoubleReference,
    /// An L2 entry whose offset is not cluster-aligned.
    Unaligned,
    /// An L2 entry pointing past the end of the file.
    PastEof,
    /// A lazy-refcounts image killed (SIGKILL) while dirty.
    LazyDirty,
    /// Refcount 0 on an L2 table.
    L2TableRefcountZero,
    /// The corrupt bit set, with a cleared COPIED flag (what a write that found it would have left).
    CorruptBit,
    /// L1 entry 0 pointing at the refcount block: an L2 table overlapping metadata (its "entries" are
    /// refcounts; the guest data of that table is lost).
    L2OverlapsRefcountBlock,
    /// Refcount table entry 0 pointing at the L1 table: a refcount block overlapping metadata.
    RefcountBlockOverlapsL1,
    /// The first snapshot's L1 table offset made unaligned: an inconsistent snapshot table (which
    /// qemu-img reports but does not repair).
    SnapshotL1Unaligned,
}

impl Damage {
    /// Whether the guest data survives the damage and its repair.
    fn data_survives(self) -> bool {
        self != Damage::L2OverlapsRefcountBlock
    }

    /// Whether our `-r all` must leave an image qemu-img finds clean (otherwise it must do as qemu-img).
    fn we_repair(self) -> bool {
        self != Damage::SnapshotL1Unaligned
    }
}

const DAMAGES: &[Damage] = &[
    Damage::Clean,
    Damage::LeakRefcount,
    Damage::LeakL2Dropped,
    Damage::RefcountZero,
    Damage::RefcountTwo,
    Damage::L2CopiedCleared,
    Damage::L1CopiedCleared,
    Damage::DoubleReference,
    Damage::Unaligned,
    Damage::PastEof,
    Damage::LazyDirty,
    Damage::L2TableRefcountZero,
    Damage::CorruptBit,
    Damage::L2OverlapsRefcountBlock,
    Damage::RefcountBlockOverlapsL1,
    Damage::SnapshotL1Unaligned,
];

/// The guest cluster the damages concern (written by the recipe).
const VICTIM: u64 = 1;

/// The pattern guest cluster 0 is rewritten with after the snapshot.
const AFTER_SNAPSHOT_PATTERN: u8 = 0x40;

/// Guest clusters and their patterns after the recipe.
fn written(v: &Variant) -> Vec<(u64, u8)> {
    let mut w = first_writes(v.cs);
    if v.snapshot {
        w[0].1 = AFTER_SNAPSHOT_PATTERN;
    }
    w
}

/// Guest clusters written by the recipe (before any snapshot), with their patterns.
fn first_writes(cs: u64) -> Vec<(u64, u8)> {
    let mut v: Vec<(u64, u8)> = (0..5).map(|i| (i, 0x10 + i as u8)).collect();
    v.push((6, 0x16));
    // Another L2 table where the image has more than one.
    v.push((MIB / cs + 1, 0x20));
    v
}

/// Makes the undamaged image `name` of the variant (with `lazy`: lazy refcounts, killed by SIGKILL
/// after the last write, so that it stays dirty).
fn make_image(w: &Work, v: &Variant, name: &str, lazy: bool) {
    let mut opts = v.opts.to_string();
    if lazy {
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str("lazy_refcounts=on");
    }
    if v.compressed {
        let mut src = vec![0u8; SIZE as usize];
        for (g, p) in first_writes(v.cs) {
            src[(g * v.cs) as usize..((g + 1) * v.cs) as usize].fill(p);
        }
        w.write_file("src.raw", &src);
        let mut args = vec!["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts.as_str()]);
        }
        args.extend(["src.raw", name]);
        w.qemu_img(&args);
        return;
    }
    if v.backing {
        if !w.p("backing.qcow2").exists() {
            common::images::create(w, "backing.qcow2", "", SIZE);
            w.qemu_io(
                &["-f", "qcow2"],
                "backing.qcow2",
                &[&format!("write -P {BACKING_PATTERN} 0 {SIZE}")],
            );
        }
        common::images::create_overlay(w, name, "backing.qcow2", "qcow2", &opts, Some(SIZE));
    } else {
        common::images::create(w, name, &opts, SIZE);
    }
    let mut cmds: Vec<String> = first_writes(v.cs)
        .iter()
        .map(|(g, p)| format!("write -P {p} {} {}", g * v.cs, v.cs))
        .collect();
    // A partial write into a cluster of the backing file's data (COW).
    if v.backing {
        cmds.push(format!("write -P 0x30 {} 512", 8 * v.cs));
    }
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    if lazy {
        let mut c = c;
        c.push("sigraise 9");
        let o = w.qemu_io_try(&["-f", "qcow2"], name, &c);
        assert_eq!(
            exit_code(&o),
            -1,
            "qemu-io was not killed: {}",
            o.describe()
        );
        let incompat = common::get_be64(&w.p(name), 72);
        assert!(
            incompat & 1 != 0,
            "the killed lazy-refcounts image is not dirty"
        );
    } else {
        w.qemu_io(&["-f", "qcow2"], name, &c);
    }
    if v.snapshot {
        w.qemu_img(&["snapshot", "-c", "s1", name]);
        w.qemu_io(
            &["-f", "qcow2"],
            name,
            &[&format!("write -P {AFTER_SNAPSHOT_PATTERN} 0 {}", v.cs)],
        );
    }
}

/// What a guest cluster must read after our repair: `Some(pattern)`, or `None` for zeros.
fn expected_after_repair(v: &Variant, d: Damage) -> Vec<(u64, u8)> {
    let mut exp = written(v);
    let cluster0 = exp[0].1;
    let unallocated = if v.backing { BACKING_PATTERN } else { 0 };
    for (g, p) in exp.iter_mut() {
        if *g == VICTIM
            && matches!(
                d,
                Damage::Unaligned | Damage::PastEof | Damage::LeakL2Dropped
            )
        {
            *p = unallocated;
        }
        if *g == 2 && d == Damage::DoubleReference {
            *p = cluster0;
        }
    }
    if v.backing {
        exp.push((9, BACKING_PATTERN));
    }
    exp
}

/// Applies the damage to `name`; `None` when it does not apply to the variant.
fn damage(w: &Work, d: Damage, name: &str) -> Option<String> {
    let path = w.p(name);
    let l = Layout::read(&path);
    let entry = |g: u64| common::get_be64(&path, l.l2_entry_offset(g));
    // Host cluster of a guest cluster: a compressed entry (bit 62) holds a byte offset in its low
    // 62 - (cluster_bits - 8) bits.
    let offset_bits = 62 - (l.cs.trailing_zeros() as u64 - 8);
    let host = |g: u64| {
        let e = entry(g);
        if e & (1 << 62) != 0 {
            e & ((1 << offset_bits) - 1)
        } else {
            e & common_check::OFFSET_MASK
        }
    };
    let file_len = std::fs::metadata(&path).expect("stat").len();
    Some(match d {
        Damage::Clean | Damage::LazyDirty => String::new(),
        Damage::LeakRefcount => {
            let cluster = file_len.div_ceil(l.cs);
            let per_block = l.cs * 8 / l.refcount_bits();
            if l.rt[(cluster / per_block) as usize] == 0 {
                return None;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len((cluster + 1) * l.cs))
                .expect("extend image");
            l.set_refcount(&path, cluster, 1);
            format!(
                "file extended to {} bytes, refcount of cluster {cluster} set to 1",
                (cluster + 1) * l.cs
            )
        }
        Damage::LeakL2Dropped => {
            let off = l.l2_entry_offset(VICTIM);
            common::patch(&path, off, &vec![0u8; l.l2_entry_bytes() as usize]);
            format!("L2 entry of guest cluster {VICTIM} at {off:#x} zeroed")
        }
        Damage::RefcountZero => {
            let c = host(0) / l.cs;
            l.set_refcount(&path, c, 0);
            format!("refcount of data cluster {c} (guest cluster 0) set to 0")
        }
        Damage::RefcountTwo => {
            if l.refcount_bits() < 2 {
                return None;
            }
            let c = host(0) / l.cs;
            l.set_refcount(&path, c, 2);
            format!("refcount of data cluster {c} (guest cluster 0) set to 2")
        }
        Damage::L2CopiedCleared => {
            let off = l.l2_entry_offset(0);
            common::put_be64(&path, off, entry(0) & !COPIED);
            format!("COPIED cleared in the L2 entry of guest cluster 0 at {off:#x}")
        }
        Damage::L1CopiedCleared => {
            let off = l.l1_entry_offset(0);
            common::put_be64(&path, off, l.l1[0] & !COPIED);
            format!("COPIED cleared in L1 entry 0 at {off:#x}")
        }
        Damage::DoubleReference => {
            // With 1-bit refcounts a cluster cannot be shared: qemu-img reports a refcount overflow and
            // cannot repair it; not a damage of that variant.
            if l.refcount_bits() < 2 {
                return None;
            }
            let off = l.l2_entry_offset(2);
            common::put_be64(&path, off, entry(0));
            format!(
                "L2 entry of guest cluster 2 at {off:#x} set to guest cluster 0's ({:#x})",
                entry(0)
            )
        }
        Damage::L2TableRefcountZero => {
            let c = (l.l1[0] & common_check::OFFSET_MASK) / l.cs;
            l.set_refcount(&path, c, 0);
            format!("refcount of L2 table cluster {c} set to 0")
        }
        Damage::CorruptBit => {
            let off = l.l2_entry_offset(0);
            common::put_be64(&path, off, entry(0) & !COPIED);
            let incompat = common::get_be64(&path, 72);
            common::put_be64(&path, 72, incompat | 2);
            format!(
                "corrupt bit set, COPIED cleared in the L2 entry of guest cluster 0 at {off:#x}"
            )
        }
        Damage::L2OverlapsRefcountBlock => {
            let off = l.l1_entry_offset(0);
            let e = COPIED | (l.rt[0] & common_check::OFFSET_MASK);
            common::put_be64(&path, off, e);
            format!("L1 entry 0 at {off:#x} set to {e:#x} (the refcount block)")
        }
        Damage::RefcountBlockOverlapsL1 => {
            let e = l.l1_offset;
            common::put_be64(&path, l.rt_offset, e);
            format!(
                "refcount table entry 0 at {:#x} set to {e:#x} (the L1 table)",
                l.rt_offset
            )
        }
        Damage::SnapshotL1Unaligned => {
            let nb = common::get_be32(&path, 60);
            if nb == 0 {
                return None;
            }
            let table = common::get_be64(&path, 64);
            let e = common::get_be64(&path, table) + 512;
            common::put_be64(&path, table, e);
            format!("L1 table offset of snapshot 1 at {table:#x} set to {e:#x} (unaligned)")
        }
        Damage::Unaligned => {
            // A 512-byte cluster offset cannot be unaligned (bits 0-8 are not part of it).
            if l.cs == 512 {
                return None;
            }
            let off = l.l2_entry_offset(VICTIM);
            let e = entry(VICTIM) + l.cs / 2;
            common::put_be64(&path, off, e);
            format!("L2 entry of guest cluster {VICTIM} at {off:#x} set to {e:#x} (unaligned)")
        }
        Damage::PastEof => {
            let off = l.l2_entry_offset(VICTIM);
            let past = (file_len.div_ceil(l.cs) + 1000) * l.cs;
            let old = entry(VICTIM);
            let e = if old & (1 << 62) != 0 {
                // Compressed: keep the flag and the sector count, move the data past the end.
                (old & !((1 << offset_bits) - 1)) | past
            } else {
                COPIED | past
            };
            common::put_be64(&path, off, e);
            format!("L2 entry of guest cluster {VICTIM} at {off:#x} set to {e:#x} (past the end, file {file_len} bytes)")
        }
    })
}

/// Reads every expected cluster of `img` with qemu-io's pattern check; the failures.
fn verify_data(w: &Work, img: &str, v: &Variant, exp: &[(u64, u8)]) -> Result<(), String> {
    let cmds: Vec<String> = exp
        .iter()
        .map(|(g, p)| format!("read -P {p} {} {}", g * v.cs, v.cs))
        .collect();
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let o = w.qemu_io_try(&["-r", "-f", "qcow2"], img, &c);
    let text = format!("{}{}", o.stdout_str(), o.stderr);
    if !o.success() || text.contains("fail") || text.contains("error") {
        return Err(format!("data after repair: {}", o.describe()));
    }
    Ok(())
}

fn same_counts(q: &Counts, o: &Counts) -> bool {
    q.corruptions == o.corruptions
        && q.leaks == o.leaks
        && q.check_errors == o.check_errors
        && q.exit == o.exit
}

/// Runs one case; its discrepancies are appended to `problems`. Returns false when the case does not
/// apply.
fn run_case(w: &Work, v: &Variant, d: Damage, problems: &mut Vec<String>) -> bool {
    for f in [
        "d.qcow2", "q.qcow2", "o.qcow2", "qr.qcow2", "or.qcow2", "ql.qcow2", "ol.qcow2",
    ] {
        let _ = std::fs::remove_file(w.p(f));
    }
    make_image(w, v, "d.qcow2", d == Damage::LazyDirty);
    let Some(what) = damage(w, d, "d.qcow2") else {
        return false;
    };
    let case = format!("{d:?} on {} ({what})", v.name);
    let mut report = |msg: String| {
        problems.push(format!(
            "{case}\n  recipe: qemu-img create -f qcow2 -o '{}'{} {SIZE}; qemu-io writes {:?}{}; damage: {what}\n  {msg}",
            v.opts,
            if v.backing { " -b backing.qcow2 (all 0x77)" } else { "" },
            written(v).iter().map(|(g, p)| format!("cluster {g} = {p:#x}")).collect::<Vec<_>>(),
            if d == Damage::LazyDirty { ", lazy_refcounts=on, then SIGKILL (sigraise 9)" } else { "" },
        ))
    };

    // 1. Plain check: same counts and exit code.
    for f in [
        "q.qcow2", "o.qcow2", "qr.qcow2", "or.qcow2", "ql.qcow2", "ol.qcow2",
    ] {
        copy(w, "d.qcow2", f);
    }
    let qo = qemu_check(w, "q.qcow2", &[]);
    let oo = our_check(w, "o.qcow2", &[]);
    let (q, o) = (counts(&qo), counts(&oo));
    println!(
        "{:<40} qemu-img: {q}\n{:<40} ours:     {o}",
        case_short(v, d),
        ""
    );
    if d == Damage::Clean {
        assert_eq!(q.exit, 0, "the clean image is not clean: {}", qo.describe());
    } else {
        assert!(
            q.corruptions + q.leaks > 0,
            "{case}: qemu-img finds nothing: the damage recipe is wrong: {}",
            qo.describe()
        );
    }
    if !same_counts(&q, &o) {
        report(format!(
            "check: qemu-img {q}, ours {o}\n  qemu-img stderr:\n{}\n  ours stderr:\n{}  ours stdout:\n{}",
            indent(&qo.stderr),
            indent(&oo.stderr),
            indent(&oo.stdout_str())
        ));
    }

    // 2. -r all: ours leaves an image qemu-img finds clean, with the right data.
    let qr = qemu_check(w, "qr.qcow2", &["-r", "all"]);
    let or = our_check(w, "or.qcow2", &["-r", "all"]);
    let (qrc, orc) = (counts(&qr), counts(&or));
    println!(
        "{:<40} -r all: qemu-img {qrc}\n{:<40} -r all: ours     {orc}",
        "", ""
    );
    let after = w.qemu_img_try(&["check", "or.qcow2"], common::ORACLE_TIMEOUT);
    if !d.we_repair() {
        if !same_counts(&qrc, &orc) {
            report(format!(
                "-r all (which qemu-img cannot repair): qemu-img {qrc}, ours {orc}"
            ));
        }
    } else if exit_code(&after) != 0 {
        report(format!(
            "after our -r all, qemu-img check is not clean:\n{}\n  ours -r all said:\n{}{}",
            after.describe(),
            indent(&or.stderr),
            indent(&or.stdout_str())
        ));
    }
    let qemu_repairs =
        exit_code(&w.qemu_img_try(&["check", "qr.qcow2"], common::ORACLE_TIMEOUT)) == 0;
    if qemu_repairs {
        if qrc.exit != orc.exit {
            report(format!("-r all exit code: qemu-img {qrc}, ours {orc}"));
        }
        // The header's incompatible features (dirty and corrupt bits) as qemu-img leaves them.
        let (qf, of) = (
            common::get_be64(&w.p("qr.qcow2"), 72),
            common::get_be64(&w.p("or.qcow2"), 72),
        );
        if qf != of {
            report(format!(
                "incompatible features after -r all: qemu-img {qf:#x}, ours {of:#x}"
            ));
        }
        let cmp = w.qemu_img_try(&["compare", "qr.qcow2", "or.qcow2"], common::ORACLE_TIMEOUT);
        if !cmp.success() {
            report(format!(
                "contents after -r all differ from qemu-img's repair: {}",
                cmp.describe()
            ));
        }
    }
    if d.data_survives() && d.we_repair() && (d != Damage::DoubleReference || qemu_repairs) {
        if let Err(e) = verify_data(w, "or.qcow2", v, &expected_after_repair(v, d)) {
            report(e);
        }
    }

    // 3. -r leaks: same remaining counts and exit code.
    let ql = counts(&qemu_check(w, "ql.qcow2", &["-r", "leaks"]));
    let ol = counts(&our_check(w, "ol.qcow2", &["-r", "leaks"]));
    if !same_counts(&ql, &ol) || ql.leaks_fixed != ol.leaks_fixed {
        report(format!("-r leaks: qemu-img {ql}, ours {ol}"));
    }
    true
}

fn case_short(v: &Variant, d: Damage) -> String {
    format!("{d:?}/{}", v.name)
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn run_variant(v: &Variant) {
    run_damages(v, DAMAGES, &[]);
}

/// Runs the damages of `damages` except `skip` on the variant.
fn run_damages(v: &Variant, damages: &[Damage], skip: &[Damage]) {
    let w = Work::new();
    let mut problems = Vec::new();
    let mut cases = 0;
    for d in damages.iter().filter(|d| !skip.contains(d)) {
        // A dirty image is made by killing qemu-io after the last write, which the snapshot variant
        // does not end with.
        if v.snapshot && *d == Damage::LazyDirty {
            continue;
        }
        // Compressed entries have no COPIED flag and byte offsets (never unaligned); two entries of
        // one packed host cluster may reference it as often as before; no image is dirty.
        if v.compressed
            && matches!(
                d,
                Damage::L2CopiedCleared
                    | Damage::CorruptBit
                    | Damage::Unaligned
                    | Damage::DoubleReference
                    | Damage::LazyDirty
            )
        {
            continue;
        }
        // The overlay variant is for the damages of a guest cluster's mapping.
        if v.backing
            && !matches!(
                d,
                Damage::Clean
                    | Damage::Unaligned
                    | Damage::PastEof
                    | Damage::LeakL2Dropped
                    | Damage::LazyDirty
            )
        {
            continue;
        }
        if run_case(&w, v, *d, &mut problems) {
            cases += 1;
        }
    }
    println!(
        "check_damage {}: {cases} damages checked, {} discrepancies",
        v.name,
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} discrepancies:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

#[test]
fn damage_64k() {
    run_variant(&VARIANTS[0]);
}

#[test]
fn damage_512() {
    run_variant(&VARIANTS[1]);
}

#[test]
fn damage_extended_l2() {
    run_variant(&VARIANTS[2]);
}

#[test]
fn damage_refcount_bits_1() {
    run_damages(&VARIANTS[3], DAMAGES, RC1_OVERLAPS);
}

/// The L2 table on the refcount block with 1-bit refcounts (a cluster counted twice overflows its
/// refcount). Both tools' `-r leaks` now have the refcount block write refused by the overlap check;
/// qemu-img's re-check then reads its refcount cache, which kept the refused update, and reports 0
/// leaks where the file still holds 8; ours re-reads the file and reports the 8. A deliberate
/// difference (we report what is on disk), so this case stays out of the matrix.
const RC1_OVERLAPS: &[Damage] = &[Damage::L2OverlapsRefcountBlock];

#[test]
#[ignore = "qemu-img re-checks from its cache after a refused write (see the comment above)"]
fn damage_refcount_bits_1_overlaps() {
    run_damages(&VARIANTS[3], RC1_OVERLAPS, &[]);
}

#[test]
fn damage_overlay() {
    run_variant(&VARIANTS[4]);
}

#[test]
fn damage_snapshot() {
    run_variant(&VARIANTS[5]);
}

#[test]
fn damage_compressed() {
    run_variant(&VARIANTS[6]);
}
