//! The `qcow2` binary against qemu-img on small images made at test time.
//!
//! Each test is skipped (passes with a note on stderr) when qemu-img/qemu-io are not installed.

use std::path::{Path, PathBuf};
use std::process::Output;

use qcow2_testkit::{
    create_qcow2, qemu_img, qemu_io, run, skip_without_qemu, stdout_text as text, temp_dir,
};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qcow2"))
}

/// Runs qemu-img and qcow2 with the same arguments; returns (qemu, ours).
fn both(dir: &Path, args: &[&str]) -> (Output, Output) {
    (run(dir, "qemu-img", args), run(dir, bin(), args))
}

/// A small backing chain with data, zero clusters and discards, and a raw base of 1000 bytes.
fn make_images(dir: &Path) {
    std::fs::write(dir.join("base.raw"), vec![0xabu8; 1000]).unwrap_or_else(|e| panic!("{e}"));
    create_qcow2(dir, "mid.qcow2", "4M", "", Some(("base.raw", "raw")));
    qemu_io(
        dir,
        &[],
        "mid.qcow2",
        &[
            "write -P 0x11 512 70k",
            "write -z 1M 128k",
            "write -P 5 2M 1M",
        ],
    );
    create_qcow2(dir, "top.qcow2", "6M", "", Some(("mid.qcow2", "qcow2")));
    qemu_io(
        dir,
        &[],
        "top.qcow2",
        &[
            "write -P 0x22 32k 64k",
            "discard 2M 64k",
            "write -P 3 5M 4k",
        ],
    );
    create_qcow2(dir, "v2.qcow2", "1M", "compat=0.10", None);
}

#[test]
fn info_and_map_match_qemu_img() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    make_images(d);
    for img in ["top.qcow2", "mid.qcow2", "v2.qcow2", "base.raw"] {
        for args in [
            vec!["info", "--output=json", img],
            vec!["info", img],
            vec!["info", "--output", "json", "--backing-chain", img],
            vec!["info", "--backing-chain", img],
            vec!["map", "--output=json", img],
            vec!["map", img],
        ] {
            let (q, o) = both(d, &args);
            assert_eq!(
                q.status.code(),
                o.status.code(),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(text(&q), text(&o), "{args:?}");
        }
    }
}

#[test]
fn convert_is_byte_identical_and_compare_agrees() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    make_images(d);
    qemu_img(d, &["convert", "-O", "raw", "top.qcow2", "q.raw"]);
    let o = run(d, bin(), &["convert", "-O", "raw", "top.qcow2", "o.raw"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q = std::fs::read(d.join("q.raw")).unwrap_or_default();
    let ours = std::fs::read(d.join("o.raw")).unwrap_or_default();
    assert_eq!(q.len(), 6 << 20);
    assert!(q == ours, "convert output differs");

    let mut changed = ours.clone();
    changed[5000] ^= 1;
    std::fs::write(d.join("c.raw"), &changed).unwrap_or_else(|e| panic!("{e}"));
    let mut longer = ours;
    longer.extend(vec![0u8; 1 << 20]);
    std::fs::write(d.join("l.raw"), &longer).unwrap_or_else(|e| panic!("{e}"));
    for args in [
        vec!["compare", "top.qcow2", "q.raw"],
        vec!["compare", "top.qcow2", "c.raw"],
        vec!["compare", "-s", "top.qcow2", "q.raw"],
        vec!["compare", "top.qcow2", "l.raw"],
        vec!["compare", "-s", "top.qcow2", "l.raw"],
        vec![
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "mid.qcow2",
            "top.qcow2",
        ],
    ] {
        let (q, o) = both(d, &args);
        assert_eq!(q.status.code(), o.status.code(), "{args:?}");
        assert_eq!(text(&q), text(&o), "{args:?}");
    }
    let o = run(d, bin(), &["compare", "top.qcow2", "missing.raw"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn errors_are_one_line_without_panic() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    make_images(d);
    std::fs::write(d.join("empty.qcow2"), b"").unwrap_or_else(|e| panic!("{e}"));
    let mut bad = std::fs::read(d.join("v2.qcow2")).unwrap_or_default();
    bad[20..24].copy_from_slice(&40u32.to_be_bytes()); // cluster_bits = 40
    std::fs::write(d.join("bad.qcow2"), &bad).unwrap_or_else(|e| panic!("{e}"));
    for args in [
        vec!["info", "missing.qcow2"],
        vec!["info", "-f", "qcow2", "empty.qcow2"],
        vec!["map", "bad.qcow2"],
        vec!["convert", "-O", "raw", "bad.qcow2", "x.raw"],
        vec!["info", "--output=xml", "top.qcow2"],
        vec!["info"],
        vec!["map", "--nonsense", "top.qcow2"],
        vec!["bench", "-s", "4x", "top.qcow2"],
        vec!["convert", "-O", "raw", "top.qcow2", "top.qcow2"],
    ] {
        let o = run(d, bin(), &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("qcow2: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // The input was not touched by the refused convert.
    let (q, o) = both(d, &["info", "--output=json", "top.qcow2"]);
    assert_eq!(text(&q), text(&o));
}

#[test]
fn bench_prints_qemu_lines() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    make_images(d);
    for aio in ["threads", "io_uring"] {
        let o = run(
            d,
            bin(),
            &[
                "bench",
                "-c",
                "1000",
                "-d",
                "4",
                "-s",
                "8k",
                "-i",
                aio,
                "top.qcow2",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = text(&o);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0], "Sending 1000 read requests, 8192 bytes each, 4 in parallel (starting at offset 0, step size 8192)");
        assert!(
            lines[1].starts_with("Run completed in ") && lines[1].ends_with(" seconds."),
            "{out}"
        );
    }
}

#[test]
fn info_does_not_open_the_data_file() {
    skip_without_qemu!();
    let dir = temp_dir();
    let d = dir.path();
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap_or_else(|e| panic!("{e}"));
    create_qcow2(
        &sub,
        "df.qcow2",
        "1M",
        "data_file=data.raw,data_file_raw=on",
        None,
    );
    // From the parent directory the relative data file name does not resolve; qemu-img info still works.
    for args in [
        vec!["info", "sub/df.qcow2"],
        vec!["info", "--output=json", "--backing-chain", "sub/df.qcow2"],
    ] {
        let (q, o) = both(d, &args);
        assert_eq!(q.status.code(), Some(0), "{args:?}");
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(text(&q), text(&o), "{args:?}");
    }
    // Reading the data needs the data file: both refuse.
    let (q, o) = both(d, &["map", "sub/df.qcow2"]);
    assert_eq!(q.status.code(), Some(1));
    assert_eq!(o.status.code(), Some(1));
}
