//! `qcow2 check [-q] [-f FMT] [-r leaks|all] [--output human|json] [-T CACHE] [-U] FILENAME`.
//!
//! The engine's [`qcow2_engine::check_file`] does the work; this module prints its report exactly as
//! `qemu-img check` does:
//!
//! - standard error: the problems of the repair pass (when a repair ran and a second pass re-checked the
//!   image), then the problems of the final pass, one line each (`Leaked cluster 5 refcount=2
//!   reference=1`, `ERROR cluster 9 refcount=0 reference=1`, ...); `-q` does not silence them;
//! - standard output (nothing with `-q`): after a repair that fixed anything, "The following
//!   inconsistencies were found and repaired: ..." and "Double checking the fixed image now...", then
//!   the human summary or the JSON object;
//! - exit code: 1 when the check could not complete (with `Check failed` on stderr, and nothing on
//!   standard output when it stopped early: [`CheckReport::failed`]), else 2 with
//!   corruptions, else 3 with leaks, else 0; after a repair the code reflects the re-check. A raw image has
//!   nothing to check: "This image format does not support checks", exit code 63.
//!
//! The JSON object is printed with QEMU's pretty printer ([`crate::qjson`]); its members come in the order
//! of QEMU's hash table (the order qemu-img prints them in), and every count that is zero is left out,
//! except `check-errors`.

use std::io::{Read, Write};
use std::path::Path;

use qcow2_engine::{check_file, CheckReport, Error, ImageFormat, Repair};
use qcow2_io::BackendOpen;

use crate::args::{self, CheckArgs, Output};
use crate::error::CliError;
use crate::qjson::Json;

/// Exit code of `qemu-img check` for a format that has no check (raw).
pub const NO_CHECK_EXIT: i32 = 63;

/// The message that goes with [`NO_CHECK_EXIT`].
pub const NO_CHECK_MESSAGE: &str = "This image format does not support checks";

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Parses `-r` as qemu-img does.
pub fn parse_repair(value: Option<&str>) -> Result<Repair, CliError> {
    match value {
        None => Ok(Repair::None),
        Some("leaks") => Ok(Repair::Leaks),
        Some("all") => Ok(Repair::All),
        Some(other) => Err(CliError::Usage(format!(
            "--repair (-r) expects 'leaks' or 'all' not '{other}'"
        ))),
    }
}

/// `qcow2 check`.
pub async fn check<B: BackendOpen>(a: &CheckArgs) -> Result<i32, CliError> {
    let output = a.report.output()?;
    let repair = parse_repair(a.repair.as_deref())?;
    args::cache_is_direct(a.cache.as_deref())?;
    let path = args::one_file(&a.files)?;
    let format = match a.report.format.as_deref() {
        None => None,
        Some(name) => Some(ImageFormat::from_name(name).ok_or_else(|| CliError::Open {
            path: path.to_string(),
            reason: format!("Unknown driver '{name}'"),
        })?),
    };
    // A raw image has nothing to check. When the file cannot be read, the engine's open says why.
    let is_raw = match format {
        Some(f) => f == ImageFormat::Raw && Path::new(path).exists(),
        None => probe_is_raw(path),
    };
    if is_raw {
        eprintln!("qcow2: {NO_CHECK_MESSAGE}");
        return Ok(NO_CHECK_EXIT);
    }
    // `-f qcow2` on a readable file without the magic: qemu-img cannot open it as qcow2.
    if format == Some(ImageFormat::Qcow2) && probe_is_raw(path) {
        return Err(CliError::Open {
            path: path.to_string(),
            reason: "Image is not in qcow2 format".into(),
        });
    }
    let report = check_file::<B>(Path::new(path), format, repair)
        .await
        .map_err(|e| engine_error(path, e))?;
    Ok(print_report(&report, output, a.quiet))
}

/// Whether the file at `path` is readable and does not start with the qcow2 magic.
fn probe_is_raw(path: &str) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    if !file.metadata().is_ok_and(|m| !m.is_dir()) {
        return false;
    }
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    got < magic.len() || magic != QCOW2_MAGIC
}

/// The CLI error for an engine error: a failure to open the image, or (an I/O error once the image is
/// open, or something the check cannot handle) `Check failed: <reason>`, as qemu-img.
fn engine_error(path: &str, e: Error) -> CliError {
    let text = e.to_string();
    let reason = text
        .strip_prefix(&format!("{path}: "))
        .map(str::to_string)
        .unwrap_or_else(|| text.clone());
    match &e {
        Error::Io { op, source, .. } if !is_open_op(op) => {
            CliError::other(format!("Check failed: {}", strerror(source)))
        }
        Error::Unsupported { .. } => CliError::other(format!("Check failed: {reason}")),
        _ => CliError::Open {
            path: path.to_string(),
            reason,
        },
    }
}

/// Whether an engine I/O operation belongs to opening the image (its failure is "Could not open").
fn is_open_op(op: &str) -> bool {
    ["open", "stat", "get length", "read header", "read magic"]
        .iter()
        .any(|p| op.starts_with(p))
}

