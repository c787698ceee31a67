//! Property test of check and repair: random damage to the metadata of images qemu-img and qemu-io
//! made (L1 and L2 entries, refcounts, refcount table entries set to other clusters, unaligned or
//! past-EOF offsets, flags flipped, random bits), then:
//! - `check_file` without repair agrees with `qemu-img check` on every counter and every stderr line
//!   (or both fail to open the image), and writes nothing;
//! - `check_file` with `-r all` either leaves an image that `qemu-img check` finds clean, or reports
//!   that it could not (its own re-check not clean, or the check failed), never claims a clean image
//!   qemu-img disagrees with, and never panics.
//!
//! PROPTEST_CASES scales the cases (default 300, about 10 s; 3,000 ran clean by hand).

mod check_common;

use check_common::{assert_same, be64, field, qemu_check, Layout};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use qcow2_engine::{check_file, Repair};
use qcow2_io::StdFileBackend;
use qcow2_testkit::{create_qcow2, qemu_available, qemu_img, qemu_io, temp_dir};

/// Where a damage lands.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The L2 entry of guest cluster `n % allocated-range`.
    L2(u64),
    /// The L1 entry `n % 2` (the first ones are in use).
    L1(u64),
    /// The refcount of host cluster `n % file clusters`.
    Refcount(u64),
    /// Refcount table entry `n % 2`.
    Reftable(u64),
}

/// What is written there.
#[derive(Debug, Clone, Copy)]
enum Value {
    Zero,
    /// The value of another entry of the same kind (`n`-th guest cluster's L2 entry, or a refcount).
    Small(u64),
    /// Offset by 512 (unaligned).
    Unaligned,
    /// Far past the end of the file.
    PastEof,
    /// One bit flipped.
    Flip(u32),
    /// Anything.
    Random(u64),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => any::<u64>().prop_map(Target::L2),
        1 => any::<u64>().prop_map(Target::L1),
        3 => any::<u64>().prop_map(Target::Refcount),
        1 => any::<u64>().prop_map(Target::Reftable),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Zero),
        (0u64..4).prop_map(Value::Small),
        Just(Value::Unaligned),
        Just(Value::PastEof),
        (0u32..64).prop_map(Value::Flip),
        any::<u64>().prop_map(Value::Random),
    ]
}

/// Image options of the cases.
const CONFIGS: &[&str] = &[
    "cluster_size=4096",
    "cluster_size=512",
    "cluster_size=4096,refcount_bits=1",
    "extended_l2=on",
    "cluster_size=4096,lazy_refcounts=on",
];

/// Guest clusters written (so that L2 entries exist for them).
const WRITTEN: u64 = 24;

fn put64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Applies one damage to `b`; positions are looked up in the undamaged `base`.
fn apply(base: &[u8], b: &mut [u8], l: &Layout, t: Target, v: Value) {
    let len = b.len() as u64;
    let file_clusters = len.div_ceil(l.cs);
    let past = (file_clusters + 64) * l.cs;
    let entry_value = |old: u64, small_to: u64| match v {
        Value::Zero => 0,
        Value::Small(n) => small_to + n * l.cs,
        Value::Unaligned => old.wrapping_add(512),
        Value::PastEof => (old & (0xff00_0000_0000_01ff)) | past,
        Value::Flip(bit) => old ^ (1 << bit),
        Value::Random(r) => r,
    };
    match t {
        Target::L2(n) => {
            let g = n % WRITTEN;
            let at = l.l2_entry(base, g);
            let old = be64(b, at);
            let other = be64(base, l.l2_entry(base, (g + 1) % WRITTEN)) & 0x00ff_ffff_ffff_fe00;
            put64(b, at, entry_value(old, other));
        }
        Target::L1(n) => {
            let at = (l.l1 + 8 * (n % 2)) as usize;
            let old = be64(b, at);
            put64(b, at, entry_value(old, l.cs * 3));
        }
        Target::Refcount(n) => {
            let c = n % file_clusters.max(1);
            let max = if l.refcount_bits == 64 {
                u64::MAX
            } else {
                (1 << l.refcount_bits) - 1
            };
            let val = match v {
                Value::Zero => 0,
                Value::Small(k) => k,
                Value::Unaligned | Value::PastEof => 2,
                Value::Flip(bit) => 1u64 << (bit % l.refcount_bits),
                Value::Random(r) => r,
            } & max;
            l.set_refcount_at(base, b, c, val);
        }
        Target::Reftable(n) => {
            let at = (l.reftable + 8 * (n % 2)) as usize;
            let old = be64(b, at);
            put64(b, at, entry_value(old, l.cs * 2));
        }
    }
}

