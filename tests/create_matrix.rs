//! `qcow2 create` against `qemu-img create` over the combinations of its `-o` keys.
//!
//! Every case runs both tools with the same arguments, each in its own directory (so relative backing
//! and data file names mean the same thing), and requires:
//! - the same exit code, the same `Formatting ...` line and, when refused, the same reason (our
//!   `qcow2: ` prefix and qemu-img's `qemu-img: ` stripped, lines joined);
//! - refused: no file left behind by either tool;
//! - accepted: the same set of files, each byte-identical to qemu-img's (the layout model replays
//!   QEMU's allocator); `qemu-img check` clean on ours; `qemu-img info --output=json` of ours equal
//!   to that of qemu-img's image (`actual-size` aside); and, on a share of the cases, qemu-io can
//!   write into ours and our engine (`qcow2 convert -O raw`) reads back what qemu-img reads.
//!
//! The combinations are pruned: every cluster size (512 B, 4 KiB, 64 KiB, 2 MiB) with every refcount
//! width and a rotating preallocation mode; then compat x lazy_refcounts x extended_l2 x
//! compression_type x preallocation x {nothing, qcow2 backing, raw backing, data file, raw data
//! file} at one cluster size; plus option-syntax and size cases. The test prints how many cases
//! were accepted and refused.

mod common;

use std::path::Path;
use std::process::Command;

use common::{qcow2_bin, run_with_timeout, Out, Work, ORACLE_TIMEOUT};

fn qemu_present() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_in(dir: &Path, prog: impl AsRef<std::ffi::OsStr>, args: &[String]) -> Out {
    let mut c = Command::new(prog);
    c.args(args).current_dir(dir);
    run_with_timeout(c, ORACLE_TIMEOUT)
}

/// Stderr without the tool prefix, lines joined with spaces (we print one line).
fn reason(err: &str, prefix: &str) -> String {
    err.lines()
        .map(|l| l.strip_prefix(prefix).unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string()
}

/// The files under `dir` (recursively), as sorted relative paths.
fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, rel: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(base.join(rel)) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let r = rel.join(e.file_name());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &r, out);
            } else {
                out.push(r.to_string_lossy().into_owned());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, Path::new(""), &mut v);
    v.sort();
    v
}

/// Removes the keys that legitimately differ between two files of equal content.
fn strip_sizes(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("actual-size");
            for (_, x) in m.iter_mut() {
                strip_sizes(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_sizes),
        _ => {}
    }
}

/// What the test saw.
#[derive(Default)]
struct Tally {
    accepted: usize,
    refused: usize,
    io_checked: usize,
    failures: Vec<String>,
}

/// A backing or data-file setup created by qemu-img in both directories before the case runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attach {
    None,
    Qcow2Backing,
    RawBacking,
    DataFile,
    DataFileRaw,
}

struct Case {
    args: Vec<String>,
    /// The new image's name.
    image: &'static str,
    setup: Attach,
    /// Also write with qemu-io and read back with our engine.
    io: bool,
    /// qemu-img leaves the (empty) image behind when it refuses this case.
    leaves_file: bool,
}

fn case(fmt: &str, opts: &[String], attach: Attach, size: Option<&str>, io: bool) -> Case {
    let mut args = vec!["create".to_string(), "-f".into(), fmt.into()];
    let mut o: Vec<String> = opts.to_vec();
    match attach {
        Attach::Qcow2Backing => args.extend(["-b", "base.qcow2", "-F", "qcow2"].map(String::from)),
        Attach::RawBacking => args.extend(["-b", "base.raw", "-F", "raw"].map(String::from)),
        Attach::DataFile => o.push("data_file=data.raw".into()),
        Attach::DataFileRaw => o.extend(["data_file=data.raw".into(), "data_file_raw=on".into()]),
        Attach::None => {}
    }
    if !o.is_empty() {
        args.push("-o".into());
        args.push(o.join(","));
    }
    args.push("img".into());
    if let Some(s) = size {
        args.push(s.into());
    }
    Case {
        args,
        image: "img",
        setup: attach,
        io: io && size.is_some(),
        leaves_file: false,
    }
}

