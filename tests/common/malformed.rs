//! Harness for the malformed-image tests (`malformed_header`, `malformed_tables`): header offsets, the
//! per-command comparison with qemu-img under memory and time limits, and the valid base images to patch.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use super::{find_header_extension, get_be32, get_be64, put_be32, Work};

/// Time limit for our binary (killed after it: a hang fails the test).
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Time limit for qemu-img (which does not terminate on some backing loops: counted as a failure).
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(10);

// Header field offsets (qcow2.txt, "Header").
pub const H_MAGIC: u64 = 0;
pub const H_VERSION: u64 = 4;
pub const H_BACKING_OFFSET: u64 = 8;
pub const H_BACKING_SIZE: u64 = 16;
pub const H_CLUSTER_BITS: u64 = 20;
pub const H_SIZE: u64 = 24;
pub const H_CRYPT: u64 = 32;
pub const H_L1_SIZE: u64 = 36;
pub const H_L1_OFFSET: u64 = 40;
pub const H_RT_OFFSET: u64 = 48;
pub const H_RT_CLUSTERS: u64 = 56;
pub const H_NB_SNAPSHOTS: u64 = 60;
pub const H_SNAPSHOTS_OFFSET: u64 = 64;
pub const H_INCOMPAT: u64 = 72;
pub const H_REFCOUNT_ORDER: u64 = 96;
pub const H_HEADER_LENGTH: u64 = 100;

pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// The lead's decision (REQUESTS.md, 18:46 UTC): L1/L2/data pointers wholly past the end of the file, and a
/// snapshot table past it, are reported as corruption (`qemu-img check` calls them corruption; inventing
/// zeros would hide lost data). QEMU's block layer reads zeros there instead. A partial last cluster (data
/// starting before EOF) still reads zero-filled as in QEMU (see truncated_in_last_cluster).
pub const PAST_EOF_REASON: &str =
    "pointer wholly past EOF is corruption for us; QEMU reads zeros there";
pub const PAST_EOF: &[Allow] = &[
    allow(Cmd::Info, PAST_EOF_REASON),
    allow(Cmd::Map, PAST_EOF_REASON),
    allow(Cmd::Convert, PAST_EOF_REASON),
    allow(Cmd::InfoHuman, PAST_EOF_REASON),
];

/// The commands compared with qemu-img.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Info,
    Map,
    Convert,
    InfoChain,
    InfoHuman,
}

impl Cmd {
    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Info => "info",
            Cmd::Map => "map",
            Cmd::Convert => "convert",
            Cmd::InfoChain => "info --backing-chain",
            Cmd::InfoHuman => "info (human)",
        }
    }

    /// Command-line arguments for both tools.
    pub fn args(self, fmt: Option<&str>, image: &str, out: &str) -> Vec<String> {
        let mut a: Vec<String> = match self {
            Cmd::Info => vec!["info".into(), "--output=json".into()],
            Cmd::Map => vec!["map".into(), "--output=json".into()],
            Cmd::Convert => vec!["convert".into(), "-O".into(), "raw".into()],
            Cmd::InfoChain => vec![
                "info".into(),
                "--backing-chain".into(),
                "--output=json".into(),
            ],
            Cmd::InfoHuman => vec!["info".into()],
        };
        if let Some(f) = fmt {
            a.push("-f".into());
            a.push(f.into());
        }
        a.push(image.into());
        if self == Cmd::Convert {
            a.push(out.into());
        }
        a
    }
}

/// A documented divergence from qemu-img for one command of one case.
pub struct Allow {
    pub cmd: Cmd,
    /// Why our result may differ from qemu-img's.
    pub reason: &'static str,
}

pub const fn allow(cmd: Cmd, reason: &'static str) -> Allow {
    Allow { cmd, reason }
}

/// One malformed-image check.
pub struct Case<'a> {
    pub image: &'a str,
    /// `-f` for both tools (None: probe).
    pub fmt: Option<&'a str>,
    pub cmds: &'a [Cmd],
    pub allowed: &'a [Allow],
    /// Names any of which our one-line error message must contain.
    pub names: &'a [&'a str],
}

pub const CMDS: &[Cmd] = &[Cmd::Info, Cmd::Map, Cmd::Convert, Cmd::InfoHuman];