/// Makes the base image of config `i` once; returns its bytes.
fn base_image(opts: &str) -> Vec<u8> {
    let dir = temp_dir();
    let d = dir.path();
    create_qcow2(d, "img.qcow2", "32M", opts, None);
    qemu_io(
        d,
        &["-f", "qcow2"],
        "img.qcow2",
        &["write -P 1 0 24k", "write -P 2 40k 60k", "write -z 8k 4k"],
    );
    let cs = Layout::of(&std::fs::read(d.join("img.qcow2")).unwrap()).cs;
    // Make sure guest clusters 0..WRITTEN have L2 entries (data) whatever the cluster size.
    let cmd = format!("write -P 3 0 {}", WRITTEN * cs);
    qemu_io(
        d,
        &["-f", "qcow2"],
        "img.qcow2",
        &[&cmd, "write -P 4 1M 8k"],
    );
    qemu_img(d, &["check", "img.qcow2"]);
    std::fs::read(d.join("img.qcow2")).unwrap()
}

fn run_case(base: &[u8], opts: &str, damages: &[(Target, Value)]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir();
    let d = dir.path();
    let path = d.join("img.qcow2");
    let mut bytes = base.to_vec();
    let l = Layout::of(&bytes);
    for &(t, v) in damages {
        apply(base, &mut bytes, &l, t, v);
    }
    std::fs::write(&path, &bytes).unwrap();
    let what = format!("{opts} {damages:?}");
    if std::env::var_os("CHECK_PROPTEST_TRACE").is_some() {
        eprintln!("case: {what}");
        std::fs::write("/tmp/check-proptest-last.qcow2", &bytes).unwrap();
    }

    let (code, j, stderr) = qemu_check(d, "img.qcow2", None);
    let ours = rt.block_on(check_file::<StdFileBackend>(&path, None, Repair::None));
    match &ours {
        Ok(r) if r.failed.is_none() => assert_same(&what, r, code, &j, &stderr),
        // Both could not complete, or qemu-img refused to open (exit 1, no JSON).
        Ok(r) => prop_assert_eq!(
            code,
            1,
            "{}: ours failed ({:?}), qemu-img: {} {:?}",
            what,
            r.failed,
            j,
            stderr
        ),
        Err(e) => prop_assert_eq!(
            code,
            1,
            "{}: ours refused ({}), qemu-img: {} {:?}",
            what,
            e,
            j,
            stderr
        ),
    }
    prop_assert!(
        std::fs::read(&path).unwrap() == bytes,
        "{}: a check without -r wrote",
        what
    );

    let opened = matches!(&ours, Ok(r) if r.failed.is_none());
    match rt.block_on(check_file::<StdFileBackend>(&path, None, Repair::All)) {
        Ok(r) => {
            let (code2, j2, stderr2) = qemu_check(d, "img.qcow2", None);
            // Never claims a clean image qemu-img disagrees with.
            if r.exit_code() == 0 {
                prop_assert_eq!(
                    code2,
                    0,
                    "{}: ours -r all says clean, qemu-img: {} {:?}; ours: {:?}",
                    what,
                    j2,
                    stderr2,
                    r
                );
            }
            // No worse than before, as qemu-img counts (when it could count before).
            if code != 1 && code2 != 1 {
                prop_assert!(
                    field(&j2, "corruptions") <= field(&j, "corruptions"),
                    "{}: more corruptions after -r all: before {} after {} {:?}",
                    what,
                    j,
                    j2,
                    stderr2
                );
            }
        }
        // A repair may refuse only what the plain check could not read either.
        Err(e) => prop_assert!(!opened, "{}: check worked, -r all failed: {}", what, e),
    }
    Ok(())
}

#[test]
fn random_damage_agrees_with_qemu_img_and_repairs() {
    if !qemu_available() {
        eprintln!("skipped: qemu-img not found");
        return;
    }
    let bases: Vec<Vec<u8>> = CONFIGS.iter().map(|o| base_image(o)).collect();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        0..CONFIGS.len(),
        proptest::collection::vec((target(), value()), 1..4),
    );
    runner
        .run(&strategy, |(ci, damages)| {
            run_case(&bases[ci], CONFIGS[ci], &damages)
        })
        .unwrap();
    println!("check proptest: {cases} random damages agreed with qemu-img check");
}