fn prepare(dir: &Path, attach: Attach) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mk = |args: &[&str]| {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        run_in(dir, "qemu-img", &a).assert_success();
    };
    match attach {
        Attach::Qcow2Backing => mk(&["create", "-q", "-f", "qcow2", "base.qcow2", "3M"]),
        Attach::RawBacking => {
            // 1000 bytes: qemu-img rounds the overlay's size up to 1024.
            std::fs::write(dir.join("base.raw"), vec![0x5au8; 1000]).expect("write base");
        }
        _ => {}
    }
}

fn run_case(w: &Work, n: usize, c: &Case, t: &mut Tally) {
    let qd = w.p(&format!("q{n}"));
    let od = w.p(&format!("o{n}"));
    prepare(&qd, c.setup);
    prepare(&od, c.setup);
    let before = files(&qd);
    let q = run_in(&qd, "qemu-img", &c.args);
    let o = run_in(&od, qcow2_bin(), &c.args);
    let what = c.args.join(" ");
    let fail = |t: &mut Tally, m: String| t.failures.push(format!("[{what}] {m}"));
    assert!(!o.timed_out && !o.panicked(), "{}", o.describe());
    let (qc, oc) = (
        q.status.and_then(|s| s.code()),
        o.status.and_then(|s| s.code()),
    );
    if qc != oc {
        fail(
            t,
            format!("exit codes differ: qemu {qc:?}, ours {oc:?}: {}", o.stderr),
        );
        return;
    }
    if q.stdout_str() != o.stdout_str() {
        fail(
            t,
            format!(
                "stdout differs:\n  qemu: {}  ours: {}",
                q.stdout_str(),
                o.stdout_str()
            ),
        );
    }
    if !q.success() {
        t.refused += 1;
        let (qr, or) = (
            reason(&q.stderr, "qemu-img: "),
            reason(&o.stderr, "qcow2: "),
        );
        if qr != or || or.is_empty() {
            fail(t, format!("refusal differs:\n  qemu: {qr}\n  ours: {or}"));
        }
        // Nothing new, except where qemu-img itself leaves a file (raw with
        // preallocation=metadata leaves an empty one).
        if files(&qd) != files(&od) || (files(&od) != before && !c.leaves_file) {
            fail(
                t,
                format!(
                    "files left after refusal: qemu {:?}, ours {:?}",
                    files(&qd),
                    files(&od)
                ),
            );
        }
        return;
    }
    t.accepted += 1;
    if files(&qd) != files(&od) {
        fail(
            t,
            format!("files: qemu {:?}, ours {:?}", files(&qd), files(&od)),
        );
        return;
    }
    for f in files(&qd) {
        let (a, b) = (std::fs::read(qd.join(&f)), std::fs::read(od.join(&f)));
        match (a, b) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(a), Ok(b)) => {
                let first = a.iter().zip(&b).position(|(x, y)| x != y);
                fail(
                    t,
                    format!(
                        "{f} differs: lengths {} / {}, first difference at {first:?}",
                        a.len(),
                        b.len()
                    ),
                );
            }
            _ => fail(t, format!("{f}: cannot read")),
        }
    }
    let fmt = &c.args[2];
    if fmt == "qcow2" {
        let chk = run_in(&od, "qemu-img", &["check".into(), c.image.into()]);
        if !chk.success() {
            fail(t, format!("qemu-img check of ours: {}", chk.describe()));
        }
    }
    let info = |d: &Path| {
        let out = run_in(
            d,
            "qemu-img",
            &["info".into(), "--output=json".into(), c.image.into()],
        );
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        strip_sizes(&mut v);
        v
    };
    let (qi, oi) = (info(&qd), info(&od));
    if qi != oi || qi.is_null() {
        fail(
            t,
            format!("qemu-img info differs:\n  qemu: {qi}\n  ours: {oi}"),
        );
    }
    if c.io {
        t.io_checked += 1;
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        let wr = run_in(
            &od,
            "qemu-io",
            &s(&[
                "-f",
                fmt,
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0xcd 1M 4k",
                "img",
            ]),
        );
        if !wr.success() || wr.stderr.contains("error") || wr.stdout_str().contains("failed") {
            fail(t, format!("qemu-io write into ours: {}", wr.describe()));
            return;
        }
        let qr = run_in(
            &od,
            "qemu-img",
            &s(&["convert", "-O", "raw", "img", "by-qemu.raw"]),
        );
        let or = run_in(
            &od,
            qcow2_bin(),
            &s(&["convert", "-O", "raw", "img", "by-us.raw"]),
        );
        if !qr.success() || !or.success() {
            fail(t, format!("convert: {} / {}", qr.describe(), or.describe()));
            return;
        }
        let (a, b) = (
            std::fs::read(od.join("by-qemu.raw")).unwrap_or_default(),
            std::fs::read(od.join("by-us.raw")).unwrap_or_default(),
        );
        if a != b || a.get(..65536).is_none_or(|p| p.iter().any(|&x| x != 0xab)) {
            fail(t, "our engine does not read back what qemu-io wrote".into());
        }
    }
}

