//! Human-readable output of `info` (also `--backing-chain`) and `map` compared line by line with
//! qemu-img's, on a few representative images. (The JSON forms are covered by `oracle_read`.)

mod common;

use common::Work;

fn check_human(w: &Work, image: &str) {
    let mut errs = Vec::new();
    for args in [
        &["info"][..],
        &["info", "--backing-chain"][..],
        &["map"][..],
    ] {
        if let Err(e) = common::compare_human_output(w, args, image) {
            errs.push(e);
        }
    }
    assert!(
        errs.is_empty(),
        "human output mismatch for {image}:\n{}",
        errs.join("\n")
    );
}

fn create(w: &Work, args: &[&str]) {
    let mut full = vec!["create", "-q", "-f", "qcow2"];
    full.extend_from_slice(args);
    w.qemu_img(&full);
}

#[test]
fn human_plain_image() {
    let w = Work::new();
    create(&w, &["-o", "cluster_size=4k", "img.qcow2", "4M"]);
    w.qemu_io(
        &["-f", "qcow2"],
        "img.qcow2",
        &["write -P 1 0 64k", "write -z 1M 64k", "write -P 2 2M 4k"],
    );
    check_human(&w, "img.qcow2");
}

#[test]
fn human_backing_chain() {
    let w = Work::new();
    w.mkdir("sub");
    w.write_file("sub/base.raw", &vec![7u8; 1_000_123]);
    create(&w, &["-b", "base.raw", "-F", "raw", "sub/mid.qcow2", "2M"]);
    w.qemu_io(&["-f", "qcow2"], "sub/mid.qcow2", &["write -P 3 64k 64k"]);
    create(&w, &["-b", "sub/mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    w.qemu_io(&["-f", "qcow2"], "top.qcow2", &["write -P 4 0 4k"]);
    check_human(&w, "top.qcow2");
}

#[test]
fn human_data_file_v2_snapshot_compressed() {
    let w = Work::new();
    create(
        &w,
        &[
            "-o",
            "data_file=img.data,data_file_raw=on",
            "df.qcow2",
            "4M",
        ],
    );
    w.qemu_io(&["-f", "qcow2"], "df.qcow2", &["write -P 5 0 64k"]);
    check_human(&w, "df.qcow2");

    create(&w, &["-o", "compat=0.10", "v2.qcow2", "4M"]);
    w.qemu_io(&["-f", "qcow2"], "v2.qcow2", &["write -P 6 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "snap one", "v2.qcow2"]);
    check_human(&w, "v2.qcow2");

    w.write_file("src.raw", &b"text ".repeat(200_000));
    w.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "src.raw",
        "c.qcow2",
    ]);
    check_human(&w, "c.qcow2");
}

#[test]
fn human_dirty_extended_l2() {
    let w = Work::new();
    create(
        &w,
        &["-o", "lazy_refcounts=on,extended_l2=on", "img.qcow2", "4M"],
    );
    let o = w.qemu_io_try(
        &["-f", "qcow2"],
        "img.qcow2",
        &["write -P 8 0 2k", "write -z 64k 4k", "abort"],
    );
    assert!(!o.success());
    check_human(&w, "img.qcow2");
}

#[test]
fn human_odd_names_and_sizes() {
    let w = Work::new();
    create(&w, &["base file, é.qcow2", "1000"]);
    create(
        &w,
        &[
            "-b",
            "base file, é.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=512",
            "top, x.qcow2",
            "3G",
        ],
    );
    w.qemu_io(&["-f", "qcow2"], "top, x.qcow2", &["write -P 9 1G 1k"]);
    check_human(&w, "top, x.qcow2");
}