pub fn run_case(w: &Work, case: &Case<'_>) {
    let mut errs: Vec<String> = Vec::new();
    for &cmd in case.cmds {
        let qout = format!("{}.{}.qemu.raw", case.image, cmd.name());
        let oout = format!("{}.{}.ours.raw", case.image, cmd.name());
        let qargs = cmd.args(case.fmt, case.image, &qout);
        let qa: Vec<&str> = qargs.iter().map(String::as_str).collect();
        let q = w.qemu_img_try(&qa, QEMU_TIMEOUT);
        let oargs = cmd.args(case.fmt, case.image, &oout);
        let oa: Vec<&str> = oargs.iter().map(String::as_str).collect();
        let o = w.qcow2_limited(&oa, TIMEOUT);

        if o.timed_out {
            errs.push(format!(
                "{}: ours HUNG (killed after {:?})",
                cmd.name(),
                TIMEOUT
            ));
            continue;
        }
        if o.panicked() {
            errs.push(format!("{}: ours PANICKED:\n{}", cmd.name(), o.describe()));
            continue;
        }
        let Some(status) = o.status else {
            errs.push(format!("{}: ours has no exit status", cmd.name()));
            continue;
        };
        if status.code().is_none() {
            errs.push(format!(
                "{}: ours was killed by a signal (abort on allocation failure under the {} byte \
                 address-space limit?): {}",
                cmd.name(),
                super::MEMORY_LIMIT,
                o.describe()
            ));
            continue;
        }
        if !o.success() {
            // Exactly one line (ignoring tracing warnings such as the io_uring fallback) naming the file.
            let lines: Vec<&str> = o
                .stderr
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.contains(" WARN "))
                .collect();
            if lines.len() != 1 {
                errs.push(format!(
                    "{}: our error output should be exactly one line, got {}:\n{}",
                    cmd.name(),
                    lines.len(),
                    o.stderr
                ));
            } else if !case.names.iter().any(|n| lines[0].contains(n)) {
                errs.push(format!(
                    "{}: our error line does not name the file ({:?}): {}",
                    cmd.name(),
                    case.names,
                    lines[0]
                ));
            }
        }
        let q_ok = q.success();
        eprintln!(
            "[{} {}] {}: qemu-img {} | ours {}",
            std::thread::current().name().unwrap_or("?"),
            case.image,
            cmd.name(),
            summary(&q),
            summary(&o)
        );
        let allowed = case.allowed.iter().find(|a| a.cmd == cmd);
        if q_ok != o.success() {
            let qdesc = if q.timed_out {
                format!("qemu-img did not terminate within {QEMU_TIMEOUT:?}")
            } else if q_ok {
                "qemu-img succeeds".to_string()
            } else {
                format!("qemu-img fails: {}", q.stderr.trim())
            };
            let odesc = if o.success() {
                "we succeed".to_string()
            } else {
                format!("we fail: {}", o.stderr.trim())
            };
            match allowed {
                Some(a) => eprintln!(
                    "{}: documented divergence ({}): {qdesc}; {odesc}",
                    cmd.name(),
                    a.reason
                ),
                None => errs.push(format!("{}: {qdesc}; {odesc}", cmd.name())),
            }
        } else if q_ok {
            if let Err(e) = compare_outputs(w, cmd, &q, &o, &qout, &oout) {
                match allowed {
                    Some(a) => eprintln!(
                        "{}: output differs, documented ({}): {e}",
                        cmd.name(),
                        a.reason
                    ),
                    None => errs.push(format!(
                        "{}: both succeed but outputs differ: {e}",
                        cmd.name()
                    )),
                }
            }
        }
        let _ = std::fs::remove_file(w.p(&qout));
        let _ = std::fs::remove_file(w.p(&oout));
    }
    assert!(
        errs.is_empty(),
        "malformed image {} ({}):\n{}",
        case.image,
        w.path().display(),
        errs.join("\n")
    );
}

/// Compares the outputs of a command that succeeded with both tools.
pub fn compare_outputs(
    w: &Work,
    cmd: Cmd,
    q: &super::Out,
    o: &super::Out,
    qout: &str,
    oout: &str,
) -> Result<(), String> {
    match cmd {
        Cmd::Convert => super::diff_files(&w.p(qout), &w.p(oout), "qemu-img", "ours"),
        Cmd::Map => {
            let qv = super::parse_map(&super::parse_json(q))?;
            let ov: serde_json::Value = serde_json::from_slice(&o.stdout)
                .map_err(|e| format!("our map output is not JSON: {e}"))?;
            let ov = super::parse_map(&ov)?;
            super::diff_maps(&super::normalize_map(qv), &super::normalize_map(ov))
        }
        Cmd::Info => {
            let ov: serde_json::Value = serde_json::from_slice(&o.stdout)
                .map_err(|e| format!("our info output is not JSON: {e}"))?;
            let errs = super::diff_info(&super::parse_json(q), &ov, "info");
            if errs.is_empty() {
                Ok(())
            } else {
                Err(errs.join("; "))
            }
        }
        Cmd::InfoChain => Ok(()),
        Cmd::InfoHuman => {
            let (qs, os) = (q.stdout_str(), o.stdout_str());
            if qs == os {
                return Ok(());
            }
            let ql: Vec<&str> = qs.lines().collect();
            let ol: Vec<&str> = os.lines().collect();
            let mut msg = String::new();
            for i in 0..ql.len().max(ol.len()) {
                let a = ql.get(i).copied().unwrap_or("<none>");
                let b = ol.get(i).copied().unwrap_or("<none>");
                if a != b {
                    msg.push_str(&format!("\n  line {}: qemu {a:?} / ours {b:?}", i + 1));
                }
            }
            Err(msg)
        }
    }
}

