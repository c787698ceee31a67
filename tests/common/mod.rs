//! Shared helpers for the integration tests that use QEMU's tools (`qemu-img`, `qemu-io`) as the oracle.
//!
//! Every test works in its own temporary directory, and every command (ours and QEMU's) runs with that
//! directory as its working directory, so file names in the output (`filename`, `backing-filename`,
//! relative `data_file` names, which QEMU resolves against the working directory) are the same for both.
//!
//! Our binary is found next to the test executable's `deps/` directory (`target/debug/qcow2`), or via the
//! environment variable `QCOW2_BIN`. Setting `QCOW2_BIN` to a script that runs `qemu-img "$@"` checks the
//! image recipes and the comparison code against QEMU itself.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod images;
pub mod malformed;
pub mod twin;
pub mod write;

/// Default time limit for one command of an oracle test (debug builds on two shared cores).
pub const ORACLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Address-space limit applied to our binary where memory must stay bounded (bytes).
pub const MEMORY_LIMIT: u64 = 2_000_000_000;

/// The result of one finished (or killed) command.
#[derive(Debug)]
pub struct Out {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit status (None when the command was killed on timeout).
    pub status: Option<ExitStatus>,
    /// Captured standard output.
    pub stdout: Vec<u8>,
    /// Captured standard error (lossy UTF-8).
    pub stderr: String,
    /// True when the time limit expired and the command was killed.
    pub timed_out: bool,
    /// Wall-clock run time.
    pub elapsed: Duration,
}

impl Out {
    /// True when the command finished with exit status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// Standard output as (lossy) UTF-8.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// A short description for failure messages.
    pub fn describe(&self) -> String {
        let status = if self.timed_out {
            format!("TIMED OUT after {:?}", self.elapsed)
        } else {
            match self.status {
                Some(s) => format!("{s}"),
                None => "no status".to_string(),
            }
        };
        format!(
            "`{}`: {}\n--- stdout (first 2000 bytes):\n{}\n--- stderr:\n{}",
            self.cmdline,
            status,
            truncate(&self.stdout_str(), 2000),
            truncate(&self.stderr, 4000)
        )
    }

    /// Panics unless the command succeeded.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed: {}", self.describe());
        self
    }

    /// True when stderr shows a Rust panic.
    pub fn panicked(&self) -> bool {
        self.stderr.contains("panicked") || self.stderr.contains("RUST_BACKTRACE")
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes total]", &s[..end], s.len())
}

fn shell_words(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"', ',']) {
            let _ = write!(s, " '{}'", a.replace('\'', "'\\''"));
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// Runs `cmd` with stdin closed and stdout/stderr captured, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Out {
    let cmdline = shell_words(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "0");
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start `{cmdline}`: {e}"),
    };
    let mut so = child.stdout.take().expect("stdout was piped");
    let mut se = child.stderr.take().expect("stderr was piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => panic!("waiting for `{cmdline}`: {e}"),
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // If a grandchild kept the pipes open these joins would block; our commands do not fork.
    let stdout = t_out.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Out {
        cmdline,
        status,
        stdout,
        stderr,
        timed_out,
        elapsed: start.elapsed(),
    }
}

/// Path of our `qcow2` binary.
pub fn qcow2_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QCOW2_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/qcow2
    let mut dir = exe
        .parent()
        .expect("test binary has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("qcow2");
    assert!(
        bin.exists(),
        "our binary {} does not exist: run the tests with `cargo test --workspace` (which builds it) \
         or `cargo build -p qcow2-cli` first, or set QCOW2_BIN",
        bin.display()
    );
    bin
}

/// A temporary working directory for one test. It is removed afterwards, except when the test fails and
/// the environment variable `QCOW2_TEST_KEEP` is set (then its path, printed in failure messages, stays).
pub struct Work {
    dir: Option<tempfile::TempDir>,
}

