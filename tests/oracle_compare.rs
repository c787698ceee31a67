//! `qcow2 compare` against `qemu-img compare`: same exit code (0 identical, 1 different, 2 open error)
//! and same standard output.

mod common;

use common::{Work, ORACLE_TIMEOUT};

fn compare_both(w: &Work, args: &[&str]) {
    let mut full = vec!["compare"];
    full.extend_from_slice(args);
    let q = w.qemu_img_try(&full, ORACLE_TIMEOUT);
    let o = w.qcow2_try(&full, &[], ORACLE_TIMEOUT);
    let qc = q.status.and_then(|s| s.code());
    let oc = o.status.and_then(|s| s.code());
    assert_eq!(
        qc,
        oc,
        "exit codes differ:\nqemu-img: {}\nours: {}",
        q.describe(),
        o.describe()
    );
    assert_eq!(
        q.stdout_str(),
        o.stdout_str(),
        "stdout differs:\nqemu-img: {}\nours: {}",
        q.describe(),
        o.describe()
    );
}

/// A qcow2 image with data, zeros and a backing file, plus its raw conversion.
fn setup(w: &Work) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    w.qemu_io(&["-f", "qcow2"], "base.qcow2", &["write -P 0x31 0 2M"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img.qcow2",
    ]);
    w.qemu_io(
        &["-f", "qcow2"],
        "img.qcow2",
        &["write -P 0x32 64k 4k", "write -z 1M 64k"],
    );
    w.qemu_img(&["convert", "-O", "raw", "img.qcow2", "img.raw"]);
}

#[test]
fn compare_identical() {
    let w = Work::new();
    setup(&w);
    compare_both(&w, &["img.qcow2", "img.raw"]);
    compare_both(&w, &["-f", "qcow2", "-F", "raw", "img.qcow2", "img.raw"]);
}

#[test]
fn compare_one_byte_differs() {
    let w = Work::new();
    setup(&w);
    common::patch(&w.p("img.raw"), 1_500_000, &[0xee]);
    compare_both(&w, &["img.qcow2", "img.raw"]);
}

#[test]
fn compare_data_vs_zero_cluster() {
    let w = Work::new();
    setup(&w);
    // The zero cluster at 1 MiB in the qcow2 vs non-zero data in the raw file.
    common::patch(&w.p("img.raw"), 1024 * 1024 + 4097, &[1]);
    compare_both(&w, &["img.raw", "img.qcow2"]);
}

#[test]
fn compare_different_sizes_zero_tail() {
    let w = Work::new();
    setup(&w);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.p("img.raw"))
        .expect("open");
    f.set_len(6 * 1024 * 1024).expect("extend");
    drop(f);
    compare_both(&w, &["img.qcow2", "img.raw"]);
    compare_both(&w, &["img.raw", "img.qcow2"]);
}

#[test]
fn compare_different_sizes_nonzero_tail() {
    let w = Work::new();
    setup(&w);
    common::patch(&w.p("img.raw"), 5 * 1024 * 1024, b"tail");
    compare_both(&w, &["img.qcow2", "img.raw"]);
}

#[test]
fn compare_missing_file() {
    let w = Work::new();
    setup(&w);
    compare_both(&w, &["img.qcow2", "missing.raw"]);
}

#[test]
fn compare_compressed_vs_original() {
    let w = Work::new();
    setup(&w);
    w.qemu_img(&["convert", "-c", "-O", "qcow2", "img.qcow2", "c.qcow2"]);
    compare_both(&w, &["c.qcow2", "img.qcow2"]);
}