/// An OS error as C's `strerror` words it (without Rust's " (os error N)").
fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Prints the report (stderr lines, then stdout) and returns qemu-img's exit code.
pub fn print_report(report: &CheckReport, output: Output, quiet: bool) -> i32 {
    let stderr_lines = |lines: &[String]| {
        let mut err = std::io::stderr().lock();
        for line in lines {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    };
    let stdout_text = |text: &str| {
        if !quiet {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    };
    if let Some(reason) = &report.failed {
        // The check could not complete: qemu-img prints the problem lines and the reason only.
        stderr_lines(&report.repair_messages);
        stderr_lines(&report.messages);
        eprintln!("qcow2: Check failed: {reason}");
        return report.exit_code();
    }
    if report.repaired() {
        stderr_lines(&report.repair_messages);
        if output == Output::Human {
            stdout_text(&repaired_banner(report));
        }
    }
    stderr_lines(&report.messages);
    match output {
        Output::Human => stdout_text(&render_human(report)),
        Output::Json => stdout_text(&format!("{}\n", render_json(report).to_pretty())),
    }
    if report.check_errors > 0 {
        eprintln!("qcow2: Check failed");
    }
    report.exit_code()
}

/// "The following inconsistencies were found and repaired: ...", printed after a repair (human output).
pub fn repaired_banner(report: &CheckReport) -> String {
    format!(
        "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
        report.leaks_fixed, report.corruptions_fixed
    )
}

/// The human summary, as qemu-img's `dump_human_image_check`.
pub fn render_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| format!("{:.2}", n as f64 * 100.0 / d as f64);
        s.push_str(&format!(
            "{}/{} = {}% allocated, {}% fragmented, {}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters),
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// The JSON object, members in qemu-img's order, zero counts (except `check-errors`) left out.
pub fn render_json(r: &CheckReport) -> Json {
    let nonzero = |v: u64| (v != 0).then_some(Json::UInt(v));
    let mut o = Json::object();
    o.push_opt("image-end-offset", nonzero(r.image_end_offset));
    o.push_opt("compressed-clusters", nonzero(r.compressed_clusters));
    o.push_opt("total-clusters", nonzero(r.total_clusters));
    o.push_opt("corruptions", nonzero(r.corruptions));
    o.push_opt("corruptions-fixed", nonzero(r.corruptions_fixed));
    o.push("check-errors", Json::UInt(r.check_errors));
    o.push_opt("leaks", nonzero(r.leaks));
    o.push_opt("leaks-fixed", nonzero(r.leaks_fixed));
    o.push_opt("allocated-clusters", nonzero(r.allocated_clusters));
    o.push("filename", Json::Str(r.filename.clone()));
    o.push("format", Json::Str(r.format.clone()));
    o.push_opt("fragmented-clusters", nonzero(r.fragmented_clusters));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> CheckReport {
        CheckReport {
            filename: "c1.qcow2".into(),
            format: "qcow2".into(),
            image_end_offset: 655360,
            total_clusters: 160,
            allocated_clusters: 5,
            ..CheckReport::default()
        }
    }

    #[test]
    fn clean_human_and_json() {
        let r = report();
        assert_eq!(
            render_human(&r),
            "No errors were found on the image.\n5/160 = 3.12% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 655360\n"
        );
        assert_eq!(
            render_json(&r).to_pretty(),
            "{\n    \"image-end-offset\": 655360,\n    \"total-clusters\": 160,\n    \"check-errors\": 0,\n    \"allocated-clusters\": 5,\n    \"filename\": \"c1.qcow2\",\n    \"format\": \"qcow2\"\n}"
        );
    }

    #[test]
    fn corruptions_and_leaks() {
        let r = CheckReport {
            corruptions: 1,
            leaks: 1,
            ..report()
        };
        assert_eq!(
            render_human(&r),
            "\n1 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n5/160 = 3.12% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 655360\n"
        );
        assert_eq!(r.exit_code(), 2);
        let json = render_json(&r).to_pretty();
        assert!(json.contains("\"corruptions\": 1,\n    \"check-errors\": 0,\n    \"leaks\": 1,"));
    }

    #[test]
    fn empty_image_has_no_allocation_line() {
        let r = CheckReport {
            image_end_offset: 262144,
            total_clusters: 16,
            allocated_clusters: 0,
            ..report()
        };
        assert_eq!(
            render_human(&r),
            "No errors were found on the image.\nImage end offset: 262144\n"
        );
    }

    #[test]
    fn repair_option() {
        assert_eq!(parse_repair(Some("all")).ok(), Some(Repair::All));
        assert_eq!(parse_repair(Some("leaks")).ok(), Some(Repair::Leaks));
        assert_eq!(parse_repair(None).ok(), Some(Repair::None));
        assert_eq!(
            parse_repair(Some("foo")).map_err(|e| e.to_string()),
            Err("--repair (-r) expects 'leaks' or 'all' not 'foo'".to_string())
        );
    }
}