impl Drop for Work {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("QCOW2_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}

impl Work {
    /// Creates a fresh temporary directory.
    pub fn new() -> Work {
        let dir = tempfile::Builder::new()
            .prefix("qcow2-oracle-")
            .tempdir()
            .expect("create temp dir");
        Work { dir: Some(dir) }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        // Invariant: `dir` is only taken in `drop`.
        self.dir
            .as_ref()
            .expect("work dir present until drop")
            .path()
    }

    /// Absolute path of `name` inside the directory.
    pub fn p(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// Creates a subdirectory.
    pub fn mkdir(&self, name: &str) {
        std::fs::create_dir_all(self.p(name)).expect("mkdir");
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args).current_dir(self.path());
        c
    }

    /// Runs qemu-img (no assertion).
    pub fn qemu_img_try(&self, args: &[&str], timeout: Duration) -> Out {
        run_with_timeout(self.cmd("qemu-img", args), timeout)
    }

    /// Runs qemu-img and asserts success.
    pub fn qemu_img(&self, args: &[&str]) -> Out {
        let o = self.qemu_img_try(args, ORACLE_TIMEOUT);
        o.assert_success();
        o
    }

    /// Runs qemu-io with the given image and `-c` commands, asserting success and that no command
    /// reported an error (qemu-io exits 0 even when a `-c` command fails).
    pub fn qemu_io(&self, extra: &[&str], image: &str, cmds: &[&str]) -> Out {
        let mut args: Vec<&str> = extra.to_vec();
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(image);
        let o = run_with_timeout(self.cmd("qemu-io", &args), ORACLE_TIMEOUT);
        o.assert_success();
        let text = format!("{}{}", o.stdout_str(), o.stderr);
        assert!(
            !text.contains("failed") && !text.contains("error") && !text.contains("Error"),
            "qemu-io reported an error: {}",
            o.describe()
        );
        o
    }

    /// Runs qemu-io allowing failure (e.g. `abort`).
    pub fn qemu_io_try(&self, extra: &[&str], image: &str, cmds: &[&str]) -> Out {
        let mut args: Vec<&str> = extra.to_vec();
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(image);
        run_with_timeout(self.cmd("qemu-io", &args), ORACLE_TIMEOUT)
    }

    /// Runs our binary (no assertion except that it did not panic or hang).
    pub fn qcow2_try(&self, args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Out {
        let mut c = self.cmd(qcow2_bin(), args);
        for (k, v) in envs {
            c.env(k, v);
        }
        let o = run_with_timeout(c, timeout);
        assert!(!o.timed_out, "our binary hung: {}", o.describe());
        assert!(!o.panicked(), "our binary panicked: {}", o.describe());
        o
    }

    /// Runs our binary under an address-space limit (via `prlimit`) and a time limit.
    pub fn qcow2_limited(&self, args: &[&str], timeout: Duration) -> Out {
        let as_arg = format!("--as={MEMORY_LIMIT}");
        let bin = qcow2_bin();
        let mut full: Vec<&str> = vec![&as_arg, "--"];
        let bin_s = bin.to_str().expect("utf-8 binary path");
        full.push(bin_s);
        full.extend_from_slice(args);
        run_with_timeout(self.cmd("prlimit", &full), timeout)
    }

    /// Writes `data` to a file in the directory.
    pub fn write_file(&self, name: &str, data: &[u8]) {
        std::fs::write(self.p(name), data).expect("write file");
    }

    /// Reads a whole file of the directory.
    pub fn read_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.p(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }
}

impl Default for Work {
    fn default() -> Self {
        Work::new()
    }
}

/// Parses JSON output, with a readable failure.
pub fn parse_json(out: &Out) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("output is not JSON ({e}): {}", out.describe()))
}

// ---------------------------------------------------------------------------------------------------------
// map

/// One extent of `map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl std::fmt::Display for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{{start {:#x} len {:#x} depth {} present {} zero {} data {} compressed {} offset {}}}",
            self.start,
            self.length,
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed,
            match self.offset {
                Some(o) => format!("{o:#x}"),
                None => "-".into(),
            }
        )
    }
}