pub fn summary(o: &super::Out) -> String {
    if o.timed_out {
        "HANG".to_string()
    } else if o.success() {
        "ok".to_string()
    } else {
        let first = o.stderr.lines().next().unwrap_or("").trim().to_string();
        match o.status.and_then(|s| s.code()) {
            Some(c) => format!("exit {c}: {first}"),
            None => format!("signal: {first}"),
        }
    }
}

/// Runs the default commands on `image`, probing the format, with documented divergences.
pub fn check(w: &Work, image: &str, allowed: &[Allow]) {
    run_case(
        w,
        &Case {
            image,
            fmt: None,
            cmds: CMDS,
            allowed,
            names: &[image],
        },
    );
}

/// As [`check`], with `-f qcow2`.
pub fn check_qcow2(w: &Work, image: &str, allowed: &[Allow]) {
    run_case(
        w,
        &Case {
            image,
            fmt: Some("qcow2"),
            cmds: CMDS,
            allowed,
            names: &[image],
        },
    );
}

// -------------------------------------------------------------------------------------------------
// valid images to patch

/// Facts about a freshly made base image.
pub struct Base {
    /// Offset of the active L1 table.
    pub l1_offset: u64,
    /// Offset of the L2 table of L1 entry 0.
    pub l2_offset: u64,
    /// Host offset of guest cluster 0's data.
    pub data_offset: u64,
    /// Offset of the refcount table.
    pub rt_offset: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
}

pub fn read_base(path: &Path) -> Base {
    let l1_offset = get_be64(path, H_L1_OFFSET);
    let l1e = get_be64(path, l1_offset);
    let l2_offset = l1e & OFFSET_MASK;
    let l2e = get_be64(path, l2_offset);
    Base {
        l1_offset,
        l2_offset,
        data_offset: l2e & OFFSET_MASK,
        rt_offset: get_be64(path, H_RT_OFFSET),
        cluster_size: 1 << get_be32(path, H_CLUSTER_BITS),
    }
}

/// A v3 image with 64 KiB clusters, 4 MiB virtual size, data in guest clusters 0, 1 and 16.
pub fn make_base(w: &Work, name: &str) -> Base {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        name,
        "4M",
    ]);
    w.qemu_io(
        &["-f", "qcow2"],
        name,
        &["write -P 0x11 0 128k", "write -P 0x22 1M 64k"],
    );
    let b = read_base(&w.p(name));
    assert_ne!(b.l2_offset, 0);
    assert_ne!(b.data_offset, 0);
    b
}

/// A compressed image (`qemu-img convert -c`) with the given cluster size.
pub fn make_compressed(w: &Work, name: &str, cluster_size: &str) -> Base {
    let text: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|i: u32| b"compressible text "[(i % 18) as usize])
        .collect();
    w.write_file("src.raw", &text);
    let opts = format!("cluster_size={cluster_size}");
    w.qemu_img(&[
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, "src.raw", name,
    ]);
    let p = w.p(name);
    let l1_offset = get_be64(&p, H_L1_OFFSET);
    let l2_offset = get_be64(&p, l1_offset) & OFFSET_MASK;
    let l2e = get_be64(&p, l2_offset);
    assert_ne!(l2e & (1 << 62), 0, "guest cluster 0 should be compressed");
    Base {
        l1_offset,
        l2_offset,
        data_offset: 0,
        rt_offset: get_be64(&p, H_RT_OFFSET),
        cluster_size: 1 << get_be32(&p, H_CLUSTER_BITS),
    }
}

/// An overlay with a backing file name, for backing-name cases; returns the name's offset.
pub fn make_overlay(w: &Work) -> u64 {
    make_base(w, "base.qcow2");
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
    get_be64(&w.p("img.qcow2"), H_BACKING_OFFSET)
}

/// Makes a base image `name` and sets the length field of its feature-name table extension to
/// `len(extension_offset)`: the shared step of the header-extension length cases.
pub fn base_with_feature_table_length(w: &Work, name: &str, len: impl Fn(u64) -> u32) {
    make_base(w, name);
    let (off, _) =
        find_header_extension(&w.p(name), EXT_FEATURE_TABLE).expect("feature name table");
    put_be32(&w.p(name), off + 4, len(off));
}

/// Creates `img.qcow2` (4 MiB) with the external data file `img.data`, named relative to the work
/// directory as QEMU resolves it.
pub fn make_data_file_image(w: &Work) {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data",
        "img.qcow2",
        "4M",
    ]);
}
