//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same bodies the cargo-fuzz
//! targets run (`qcow2::fuzzing`, `qcow2_cli::fuzzing`), on stable, so that every input that ever found
//! a bug (or new coverage) stays a test. Inputs are replayed in file-name order; each test prints how
//! many inputs it replayed and how long it took.

use std::path::Path;
use std::time::Instant;

/// Replays every input of `fuzz/corpus/<target>` (or, with `stride` > 1, every `stride`-th input in
/// file-name order, a deterministic sample for corpora too slow to replay whole in a debug build).
fn replay(target: &str, stride: usize, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("readable corpus directory").path())
        .collect();
    paths.sort();
    let total = paths.len();
    let start = Instant::now();
    let mut n = 0;
    for path in paths.iter().step_by(stride.max(1)) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        body(&data);
        n += 1;
    }
    assert!(n > 0, "corpus {} is empty", dir.display());
    println!(
        "{target}: replayed {n} of {total} inputs in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn header_corpus() {
    replay("header", 1, qcow2::fuzzing::header);
}

#[test]
fn open_read_corpus() {
    replay("open_read", 1, qcow2::fuzzing::open_read);
}

#[test]
fn decode_corpus() {
    replay("decode", 1, qcow2::fuzzing::decode);
}

#[test]
fn rw_check_corpus() {
    replay("rw_check", 1, qcow2::fuzzing::rw_check);
    // The committed qemu-img seeds must exercise the whole target: open, requests, check, repair.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/rw_check");
    let (mut opened, mut mutated, mut checked, mut repaired) = (0, 0, 0, 0);
    for name in [
        "qemu-plain",
        "qemu-xl2",
        "qemu-comp",
        "qemu-snap",
        "qemu-rc1",
        "qemu-lazy",
    ] {
        let data = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        let s = qcow2::fuzzing::rw_check_stats(&data);
        opened += usize::from(s.opened);
        mutated += s.mutations_ok;
        checked += usize::from(s.checked);
        repaired += usize::from(s.repaired);
    }
    println!("rw_check seeds: {opened} opened, {mutated} requests succeeded, {checked} checked, {repaired} repaired");
    assert_eq!(
        (opened, checked, repaired),
        (6, 6, 6),
        "a qemu-img seed failed a step"
    );
    assert!(mutated > 0, "no scripted request succeeded on the seeds");
}

#[test]
fn opts_corpus() {
    replay("opts", 1, qcow2_cli::fuzzing::opts);
}