fn opts(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn create_matches_qemu_img() {
    if !qemu_present() {
        eprintln!("qemu-img not installed: skipping");
        return;
    }
    let w = Work::new();
    let mut cases = Vec::new();
    let preallocs = ["off", "metadata", "falloc", "full"];

    // 1. Cluster size x refcount width, preallocation rotating.
    let mut i = 0;
    for cs in ["512", "4k", "64k", "2M"] {
        for rb in [1, 2, 4, 8, 16, 32, 64] {
            let p = preallocs[i % 4];
            i += 1;
            let o = opts(&[
                &format!("cluster_size={cs}"),
                &format!("refcount_bits={rb}"),
                &format!("preallocation={p}"),
            ]);
            cases.push(case("qcow2", &o, Attach::None, Some("3M"), i % 3 == 0));
        }
    }
    // Extended L2 at each cluster size (refused below 16 KiB).
    for cs in ["512", "8k", "16k", "64k", "2M"] {
        let o = opts(&[
            &format!("cluster_size={cs}"),
            "extended_l2=on",
            "preallocation=metadata",
        ]);
        cases.push(case("qcow2", &o, Attach::None, Some("5M"), cs == "16k"));
    }

    // 2. The feature keys and their interactions, at 64 KiB clusters.
    let attaches = [
        Attach::None,
        Attach::Qcow2Backing,
        Attach::RawBacking,
        Attach::DataFile,
        Attach::DataFileRaw,
    ];
    let mut k = 0;
    for compat in ["0.10", "1.1"] {
        for lazy in ["off", "on"] {
            for ext in ["off", "on"] {
                for comp in ["zlib", "zstd"] {
                    for (pi, p) in preallocs.iter().enumerate() {
                        for (ai, a) in attaches.iter().enumerate() {
                            // Prune: full product for v3 without lazy; otherwise rotate the attach.
                            if (compat == "0.10" || lazy == "on") && ai != (pi + k) % 5 {
                                continue;
                            }
                            k += 1;
                            let o = opts(&[
                                &format!("compat={compat}"),
                                &format!("lazy_refcounts={lazy}"),
                                &format!("extended_l2={ext}"),
                                &format!("compression_type={comp}"),
                                &format!("preallocation={p}"),
                            ]);
                            let size = match a {
                                Attach::Qcow2Backing | Attach::RawBacking if k % 2 == 0 => None,
                                _ => Some("2M"),
                            };
                            cases.push(case("qcow2", &o, *a, size, k % 4 == 0));
                        }
                    }
                }
            }
        }
    }

    // 3. Refusals and syntax qemu-img checks itself.
    let refusals: &[&[&str]] = &[
        &["cluster_size=1000"],
        &["cluster_size=256"],
        &["cluster_size=4M"],
        &["cluster_size=0"],
        &["cluster_size=abc"],
        &["refcount_bits=3"],
        &["refcount_bits=128"],
        &["refcount_bits=0"],
        &["refcount_bits=abc"],
        &["compat=0.10", "refcount_bits=8"],
        &["compat=0.9"],
        &["compression_type=lz4"],
        &["preallocation=xx"],
        &["lazy_refcounts=maybe"],
        &["foo=bar"],
        &["data_file_raw=on"],
        &["backing_fmt=qcow2"],
        &["compat=v2", "extended_l2=on", "cluster_size=8k"],
        &["compat=0.10", "data_file=d.raw", "compression_type=zstd"],
    ];
    for r in refusals {
        cases.push(case("qcow2", &opts(r), Attach::None, Some("1M"), false));
    }
    // Option syntax: booleans without a value or as yes/true, repeated keys, v2/v3 names.
    for o in [
        &["lazy_refcounts", "extended_l2=yes", "cluster_size=32k"][..],
        &["compat=1.1", "compat=0.10"],
        &["compat=v3", "data_file_raw=true", "data_file=dd.raw"],
        &["size=5M"],
    ] {
        let size = if o == ["size=5M"] { None } else { Some("1M") };
        cases.push(case("qcow2", &opts(o), Attach::None, size, false));
    }
    // Sizes: rounding, zero, the L1 limit at 512 B and 64 KiB clusters, bad and missing sizes.
    for (o, size) in [
        (&[][..], Some("1000")),
        (&[], Some("0")),
        (&["cluster_size=512"], Some("128G")),
        (&["cluster_size=512"], Some("129G")),
        (&[], Some("2P")),
        (&[], Some("3P")),
        (&[], Some("1Q")),
        (&[], None),
    ] {
        cases.push(case("qcow2", &opts(o), Attach::None, size, false));
    }
    // Sizes that are not a multiple of the cluster size, with preallocation into a data file
    // (the data file then ends at the last (sub)cluster) and into the image.
    for (o, a, size) in [
        (&["preallocation=metadata"][..], Attach::DataFile, "4097"),
        (&["cluster_size=32k"], Attach::DataFileRaw, "7777777"),
        (
            &["extended_l2=on", "preallocation=full"],
            Attach::DataFile,
            "4097",
        ),
        (
            &[
                "cluster_size=2M",
                "extended_l2=on",
                "preallocation=metadata",
            ],
            Attach::None,
            "3000000",
        ),
        (
            &["cluster_size=2M", "preallocation=falloc"],
            Attach::None,
            "3000000",
        ),
    ] {
        cases.push(case("qcow2", &opts(o), a, Some(size), false));
    }
    // Raw images.
    for (o, size) in [
        (&[][..], Some("1000")),
        (&["preallocation=falloc"], Some("1M")),
        (&["preallocation=full"], Some("1000")),
        (&["preallocation=metadata"], Some("1M")),
        (&["cluster_size=4k"], Some("1M")),
    ] {
        let mut c = case("raw", &opts(o), Attach::None, size, false);
        c.leaves_file = o == ["preallocation=metadata"];
        cases.push(c);
    }
    let mut raw_backing = case("raw", &[], Attach::Qcow2Backing, Some("1M"), false);
    raw_backing.args[2] = "raw".into();
    cases.push(raw_backing);
    // A backing file given without its format, and one that does not exist.
    cases.push(Case {
        args: opts(&["create", "-f", "qcow2", "-b", "base.qcow2", "img", "1M"]),
        image: "img",
        setup: Attach::Qcow2Backing,
        io: false,
        leaves_file: false,
    });
    cases.push(Case {
        args: opts(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nope.qcow2",
            "-F",
            "qcow2",
            "img",
        ]),
        image: "img",
        setup: Attach::None,
        io: false,
        leaves_file: false,
    });

    let start = std::time::Instant::now();
    let mut t = Tally::default();
    for (n, c) in cases.iter().enumerate() {
        run_case(&w, n, c, &mut t);
    }
    eprintln!(
        "create matrix: {} cases, {} accepted (byte-compared, checked, info-compared), {} refused, \
         {} written with qemu-io and read back, {:?}",
        cases.len(),
        t.accepted,
        t.refused,
        t.io_checked,
        start.elapsed()
    );
    assert!(
        t.failures.is_empty(),
        "{} of {} cases differ from qemu-img:\n{}",
        t.failures.len(),
        cases.len(),
        t.failures.join("\n")
    );
}