/// Parses `map --output=json` into extents; `Err` says what is wrong.
pub fn parse_map(v: &Value) -> Result<Vec<Extent>, String> {
    let arr = v.as_array().ok_or("map JSON is not an array")?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, e) in arr.iter().enumerate() {
        let u = |k: &str| -> Result<u64, String> {
            e.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("extent {i}: missing/invalid integer {k:?}: {e}"))
        };
        let b = |k: &str| -> Result<bool, String> {
            e.get(k)
                .and_then(Value::as_bool)
                .ok_or_else(|| format!("extent {i}: missing/invalid bool {k:?}: {e}"))
        };
        let offset = match e.get("offset") {
            None | Some(Value::Null) => None,
            Some(o) => Some(
                o.as_u64()
                    .ok_or_else(|| format!("extent {i}: invalid offset: {e}"))?,
            ),
        };
        out.push(Extent {
            start: u("start")?,
            length: u("length")?,
            depth: u("depth")?,
            present: b("present")?,
            zero: b("zero")?,
            data: b("data")?,
            compressed: b("compressed")?,
            offset,
        });
    }
    Ok(out)
}

/// Merges adjacent extents that qemu-img would have merged (same flags and depth, contiguous host offset).
pub fn normalize_map(v: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        if e.length == 0 {
            continue;
        }
        if let Some(last) = out.last_mut() {
            let same = last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && last.compressed == e.compressed
                && last.start + last.length == e.start;
            let offs_ok = match (last.offset, e.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(last.length) == Some(b),
                _ => false,
            };
            if same && offs_ok {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// Compares two extent lists; `Err` describes the first difference with context.
pub fn diff_maps(qemu: &[Extent], ours: &[Extent]) -> Result<(), String> {
    let n = qemu.len().max(ours.len());
    for i in 0..n {
        if qemu.get(i) != ours.get(i) {
            let mut s = format!(
                "map differs at extent #{i} (qemu has {} extents, we have {}):\n",
                qemu.len(),
                ours.len()
            );
            let lo = i.saturating_sub(2);
            let hi = (i + 4).min(n);
            for j in lo..hi {
                let q = qemu.get(j).map_or("<none>".to_string(), |e| e.to_string());
                let o = ours.get(j).map_or("<none>".to_string(), |e| e.to_string());
                let mark = if j == i { ">>" } else { "  " };
                let _ = writeln!(s, "{mark} #{j}\n     qemu: {q}\n     ours: {o}");
            }
            return Err(s);
        }
    }
    Ok(())
}

/// Runs `map --output=json` with both tools on `image` and compares the extents.
pub fn compare_map(w: &Work, image: &str, envs: &[(&str, &str)]) -> Result<(), String> {
    let q = w.qemu_img(&["map", "--output=json", image]);
    let qv = parse_map(&parse_json(&q)).map_err(|e| format!("qemu-img map: {e}"))?;
    let o = w.qcow2_try(&["map", "--output=json", image], envs, ORACLE_TIMEOUT);
    if !o.success() {
        return Err(format!("our map failed: {}", o.describe()));
    }
    let ov: Value = serde_json::from_slice(&o.stdout)
        .map_err(|e| format!("our map output is not JSON ({e}): {}", o.describe()))?;
    let ov = parse_map(&ov).map_err(|e| format!("our map JSON: {e}"))?;
    diff_maps(&normalize_map(qv), &normalize_map(ov)).map_err(|e| format!("map of {image}: {e}"))
}

// ---------------------------------------------------------------------------------------------------------
// info

/// Top-level `info` keys the issue requires us to print whenever qemu-img prints them.
pub const INFO_KEYS: &[&str] = &[
    "virtual-size",
    "filename",
    "format",
    "cluster-size",
    "actual-size",
    "dirty-flag",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
];

/// `format-specific.data` keys the issue requires whenever qemu-img prints them.
pub const INFO_QCOW2_KEYS: &[&str] = &[
    "compat",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "compression-type",
    "data-file",
    "data-file-raw",
];

/// Compares one `info --output=json` object (no backing chain): every key both print must be equal, and
/// the keys the issue lists must be present in ours when qemu-img prints them.
pub fn diff_info(q: &Value, o: &Value, what: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let (Some(qo), Some(oo)) = (q.as_object(), o.as_object()) else {
        return vec![format!(
            "{what}: info JSON is not an object: qemu {q} / ours {o}"
        )];
    };
    for (k, qv) in qo {
        if k == "children" || k == "format-specific" {
            continue;
        }
        match oo.get(k) {
            Some(ov) if ov == qv => {}
            Some(ov) => errs.push(format!("{what}: key {k:?}: qemu {qv} / ours {ov}")),
            None if INFO_KEYS.contains(&k.as_str()) => {
                errs.push(format!("{what}: key {k:?} missing in ours (qemu: {qv})"))
            }
            None => {}
        }
    }
    for (k, ov) in oo {
        if INFO_KEYS.contains(&k.as_str()) && !qo.contains_key(k) {
            errs.push(format!("{what}: we print {k:?} = {ov}, qemu-img does not"));
        }
    }
    // Child nodes ("file", "data-file", ...), compared the same way when both print them.
    if let (Some(qc), Some(oc)) = (
        q.get("children").and_then(Value::as_array),
        o.get("children").and_then(Value::as_array),
    ) {
        let names = |c: &Vec<Value>| -> Vec<String> {
            c.iter()
                .map(|e| {
                    e.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                })
                .collect()
        };
        if names(qc) != names(oc) {
            errs.push(format!(
                "{what}: children: qemu {:?} / ours {:?}",
                names(qc),
                names(oc)
            ));
        } else {
            for (qe, oe) in qc.iter().zip(oc) {
                let name = qe.get("name").and_then(Value::as_str).unwrap_or("?");
                if let (Some(qi), Some(oi)) = (qe.get("info"), oe.get("info")) {
                    errs.extend(diff_info(qi, oi, &format!("{what} child {name:?}")));
                }
            }
        }
    }
    let qfs = q.get("format-specific");
    let ofs = o.get("format-specific");
    match (qfs, ofs) {
        (Some(qfs), Some(ofs)) => {
            if qfs.get("type") != ofs.get("type") {
                errs.push(format!(
                    "{what}: format-specific.type: qemu {:?} / ours {:?}",
                    qfs.get("type"),
                    ofs.get("type")
                ));
            }
            let qd = qfs.get("data").and_then(Value::as_object);
            let od = ofs.get("data").and_then(Value::as_object);
            if let (Some(qd), Some(od)) = (qd, od) {
                for (k, qv) in qd {
                    match od.get(k) {
                        Some(ov) if ov == qv => {}
                        Some(ov) => errs.push(format!(
                            "{what}: format-specific.data.{k}: qemu {qv} / ours {ov}"
                        )),
                        None if INFO_QCOW2_KEYS.contains(&k.as_str()) => errs.push(format!(
                            "{what}: format-specific.data.{k} missing in ours (qemu: {qv})"
                        )),
                        None => {}
                    }
                }
                for (k, ov) in od {
                    if INFO_QCOW2_KEYS.contains(&k.as_str()) && !qd.contains_key(k) {
                        errs.push(format!(
                            "{what}: we print format-specific.data.{k} = {ov}, qemu-img does not"
                        ));
                    }
                }
            } else if qd.is_some() {
                errs.push(format!("{what}: format-specific.data missing in ours"));
            }
        }
        (Some(qfs), None) if qfs.get("type").and_then(Value::as_str) == Some("qcow2") => {
            errs.push(format!("{what}: format-specific missing in ours"));
        }
        _ => {}
    }
    errs
}

/// Runs `info --output=json` (and with `--backing-chain`) with both tools and compares.
pub fn compare_info(w: &Work, image: &str, envs: &[(&str, &str)]) -> Result<(), String> {
    let mut errs = Vec::new();
    let q = w.qemu_img(&["info", "--output=json", image]);
    let o = w.qcow2_try(&["info", "--output=json", image], envs, ORACLE_TIMEOUT);
    if !o.success() {
        return Err(format!("our info failed: {}", o.describe()));
    }
    match serde_json::from_slice::<Value>(&o.stdout) {
        Ok(ov) => errs.extend(diff_info(&parse_json(&q), &ov, "info")),
        Err(e) => errs.push(format!(
            "our info output is not JSON ({e}): {}",
            o.describe()
        )),
    }
    let q = w.qemu_img(&["info", "--backing-chain", "--output=json", image]);
    let o = w.qcow2_try(
        &["info", "--backing-chain", "--output=json", image],
        envs,
        ORACLE_TIMEOUT,
    );
    if !o.success() {
        errs.push(format!("our info --backing-chain failed: {}", o.describe()));
    } else {
        match serde_json::from_slice::<Value>(&o.stdout) {
            Ok(ov) => {
                let qv = parse_json(&q);
                match (qv.as_array(), ov.as_array()) {
                    (Some(qa), Some(oa)) => {
                        if qa.len() != oa.len() {
                            errs.push(format!(
                                "info --backing-chain: qemu lists {} images, we list {}",
                                qa.len(),
                                oa.len()
                            ));
                        }
                        for (i, (qi, oi)) in qa.iter().zip(oa).enumerate() {
                            errs.extend(diff_info(qi, oi, &format!("info --backing-chain [{i}]")));
                        }
                    }
                    _ => errs.push(format!(
                        "info --backing-chain: expected JSON arrays: ours {}",
                        truncate(&ov.to_string(), 500)
                    )),
                }
            }
            Err(e) => errs.push(format!(
                "our info --backing-chain output is not JSON ({e}): {}",
                o.describe()
            )),
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!("info of {image}:\n  {}", errs.join("\n  ")))
    }
}

// ---------------------------------------------------------------------------------------------------------
// convert

/// Compares two files byte for byte; `Err` names the first difference.
pub fn diff_files(a: &Path, b: &Path, what_a: &str, what_b: &str) -> Result<(), String> {
    let ma = std::fs::metadata(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mb = std::fs::metadata(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let mut fa = std::fs::File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = std::fs::File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let mut msg = String::new();
    if ma.len() != mb.len() {
        let _ = write!(
            msg,
            "sizes differ: {what_a} {} bytes, {what_b} {} bytes; ",
            ma.len(),
            mb.len()
        );
    }
    const CHUNK: usize = 1 << 20;
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut pos: u64 = 0;
    let common = ma.len().min(mb.len());
    while pos < common {
        let n = (common - pos).min(CHUNK as u64) as usize;
        fa.read_exact(&mut ba[..n]).map_err(|e| e.to_string())?;
        fb.read_exact(&mut bb[..n]).map_err(|e| e.to_string())?;
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).expect("slices differ");
            // Extent of the difference within this chunk, for the report.
            let last = (0..n)
                .rev()
                .find(|&i| ba[i] != bb[i])
                .expect("slices differ");
            let ctx = |buf: &[u8]| {
                buf[i..(i + 16).min(n)]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let _ = write!(
                msg,
                "first difference at byte {:#x} (differences within [{:#x}, {:#x}] of the 1 MiB chunk \
                 at {:#x}); {what_a}: {} / {what_b}: {}",
                pos + i as u64,
                pos + i as u64,
                pos + last as u64,
                pos,
                ctx(&ba),
                ctx(&bb)
            );
            return Err(msg);
        }
        pos += n as u64;
    }
    if msg.is_empty() {
        Ok(())
    } else {
        Err(msg)
    }
}

/// Converts `image` to raw with both tools and compares the outputs byte for byte.
pub fn compare_convert(w: &Work, image: &str, envs: &[(&str, &str)]) -> Result<(), String> {
    let qraw = format!("{image}.qemu.raw");
    let oraw = format!("{image}.ours.raw");
    w.qemu_img(&["convert", "-O", "raw", image, &qraw]);
    let o = w.qcow2_try(
        &["convert", "-O", "raw", image, &oraw],
        envs,
        ORACLE_TIMEOUT,
    );
    if !o.success() {
        return Err(format!("our convert failed: {}", o.describe()));
    }
    let r = diff_files(&w.p(&qraw), &w.p(&oraw), "qemu-img", "ours")
        .map_err(|e| format!("convert -O raw of {image}: {e}"));
    let _ = std::fs::remove_file(w.p(&qraw));
    let _ = std::fs::remove_file(w.p(&oraw));
    r
}

/// Map and info only (for huge sparse images whose raw conversion would be too slow to compare).
pub fn check_map_info(w: &Work, image: &str) {
    let mut errs = Vec::new();
    if let Err(e) = compare_map(w, image, &[]) {
        errs.push(e);
    }
    if let Err(e) = compare_info(w, image, &[]) {
        errs.push(e);
    }
    assert!(
        errs.is_empty(),
        "oracle mismatch for {image}:\n{}",
        errs.join("\n")
    );
}

/// The full oracle check of one image: convert, map and info; panics listing every mismatch.
pub fn check_image(w: &Work, image: &str) {
    check_image_env(w, image, &[]);
}

/// As [`check_image`], with extra environment variables for our binary.
pub fn check_image_env(w: &Work, image: &str, envs: &[(&str, &str)]) {
    let mut errs = Vec::new();
    if let Err(e) = compare_convert(w, image, envs) {
        errs.push(e);
    }
    if let Err(e) = compare_map(w, image, envs) {
        errs.push(e);
    }
    if let Err(e) = compare_info(w, image, envs) {
        errs.push(e);
    }
    assert!(
        errs.is_empty(),
        "oracle mismatch for {image}:\n{}",
        errs.join("\n")
    );
}

/// Runs `args` + image with both tools and compares stdout exactly; returns every difference.
pub fn compare_human_output(w: &Work, args: &[&str], image: &str) -> Result<(), String> {
    let mut full: Vec<&str> = args.to_vec();
    full.push(image);
    // qemu-img can fail here (human `map` refuses compressed clusters); we must then fail too.
    let q = w.qemu_img_try(&full, ORACLE_TIMEOUT);
    let o = w.qcow2_try(&full, &[], ORACLE_TIMEOUT);
    if q.success() != o.success() {
        return Err(format!(
            "success differs: qemu-img: {}\nours: {}",
            q.describe(),
            o.describe()
        ));
    }
    let qs = q.stdout_str();
    let os = o.stdout_str();
    if qs == os {
        return Ok(());
    }
    let ql: Vec<&str> = qs.lines().collect();
    let ol: Vec<&str> = os.lines().collect();
    let mut msg = format!("`{}` output differs:\n", full.join(" "));
    for i in 0..ql.len().max(ol.len()) {
        let a = ql.get(i).copied().unwrap_or("<none>");
        let b = ol.get(i).copied().unwrap_or("<none>");
        if a != b {
            msg.push_str(&format!(
                "  line {}:\n    qemu: {a:?}\n    ours: {b:?}\n",
                i + 1
            ));
        }
    }
    Err(msg)
}

// ---------------------------------------------------------------------------------------------------------
// byte patching for malformed images

/// Reads a big-endian u32 at `off` of a file.
pub fn get_be32(path: &Path, off: u64) -> u32 {
    let d = std::fs::read(path).expect("read image");
    let o = off as usize;
    u32::from_be_bytes(d[o..o + 4].try_into().expect("4 bytes"))
}

/// Reads a big-endian u64 at `off` of a file.
pub fn get_be64(path: &Path, off: u64) -> u64 {
    let d = std::fs::read(path).expect("read image");
    let o = off as usize;
    u64::from_be_bytes(d[o..o + 8].try_into().expect("8 bytes"))
}

/// Writes `bytes` at `off` of a file (extending it if needed).
pub fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patching");
    f.write_all_at(bytes, off).expect("patch");
}

/// Writes a big-endian u32 at `off`.
pub fn put_be32(path: &Path, off: u64, v: u32) {
    patch(path, off, &v.to_be_bytes());
}

/// Writes a big-endian u64 at `off`.
pub fn put_be64(path: &Path, off: u64, v: u64) {
    patch(path, off, &v.to_be_bytes());
}

/// Finds header extension `magic` in a qcow2 image: returns (offset of its type field, data length).
pub fn find_header_extension(path: &Path, magic: u32) -> Option<(u64, u32)> {
    let d = std::fs::read(path).expect("read image");
    let be32 = |o: usize| u32::from_be_bytes(d[o..o + 4].try_into().expect("4 bytes"));
    let version = be32(4);
    let mut off = if version >= 3 { be32(100) as usize } else { 72 };
    let cluster_size = 1usize << be32(20);
    while off + 8 <= cluster_size.min(d.len()) {
        let t = be32(off);
        let len = be32(off + 4);
        if t == 0 {
            return None;
        }
        if t == magic {
            return Some((off as u64, len));
        }
        off += 8 + (len as usize).div_ceil(8) * 8;
    }
    None
}
