//! Test-only helpers shared by the workspace's crates: running QEMU's tools (`qemu-img`, `qemu-io`) as the
//! oracle, and temporary directories.
//!
//! Use it as a dev-dependency only. The helpers panic on failure with the command line and the tool's
//! stderr in the message, which is what a test wants; they are not for production code.
//!
//! Every command runs with a given directory as its working directory, so that relative image names
//! (and the backing/data file names QEMU resolves against the working directory) mean the same for
//! QEMU and for the code under test.
//!
//! Tests that need QEMU start with [`skip_without_qemu!`]: when `qemu-img` or `qemu-io` is not
//! installed they print a note on stderr and pass.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

pub use tempfile::TempDir;

/// Whether both `qemu-img` and `qemu-io` are installed and run (`--version` succeeds). Checked once per
/// test binary.
pub fn qemu_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let runs = |tool: &str| {
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        runs("qemu-img") && runs("qemu-io")
    })
}

/// Returns from the enclosing function (with the given value, if any) after a note on stderr when
/// [`qemu_available`] is false.
///
/// ```
/// fn against_qemu() {
///     qcow2_testkit::skip_without_qemu!();
///     // ... use qemu-img ...
/// }
///
/// fn fixture() -> Option<Vec<u8>> {
///     qcow2_testkit::skip_without_qemu!(None);
///     Some(Vec::new())
/// }
/// # against_qemu();
/// # let _ = fixture();
/// ```
#[macro_export]
macro_rules! skip_without_qemu {
    () => {
        $crate::skip_without_qemu!(())
    };
    ($ret:expr) => {
        if !$crate::qemu_available() {
            eprintln!("qemu-img/qemu-io not installed: skipping");
            return $ret;
        }
    };
}

/// A fresh temporary directory (removed when dropped), named `qcow2-test-*`.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcow2-test-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// A path as `&str`, for command lines. Panics on a non-UTF-8 path (test paths are ours).
pub fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", path.display()))
}

/// Runs `prog ARGS` in `dir` with stdin closed and `RUST_LOG` unset, and returns its output whatever the
/// exit status. Panics only when the program cannot be started.
pub fn run<S: AsRef<OsStr>>(dir: &Path, prog: impl AsRef<OsStr>, args: &[S]) -> Output {
    let prog = prog.as_ref();
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.to_string_lossy()))
}

/// Like [`run`], and asserts the exit status is 0 (the panic message holds the command line, stdout and
/// stderr).
pub fn run_ok<S: AsRef<OsStr>>(dir: &Path, prog: impl AsRef<OsStr>, args: &[S]) -> Output {
    let out = run(dir, prog.as_ref(), args);
    assert_success(&out, prog.as_ref(), args);
    out
}

/// Panics unless `out` (of `prog ARGS`) has exit status 0, with its stdout and stderr in the message.
pub fn assert_success<S: AsRef<OsStr>>(out: &Output, prog: impl AsRef<OsStr>, args: &[S]) {
    assert!(
        out.status.success(),
        "{} {:?} failed ({}):\n--- stdout:\n{}\n--- stderr:\n{}",
        prog.as_ref().to_string_lossy(),
        args.iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>(),
        out.status,
        stdout_text(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Standard output as (lossy) UTF-8.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS` in `dir`; asserts success (see [`run_ok`]).
pub fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run_ok(dir, "qemu-img", args)
}

/// `qemu-img create -q -f qcow2 [-o OPTIONS] [-b BACKING -F BACKING_FMT] NAME [SIZE]` in `dir`; asserts
/// success (see [`run_ok`]).
///
/// `options` is passed with `-o` unless empty; `backing` is `(file name, format)`. `size` may be empty
/// only with a backing file, whose size qemu-img then takes.
pub fn create_qcow2(
    dir: &Path,
    name: &str,
    size: &str,
    options: &str,
    backing: Option<(&str, &str)>,
) -> Output {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    if let Some((file, fmt)) = backing {
        args.extend(["-b", file, "-F", fmt]);
    }
    args.push(name);
    if !size.is_empty() {
        args.push(size);
    }
    qemu_img(dir, &args)
}

/// `qemu-io OPTS -c CMD1 -c CMD2 ... IMG` in `dir`; asserts success (see [`run_ok`]).
///
/// `opts` go before the commands, e.g. `&["-f", "qcow2"]`; with none, qemu-io probes the format.
pub fn qemu_io(dir: &Path, opts: &[&str], img: &str, cmds: &[&str]) -> Output {
    run_ok(dir, "qemu-io", &qemu_io_args(opts, img, cmds))
}

/// The argument list of [`qemu_io`], for a caller that expects the command to fail
/// (`run(dir, "qemu-io", &qemu_io_args(..))`).
pub fn qemu_io_args<'a>(opts: &[&'a str], img: &'a str, cmds: &[&'a str]) -> Vec<&'a str> {
    let mut args = opts.to_vec();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    args
}

/// The guest data of `img` (relative to `dir`, or absolute) as `qemu-img convert -O raw` writes it, that
/// is the whole virtual disk. `fmt` is passed as `-f` when given (qemu-img probes otherwise). The raw file
/// is written to a temporary directory of its own and removed afterwards.
pub fn qemu_img_raw(dir: &Path, img: &str, fmt: Option<&str>) -> Vec<u8> {
    let out_dir = temp_dir();
    let out = out_dir.path().join("qemu.raw");
    let mut args = vec!["convert"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.extend(["-O", "raw", img, path_str(&out)]);
    qemu_img(dir, &args);
    std::fs::read(&out).unwrap_or_else(|e| panic!("reading {}: {e}", out.display()))
}

/// `qemu-img map --output=json IMG` in `dir`, parsed (an array of extent objects).
pub fn qemu_map_json(dir: &Path, img: &str) -> serde_json::Value {
    let out = qemu_img(dir, &["map", "--output=json", img]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img map --output=json {img}: not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_io_args_order() {
        assert_eq!(
            qemu_io_args(&["-f", "qcow2"], "a.qcow2", &["write 0 1k", "abort"]),
            ["-f", "qcow2", "-c", "write 0 1k", "-c", "abort", "a.qcow2"]
        );
    }

    #[test]
    fn run_reports_failure_without_panicking() {
        let d = temp_dir();
        let out = run(d.path(), "sh", &["-c", "echo oops >&2; exit 3"]);
        assert_eq!(out.status.code(), Some(3));
        let err = std::panic::catch_unwind(|| assert_success(&out, "sh", &["x"]))
            .expect_err("assert_success must panic on a failure");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn raw_and_map_of_a_fresh_image() {
        skip_without_qemu!();
        let d = temp_dir();
        create_qcow2(d.path(), "a.qcow2", "1M", "cluster_size=4k", None);
        qemu_io(d.path(), &["-f", "qcow2"], "a.qcow2", &["write -P 7 0 4k"]);
        create_qcow2(d.path(), "b.qcow2", "", "", Some(("a.qcow2", "qcow2")));
        let info = qemu_img(d.path(), &["info", "--output=json", "b.qcow2"]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
        assert_eq!(info["virtual-size"], 1 << 20);
        assert_eq!(info["backing-filename"], "a.qcow2");
        let raw = qemu_img_raw(d.path(), "a.qcow2", Some("qcow2"));
        assert_eq!(raw.len(), 1 << 20);
        assert!(raw[..4096].iter().all(|&b| b == 7));
        assert!(raw[4096..].iter().all(|&b| b == 0));
        let map = qemu_map_json(d.path(), "a.qcow2");
        assert_eq!(map[0]["data"], true);
    }
}