/// A relative backing name is stored as given and resolved against the new image's directory, in a
/// subdirectory too; the size is taken from the backing file.
#[test]
fn backing_in_subdirectory() {
    if !qemu_present() {
        return;
    }
    let w = Work::new();
    let mut t = Tally::default();
    for tool in ["q", "o"] {
        let d = w.p(&format!("{tool}0/sub"));
        std::fs::create_dir_all(&d).expect("mkdir");
        run_in(
            &d,
            "qemu-img",
            &opts(&["create", "-q", "-f", "qcow2", "b.qcow2", "3M"]),
        )
        .assert_success();
    }
    let c = Case {
        args: opts(&[
            "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "sub/img",
        ]),
        image: "sub/img",
        setup: Attach::None,
        io: false,
        leaves_file: false,
    };
    run_case(&w, 0, &c, &mut t);
    let c = Case {
        args: opts(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nope.qcow2",
            "-F",
            "qcow2",
            "sub/img2",
        ]),
        image: "sub/img2",
        setup: Attach::None,
        io: false,
        leaves_file: false,
    };
    run_case(&w, 0, &c, &mut t);
    assert!(t.failures.is_empty(), "{}", t.failures.join("\n"));
    assert_eq!((t.accepted, t.refused), (1, 1));
}

/// The library API: `Image::create` gives images qemu-img checks clean and our engine opens, and
/// refusals are typed (`Error::Create` with qemu-img's reason).
#[test]
fn image_create_api() {
    use qcow2_engine::{
        CompressionType, CreateError, CreateOptions, Error, Image, ImageFormat, OpenOptions,
        Preallocation,
    };
    use qcow2_io::StdFileBackend;

    if !qemu_present() {
        return;
    }
    let w = Work::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let base = w.p("base.qcow2");
        Image::<StdFileBackend>::create(&base, &CreateOptions::qcow2(3 << 20))
            .await
            .expect("create base");
        let mut o = CreateOptions::overlay("base.qcow2", ImageFormat::Qcow2);
        o.extended_l2 = true;
        o.cluster_size = 32768;
        o.preallocation = Preallocation::Metadata;
        o.compression_type = CompressionType::Zstd;
        let top = w.p("top.qcow2");
        Image::<StdFileBackend>::create(&top, &o)
            .await
            .expect("create overlay");
        let img = Image::<StdFileBackend>::open(&top, &OpenOptions::default())
            .await
            .expect("open");
        assert_eq!(img.virtual_size(), 3 << 20);
        let mut buf = vec![1u8; 4096];
        img.read(1 << 20, &mut buf).await.expect("read");
        assert!(buf.iter().all(|&b| b == 0));

        o.cluster_size = 8192;
        match Image::<StdFileBackend>::create(w.p("bad.qcow2"), &o).await {
            Err(Error::Create { source, .. }) => {
                assert_eq!(source, CreateError::ExtendedL2ClusterSize)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(!w.p("bad.qcow2").exists());
    });
    for img in ["base.qcow2", "top.qcow2"] {
        let chk = run_in(w.path(), "qemu-img", &opts(&["check", img]));
        assert!(chk.success(), "{}", chk.describe());
    }
}

