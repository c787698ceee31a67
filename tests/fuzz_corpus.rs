//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same bodies the cargo-fuzz
//! targets run, on stable, so that every input that ever found a bug (or new coverage) stays a test.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("readable corpus directory").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        body(&data);
        n += 1;
    }
    assert!(n > 0, "corpus {} is empty", dir.display());
    println!("{target}: replayed {n} inputs");
}

#[test]
fn header_corpus() {
    replay("header", qcow2::fuzzing::header);
}

#[test]
fn open_read_corpus() {
    replay("open_read", qcow2::fuzzing::open_read);
}
