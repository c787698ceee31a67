//! `qcow2 convert -O qcow2` against qemu-img: sources made by qemu-img and qemu-io (data, holes, zero
//! clusters, discarded ranges, a backing chain), converted by both tools; the target must have the
//! source's content (`qemu-img compare`), be clean (`qemu-img check`), and have the same allocation as
//! qemu-img's own conversion (zero and unallocated ranges stay unallocated: `qemu-img map` data extents).

mod common;

use common::{parse_json, Work};

/// The `[start, end)` ranges `qemu-img map --output=json` reports as data.
fn data_ranges(w: &Work, image: &str) -> Vec<(u64, u64)> {
    let out = w.qemu_img(&["map", "--output=json", image]);
    let v = parse_json(&out);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().into_iter().flatten() {
        if e["data"].as_bool() != Some(true) {
            continue;
        }
        let (s, l) = (
            e["start"].as_u64().unwrap_or(0),
            e["length"].as_u64().unwrap_or(0),
        );
        match ranges.last_mut() {
            Some(last) if last.1 == s => last.1 = s + l,
            _ => ranges.push((s, s + l)),
        }
    }
    ranges
}

fn source(w: &Work) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    w.qemu_io(
        &[],
        "base.qcow2",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 40M 1M",
            "write -z 1M 512k",
        ],
    );
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "src.qcow2",
    ]);
    w.qemu_io(
        &[],
        "src.qcow2",
        &[
            "write -P 0x33 2M 100k",
            "write -z 40M 64k",
            "write -z -u 2560k 128k",
            "discard 41M 64k",
            "write -P 0x44 63M 4k",
            "write -P 0 10M 64k",
            "write -P 0x55 20M 1000",
        ],
    );
}

fn convert_both(w: &Work, extra: &[&str]) {
    let mut theirs: Vec<&str> = vec!["convert", "-O", "qcow2"];
    theirs.extend_from_slice(extra);
    theirs.extend(["src.qcow2", "theirs.qcow2"]);
    w.qemu_img(&theirs);
    let mut ours: Vec<&str> = vec!["convert", "-O", "qcow2"];
    ours.extend_from_slice(extra);
    ours.extend(["src.qcow2", "ours.qcow2"]);
    let o = w.qcow2_try(&ours, &[], common::ORACLE_TIMEOUT);
    assert!(o.success(), "{}", o.describe());
    w.qemu_img(&["compare", "-q", "src.qcow2", "ours.qcow2"]);
    w.qemu_img(&["check", "-q", "ours.qcow2"]);
    assert_eq!(
        data_ranges(w, "ours.qcow2"),
        data_ranges(w, "theirs.qcow2"),
        "allocation differs from qemu-img convert's (options {extra:?})"
    );
    // No backing file: the chain is flattened.
    let info = parse_json(&w.qemu_img(&["info", "--output=json", "ours.qcow2"]));
    assert!(info.get("backing-filename").is_none(), "{info}");
}

#[test]
fn convert_chain_with_holes_and_zeros() {
    let w = Work::new();
    source(&w);
    convert_both(&w, &[]);
    convert_both(&w, &["-S", "0"]);
}

/// Needs the engine's full `CreateOptions` (H-create's branch) and convert's `-o` folded onto
/// `qcow2 create`'s parser; until then convert refuses the `-o` keys with "not supported yet".
#[test]
fn convert_with_create_options() {
    let w = Work::new();
    source(&w);
    for o in [
        "cluster_size=4096,refcount_bits=1",
        "compat=0.10",
        "extended_l2=on,cluster_size=128k",
        "lazy_refcounts=on,refcount_bits=64",
        "cluster_size=2M",
    ] {
        convert_both(&w, &["-o", o]);
        let info = parse_json(&w.qemu_img(&["info", "--output=json", "ours.qcow2"]));
        let theirs = parse_json(&w.qemu_img(&["info", "--output=json", "theirs.qcow2"]));
        assert_eq!(info["cluster-size"], theirs["cluster-size"], "-o {o}");
        assert_eq!(
            info["format-specific"]["data"], theirs["format-specific"]["data"],
            "-o {o}"
        );
    }
}

#[test]
fn convert_refusals() {
    let w = Work::new();
    source(&w);
    for (args, msg) in [
        (&["-o", "foo=1"][..], "Invalid parameter 'foo'"),
        (&["-c"], "not supported"),
    ] {
        let mut a: Vec<&str> = vec!["convert", "-O", "qcow2"];
        a.extend_from_slice(args);
        a.extend(["src.qcow2", "x.qcow2"]);
        let o = w.qcow2_try(&a, &[], common::ORACLE_TIMEOUT);
        assert!(!o.success() && o.stderr.contains(msg), "{}", o.describe());
    }
}