/// Existing files at the image (and data file) name: qemu-img overwrites them, and when its qcow2
/// driver refuses the options it deletes them; syntax errors leave them alone. Same for us.
#[test]
fn existing_files_on_refusal() {
    if !qemu_present() {
        return;
    }
    let w = Work::new();
    let arg_sets: &[&[&str]] = &[
        &["-o", "cluster_size=1000"],
        &["-o", "compat=0.10,data_file=d.raw"],
        &["-o", "data_file=d.raw,extended_l2=on,cluster_size=4k"],
        &["-o", "compat=0.9"],
        &["-o", "foo=bar"],
        &["-o", "data_file=d.raw"],
        &[],
    ];
    for (n, extra) in arg_sets.iter().enumerate() {
        let mut args = opts(&["create", "-q", "-f", "qcow2"]);
        args.extend(opts(extra));
        args.extend(opts(&["img", "1M"]));
        let mut seen = Vec::new();
        for (tool, prog) in [
            ("q", std::ffi::OsString::from("qemu-img")),
            ("o", qcow2_bin().into()),
        ] {
            let d = w.p(&format!("{tool}{n}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("img"), b"old image").expect("write");
            std::fs::write(d.join("d.raw"), b"old data").expect("write");
            let out = run_in(&d, &prog, &args);
            let contents: Vec<(String, Vec<u8>)> = files(&d)
                .into_iter()
                .map(|f| {
                    let c = std::fs::read(d.join(&f)).unwrap_or_default();
                    (f, c)
                })
                .collect();
            seen.push((out.success(), contents));
        }
        assert_eq!(seen[0], seen[1], "files after `{}` differ", args.join(" "));
    }
}
