//! `qcow2 check` against `qemu-img check`, byte for byte: standard output (human and JSON), the lines on
//! standard error (with `qemu-img: ` read as `qcow2: `) and the exit code, on images made by qemu-img and
//! qemu-io (plain, empty, compressed, extended L2, internal snapshots, 512-byte clusters with 1-bit
//! refcounts, version 2, an overlay), on small damages (refcount 2, a dropped L2 entry, COPIED cleared,
//! the corrupt bit, a doubly referenced cluster, an unaligned entry; refcount 0 and a dirty lazy-refcounts
//! image, which need a rebuild), to check the problem lines and the repair banner, and on the
//! command-line errors.

mod common;
mod common_check;

use common::images::{self, KIB, MIB};
use common::Work;
use common_check::{copy, exit_code, Layout, COPIED};

/// One command line of `check` (without the image name) run by both tools on a fresh copy of `image`
/// named `x.qcow2` (so that the `filename` in the output is the same); the outputs must be identical.
fn compare(w: &Work, image: &str, args: &[&str]) -> Result<(), String> {
    let mut full: Vec<&str> = vec!["check"];
    full.extend_from_slice(args);
    full.push("x.qcow2");
    copy(w, image, "x.qcow2");
    let q = w.qemu_img_try(&full, common::ORACLE_TIMEOUT);
    copy(w, image, "x.qcow2");
    let o = w.qcow2_try(&full, &[], common::ORACLE_TIMEOUT);
    let mut diffs = Vec::new();
    if exit_code(&q) != exit_code(&o) {
        diffs.push(format!(
            "exit code: qemu-img {} ours {}",
            exit_code(&q),
            exit_code(&o)
        ));
    }
    if q.stdout != o.stdout {
        diffs.push(format!(
            "stdout differs:\n--- qemu-img:\n{}--- ours:\n{}",
            q.stdout_str(),
            o.stdout_str()
        ));
    }
    let q_err = q.stderr.replace("qemu-img: ", "qcow2: ");
    // qemu-img adds a hint line to usage errors; ours are one line.
    let q_err: String = q_err
        .lines()
        .filter(|l| !l.starts_with("Try 'qemu-img"))
        .map(|l| format!("{l}\n"))
        .collect();
    if q_err != o.stderr {
        diffs.push(format!(
            "stderr differs:\n--- qemu-img:\n{q_err}--- ours:\n{}",
            o.stderr
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{image}: `check {}`:\n{}",
            args.join(" "),
            diffs.join("\n")
        ))
    }
}

/// The check command lines compared on every image.
const VARIANTS: &[&[&str]] = &[
    &[],
    &["--output=json"],
    &["--output", "human"],
    &["-q"],
    &["-r", "leaks"],
    &["-r", "all", "--output=json"],
    &["-f", "qcow2", "-U"],
];

fn compare_all(w: &Work, image: &str, failures: &mut Vec<String>, compared: &mut usize) {
    for v in VARIANTS {
        *compared += 1;
        if let Err(e) = compare(w, image, v) {
            failures.push(e);
        }
    }
}

/// The clean images: each made with qemu-img / qemu-io.
fn make_clean_images(w: &Work) -> Vec<String> {
    let mut names = Vec::new();

    images::create(w, "plain.qcow2", "", 10 * MIB);
    w.qemu_io(
        &["-f", "qcow2"],
        "plain.qcow2",
        &[
            "write -P 1 0 200k",
            "write -P 2 1M 64k",
            "write -z 2M 128k",
            "write -P 3 5M 4k",
            "discard 1M 64k",
        ],
    );
    names.push("plain.qcow2".to_string());

    images::create(w, "empty.qcow2", "", MIB);
    names.push("empty.qcow2".to_string());

    // Compressed clusters (packed several to a host cluster) next to uncompressed ones.
    w.write_file("src.raw", &images::compressed_source(64 * KIB));
    w.qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "comp.qcow2",
    ]);
    w.qemu_io(&["-f", "qcow2"], "comp.qcow2", &["write -P 9 64k 4k"]);
    names.push("comp.qcow2".to_string());

    images::create(w, "ext.qcow2", "extended_l2=on", 8 * MIB);
    let cmds = images::extended_l2_cmds();
    images::io(w, "ext.qcow2", &cmds);
    names.push("ext.qcow2".to_string());

    // Internal snapshots: shared clusters (refcount 2, COPIED clear), then COW after the snapshot.
    images::create(w, "snap.qcow2", "", 8 * MIB);
    w.qemu_io(
        &["-f", "qcow2"],
        "snap.qcow2",
        &["write -P 1 0 256k", "write -P 2 3M 64k"],
    );
    w.qemu_img(&["snapshot", "-c", "s1", "snap.qcow2"]);
    w.qemu_io(
        &["-f", "qcow2"],
        "snap.qcow2",
        &["write -P 3 64k 64k", "write -P 4 6M 8k"],
    );
    w.qemu_img(&["snapshot", "-c", "s2", "snap.qcow2"]);
    w.qemu_io(&["-f", "qcow2"], "snap.qcow2", &["write -P 5 0 4k"]);
    names.push("snap.qcow2".to_string());

    images::create(
        w,
        "small.qcow2",
        "cluster_size=512,refcount_bits=1",
        2 * MIB,
    );
    w.qemu_io(
        &["-f", "qcow2"],
        "small.qcow2",
        &["write -P 1 0 40k", "write -P 2 1M 3k", "write -z 100k 2k"],
    );
    names.push("small.qcow2".to_string());

    images::create(w, "v2.qcow2", "compat=0.10", 4 * MIB);
    w.qemu_io(
        &["-f", "qcow2"],
        "v2.qcow2",
        &["write -P 1 0 100k", "write -P 2 2M 64k"],
    );
    names.push("v2.qcow2".to_string());

    images::create(w, "base.qcow2", "", 4 * MIB);
    w.qemu_io(&["-f", "qcow2"], "base.qcow2", &["write -P 7 0 4M"]);
    images::create_overlay(w, "top.qcow2", "base.qcow2", "qcow2", "", None);
    w.qemu_io(
        &["-f", "qcow2"],
        "top.qcow2",
        &["write -P 8 4k 4k", "write -P 9 1M 128k"],
    );
    names.push("top.qcow2".to_string());

    names
}

#[test]
fn check_clean_images_match_qemu_img() {
    let w = Work::new();
    let mut failures = Vec::new();
    let mut compared = 0;
    for image in make_clean_images(&w) {
        compare_all(&w, &image, &mut failures, &mut compared);
    }
    println!(
        "check_cli: {compared} command lines compared on clean images, {} differ",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn check_damaged_images_match_qemu_img() {
    let w = Work::new();
    images::create(&w, "a.qcow2", "", 10 * MIB);
    w.qemu_io(
        &["-f", "qcow2"],
        "a.qcow2",
        &["write -P 1 0 200k", "write -P 2 1M 64k"],
    );
    let l = Layout::read(&w.p("a.qcow2"));
    let data = |guest: u64| {
        common::get_be64(&w.p("a.qcow2"), l.l2_entry_offset(guest)) & common_check::OFFSET_MASK
    };

    // A refcount of 2 on a cluster referenced once: a leak and a COPIED corruption.
    copy(&w, "a.qcow2", "rc2.qcow2");
    l.set_refcount(&w.p("rc2.qcow2"), data(16) / l.cs, 2);
    // An L2 entry dropped: its cluster leaks.
    copy(&w, "a.qcow2", "leak.qcow2");
    common::put_be64(&w.p("leak.qcow2"), l.l2_entry_offset(2), 0);
    // COPIED cleared on an L2 entry.
    copy(&w, "a.qcow2", "copied.qcow2");
    let e = common::get_be64(&w.p("a.qcow2"), l.l2_entry_offset(0));
    common::put_be64(&w.p("copied.qcow2"), l.l2_entry_offset(0), e & !COPIED);

    // The corrupt bit set (with a cleared COPIED flag).
    copy(&w, "copied.qcow2", "corrupt.qcow2");
    let incompat = common::get_be64(&w.p("corrupt.qcow2"), 72);
    common::put_be64(&w.p("corrupt.qcow2"), 72, incompat | 2);
    // Two L2 entries pointing at one cluster.
    copy(&w, "a.qcow2", "double.qcow2");
    common::put_be64(&w.p("double.qcow2"), l.l2_entry_offset(2), e);
    // An unaligned L2 entry (qemu-img cannot repair it; only the reports are compared).
    copy(&w, "a.qcow2", "unaligned.qcow2");
    common::put_be64(
        &w.p("unaligned.qcow2"),
        l.l2_entry_offset(1),
        (data(1) + l.cs / 2) | COPIED,
    );

    let mut failures = Vec::new();
    let mut compared = 0;
    for image in ["unaligned.qcow2"] {
        for v in [&[][..], &["--output=json"], &["-q"]] {
            compared += 1;
            if let Err(e) = compare(&w, image, v) {
                failures.push(e);
            }
        }
    }
    for image in [
        "rc2.qcow2",
        "leak.qcow2",
        "copied.qcow2",
        "corrupt.qcow2",
        "double.qcow2",
    ] {
        compare_all(&w, image, &mut failures, &mut compared);
        for v in [&["-r", "all"][..], &["-r", "leaks", "--output=json"]] {
            compared += 1;
            if let Err(e) = compare(&w, image, v) {
                failures.push(e);
            }
        }
    }
    println!(
        "check_cli: {compared} command lines compared on damaged images, {} differ",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn check_errors_match_qemu_img() {
    let w = Work::new();
    images::create(&w, "a.qcow2", "", MIB);
    w.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let mut failures = Vec::new();
    // A raw image has nothing to check: exit code 63.
    for args in [
        &["check", "r.raw"][..],
        &["check", "--output=json", "r.raw"],
    ] {
        let q = w.qemu_img_try(args, common::ORACLE_TIMEOUT);
        let o = w.qcow2_try(args, &[], common::ORACLE_TIMEOUT);
        assert_eq!(exit_code(&q), 63, "{}", q.describe());
        assert_eq!(exit_code(&o), 63, "{}", o.describe());
        assert_eq!(
            o.stderr,
            "qcow2: This image format does not support checks\n",
            "{}",
            o.describe()
        );
        assert!(o.stdout.is_empty(), "{}", o.describe());
    }
    // `-f raw` on a qcow2 image too.
    let o = w.qcow2_try(
        &["check", "-f", "raw", "a.qcow2"],
        &[],
        common::ORACLE_TIMEOUT,
    );
    assert_eq!(exit_code(&o), 63, "{}", o.describe());
    // Usage errors: same message (first line), exit code 1.
    for args in [
        &["check", "-r", "foo", "a.qcow2"][..],
        &["check", "--output=xml", "a.qcow2"],
        &["check", "-f", "foo", "a.qcow2"],
    ] {
        let q = w.qemu_img_try(args, common::ORACLE_TIMEOUT);
        let o = w.qcow2_try(args, &[], common::ORACLE_TIMEOUT);
        let q_first = q
            .stderr
            .lines()
            .next()
            .unwrap_or_default()
            .replace("qemu-img: ", "qcow2: ");
        if exit_code(&q) != exit_code(&o) || o.stderr.trim_end() != q_first {
            failures.push(format!("{}\n{}", q.describe(), o.describe()));
        }
    }
    // `-f qcow2` on a raw image: it cannot be opened as qcow2.
    let args = ["check", "-f", "qcow2", "r.raw"];
    let q = w.qemu_img_try(&args, common::ORACLE_TIMEOUT);
    let o = w.qcow2_try(&args, &[], common::ORACLE_TIMEOUT);
    assert_eq!(exit_code(&q), 1, "{}", q.describe());
    assert_eq!(
        o.stderr,
        q.stderr.replace("qemu-img: ", "qcow2: "),
        "{}",
        o.describe()
    );
    assert_eq!(exit_code(&o), 1, "{}", o.describe());
    // A missing file: exit code 1, "Could not open".
    let o = w.qcow2_try(&["check", "nonexistent.qcow2"], &[], common::ORACLE_TIMEOUT);
    assert_eq!(exit_code(&o), 1, "{}", o.describe());
    assert!(
        o.stderr
            .starts_with("qcow2: Could not open 'nonexistent.qcow2': "),
        "{}",
        o.describe()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A refcount of 0 on a used cluster, and a lazy-refcounts image killed while dirty: `-r leaks` cannot
/// complete ("ERROR need to rebuild refcount
/// structures", `Check failed: Input/output error`), `-r all` rebuilds the refcount structure.
#[test]
fn check_rebuild_matches_qemu_img() {
    let w = Work::new();
    images::create(&w, "a.qcow2", "", 10 * MIB);
    w.qemu_io(
        &["-f", "qcow2"],
        "a.qcow2",
        &["write -P 1 0 200k", "write -P 2 1M 64k"],
    );
    let l = Layout::read(&w.p("a.qcow2"));
    let host = common::get_be64(&w.p("a.qcow2"), l.l2_entry_offset(1)) & common_check::OFFSET_MASK;
    copy(&w, "a.qcow2", "rc0.qcow2");
    l.set_refcount(&w.p("rc0.qcow2"), host / l.cs, 0);
    // And a lazy-refcounts image killed while dirty.
    images::create(&w, "lazy.qcow2", "lazy_refcounts=on", 10 * MIB);
    let o = w.qemu_io_try(
        &["-f", "qcow2"],
        "lazy.qcow2",
        &["write -P 1 0 200k", "write -P 2 1M 64k", "sigraise 9"],
    );
    assert!(
        o.status.is_some_and(|s| s.code().is_none()),
        "{}",
        o.describe()
    );
    let mut failures = Vec::new();
    let mut compared = 0;
    for image in ["rc0.qcow2", "lazy.qcow2"] {
        compare_all(&w, image, &mut failures, &mut compared);
        for v in [&["-r", "all"][..], &["-r", "leaks", "--output=json"]] {
            compared += 1;
            if let Err(e) = compare(&w, image, v) {
                failures.push(e);
            }
        }
    }
    println!(
        "check_cli: {compared} command lines compared on a rebuild, {} differ",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
