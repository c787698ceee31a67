//! Command-line syntax: qemu-img's options for `info`, `map`, `convert`, `compare` and `bench`.
//!
//! Long options take their value either as `--output=json` or `--output json`, short ones as `-f qcow2`
//! or `-fqcow2`, and options may follow the file names, as with qemu-img's getopt. File names are
//! collected as a list and counted by the commands so that the messages are qemu-img's ("Expecting one
//! image file name"). Parse errors become one line (see [`one_line`]).

use clap::{Args, Parser, Subcommand};

use crate::error::CliError;
use crate::size::parse_size;

/// The `qcow2` tool.
#[derive(Debug, Parser)]
#[command(
    name = "qcow2",
    version,
    about = "QCOW2 image tool speaking qemu-img's language"
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Display information about an image.
    Info(InfoArgs),
    /// Dump the image's allocation map.
    Map(MapArgs),
    /// Copy an image's content to a raw file.
    Convert(ConvertArgs),
    /// Check whether two images have the same content.
    Compare(CompareArgs),
    /// Run a simple read benchmark.
    Bench(BenchArgs),
    /// Run qemu-io commands (read, write, aio_write, discard, flush) on an image.
    Io(crate::io::IoArgs),
    /// Create a new image.
    Create(CreateArgs),
    /// Check an image for consistency (and repair it with `-r`).
    Check(CheckArgs),
}

/// `qcow2 check [-q] [-f FMT] [-r leaks|all] [--output human|json] [-T CACHE] [-U] FILENAME`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// `-f` and `--output`.
    #[command(flatten)]
    pub report: ReportArgs,
    /// Repair: `leaks` (lower refcounts that are too high) or `all` (also fix corruptions).
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    pub repair: Option<String>,
    /// Quiet: print nothing on standard output (the problems found still go to standard error).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode (accepted).
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Open in shared mode (accepted).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// `qcow2 create [-q] [-f FMT] [-b BACKING] [-F BACKING_FMT] [-o OPTIONS] FILENAME [SIZE]`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format: qcow2 or raw (default raw, as qemu-img).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Backing file (stored as given; relative names are relative to the new image).
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Format options, `key=value,...`; may be repeated (`-o help` lists them).
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Quiet: do not print the `Formatting` line.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The new image and its size.
    #[arg(value_name = "FILENAME [SIZE]")]
    pub files: Vec<String>,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// `[-f FMT] [--output human|json]`: the options of the reporting commands (`info`, `map`).
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Image format (qcow2 or raw); probed when absent.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human (default) or json.
    #[arg(long = "output", value_name = "human|json")]
    pub output: Option<String>,
}

impl ReportArgs {
    /// The `--output` style (see [`parse_output`]).
    pub fn output(&self) -> Result<Output, CliError> {
        parse_output(self.output.as_deref())
    }
}

/// `[-p] [-q]`: progress and quiet, for the copying commands (`convert`, `compare`).
#[derive(Debug, Args)]
pub struct Verbosity {
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
}

impl Verbosity {
    /// Whether to print progress: `-p` without `-q`.
    pub fn show_progress(&self) -> bool {
        self.progress && !self.quiet
    }
}

/// `qcow2 info [-f FMT] [--output human|json] [-b|--backing-chain] [-U] FILENAME`
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// `-f` and `--output`.
    #[command(flatten)]
    pub report: ReportArgs,
    /// Show the whole backing chain.
    #[arg(short = 'b', long = "backing-chain")]
    pub backing_chain: bool,
    /// Open in shared mode (accepted; images are opened read-only anyway).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// `qcow2 map [-f FMT] [--output human|json] [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME`
#[derive(Debug, Args)]
pub struct MapArgs {
    /// `-f` and `--output`.
    #[command(flatten)]
    pub report: ReportArgs,
    /// First guest offset to map.
    #[arg(long = "start-offset", value_name = "OFFSET", value_parser = size_arg)]
    pub start_offset: Option<u64>,
    /// Map at most this many bytes.
    #[arg(long = "max-length", value_name = "LENGTH", value_parser = size_arg)]
    pub max_length: Option<u64>,
    /// Open in shared mode (accepted).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// `qcow2 convert [-p] [-q] [-f FMT] [-O raw] [-S SPARSE] [-n] [-m N] [-W] [-t CACHE] [-T CACHE] [-U] SRC DST`
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// `-p` and `-q`.
    #[command(flatten)]
    pub verbosity: Verbosity,
    /// Source format (qcow2 or raw); probed when absent.
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format (only raw for now).
    #[arg(short = 'O', long = "target-format", value_name = "FMT")]
    pub output_format: Option<String>,
    /// Zero runs at least this long are left as holes (default 4k; 0 writes everything).
    #[arg(short = 'S', long = "min-sparse", value_name = "SIZE", value_parser = size_arg)]
    pub min_sparse: Option<u64>,
    /// Do not create the output; it must exist and be large enough.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// Number of parallel requests (1..=16, default 8).
    #[arg(short = 'm', long = "parallel", value_name = "N")]
    pub parallel: Option<String>,
    /// Out-of-order writes (accepted; writes are always unordered).
    #[arg(short = 'W', long = "allow-out-of-order")]
    pub out_of_order: bool,
    /// Output cache mode (accepted).
    #[arg(short = 't', long = "target-cache", value_name = "CACHE")]
    pub target_cache: Option<String>,
    /// Source cache mode (accepted).
    #[arg(short = 'T', long = "source-cache", value_name = "CACHE")]
    pub source_cache: Option<String>,
    /// Compress the output (not supported for raw).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Output options (none supported for raw).
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Option<String>,
    /// Open in shared mode (accepted).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Source image(s) and the output file.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// `qcow2 compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-T CACHE] [-U] FILE1 FILE2`
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    pub format_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    pub format_b: Option<String>,
    /// Strict mode: different sizes or block status also count as a difference.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// `-p` and `-q`.
    #[command(flatten)]
    pub verbosity: Verbosity,
    /// Cache mode (accepted).
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Open in shared mode (accepted).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The two images.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// `qcow2 bench [-c COUNT] [-d DEPTH] [-f FMT] [-n] [-o OFFSET] [-s SIZE] [-S STEP] [-t CACHE] [-i AIO] [-w] [-q] FILENAME`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of requests (default 75000).
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        allow_hyphen_values = true
    )]
    pub count: Option<String>,
    /// Requests in flight (default 64).
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "DEPTH",
        allow_hyphen_values = true
    )]
    pub depth: Option<String>,
    /// Image format; probed when absent.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// "Native" I/O: here, O_DIRECT (as `-t none`).
    #[arg(short = 'n', long = "native")]
    pub native: bool,
    /// First offset (default 0).
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    pub offset: Option<String>,
    /// Bytes per request (default 4096).
    #[arg(
        short = 's',
        long = "buffer-size",
        value_name = "BUFFER_SIZE",
        allow_hyphen_values = true
    )]
    pub bufsize: Option<String>,
    /// Offset increment (default: the request size).
    #[arg(
        short = 'S',
        long = "step-size",
        value_name = "STEP_SIZE",
        allow_hyphen_values = true
    )]
    pub step: Option<String>,
    /// Cache mode: none/directsync (O_DIRECT), writeback (default), writethrough, unsafe.
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// I/O engine: threads (default, multi-threaded runtime) or io_uring (tokio-uring).
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    pub aio: Option<String>,
    /// Write test (not supported yet).
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Write pattern (write mode only).
    #[arg(long = "pattern", value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Flush interval (write mode only).
    #[arg(long = "flush-interval", value_name = "INTERVAL")]
    pub flush_interval: Option<String>,
    /// Do not drain before flushing (write mode only).
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Open in shared mode (accepted).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// Parses a numeric `bench` option as qemu-img's `cvtnum_full` does: a size (suffixes allowed) within
/// `min..=max`, else `Invalid <what> specified. Must be between <min> and <max>.`
pub fn bench_number(
    what: &str,
    value: Option<&str>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, CliError> {
    let Some(text) = value else {
        return Ok(default);
    };
    match parse_size(text) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(CliError::Usage(format!(
            "Invalid {what} specified. Must be between {min} and {max}."
        ))),
    }
}

/// `--output` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Human-readable (default).
    Human,
    /// JSON.
    Json,
}

/// Parses `--output` as qemu-img does.
pub fn parse_output(value: Option<&str>) -> Result<Output, CliError> {
    match value {
        None | Some("human") => Ok(Output::Human),
        Some("json") => Ok(Output::Json),
        Some(other) => Err(CliError::Usage(format!(
            "--output expects 'human' or 'json' not '{other}'"
        ))),
    }
}

/// The single file name of a one-image command.
pub fn one_file(files: &[String]) -> Result<&str, CliError> {
    match files {
        [f] => Ok(f.as_str()),
        _ => Err(CliError::Usage("Expecting one image file name".into())),
    }
}

/// How the image is cached, from `-t`/`-T`: whether O_DIRECT is used.
pub fn cache_is_direct(mode: Option<&str>) -> Result<bool, CliError> {
    match mode {
        None | Some("writeback") | Some("writethrough") | Some("unsafe") => Ok(false),
        Some("none") | Some("off") | Some("directsync") => Ok(true),
        Some(_) => Err(CliError::Usage("Invalid cache mode".into())),
    }
}

/// A clap error as one line (without clap's `error: ` prefix, usage and hints).
pub fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid command line");
    first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("qcow2").chain(args.iter().copied()))
            .map_err(|e| one_line(&e))
    }

    #[test]
    fn output_syntaxes() {
        for args in [
            &["info", "--output=json", "x.qcow2"][..],
            &["info", "--output", "json", "x.qcow2"],
            &["info", "x.qcow2", "--output=json"],
        ] {
            match parse(args) {
                Ok(Cli {
                    command: Command::Info(a),
                }) => {
                    assert_eq!(a.report.output().ok(), Some(Output::Json));
                    assert_eq!(one_file(&a.files).ok(), Some("x.qcow2"));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            parse_output(Some("xml")).map_err(|e| e.to_string()),
            Err("--output expects 'human' or 'json' not 'xml'".to_string())
        );
    }

    #[test]
    fn short_options_with_attached_values() {
        match parse(&["map", "-fqcow2", "--output=json", "a"]) {
            Ok(Cli {
                command: Command::Map(a),
            }) => assert_eq!(a.report.format.as_deref(), Some("qcow2")),
            other => panic!("unexpected {other:?}"),
        }
        match parse(&["compare", "-f", "qcow2", "-F", "raw", "-s", "a", "b"]) {
            Ok(Cli {
                command: Command::Compare(a),
            }) => {
                assert_eq!(a.format_a.as_deref(), Some("qcow2"));
                assert_eq!(a.format_b.as_deref(), Some("raw"));
                assert!(a.strict);
                assert_eq!(a.files, vec!["a", "b"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse(&["convert", "-p", "-f", "qcow2", "-O", "raw", "a", "b"]) {
            Ok(Cli {
                command: Command::Convert(a),
            }) => {
                assert!(a.verbosity.progress);
                assert!(a.verbosity.show_progress());
                assert_eq!(a.output_format.as_deref(), Some("raw"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bench_options() {
        match parse(&[
            "bench", "-c", "1000", "-d", "8", "-s", "64k", "-S", "128k", "-o", "4k", "-t", "none",
            "-i", "io_uring", "x",
        ]) {
            Ok(Cli {
                command: Command::Bench(a),
            }) => {
                let n = |what: &str, v: &Option<String>| {
                    bench_number(what, v.as_deref(), 0, 0, u64::MAX).ok()
                };
                assert_eq!(n("count", &a.count), Some(1000));
                assert_eq!(n("depth", &a.depth), Some(8));
                assert_eq!(n("size", &a.bufsize), Some(65536));
                assert_eq!(n("step", &a.step), Some(131072));
                assert_eq!(n("offset", &a.offset), Some(4096));
                assert_eq!(a.aio.as_deref(), Some("io_uring"));
                assert_eq!(cache_is_direct(a.cache.as_deref()).ok(), Some(true));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn errors_are_one_line() {
        let e = parse(&["info", "--bogus", "x"]).err().unwrap_or_default();
        assert!(!e.contains('\n'));
        assert!(e.contains("--bogus"), "{e}");
        let e = parse(&["map", "--start-offset", "4x", "x"])
            .err()
            .unwrap_or_default();
        assert!(!e.contains('\n'));
        assert!(e.contains("4x"), "{e}");
        assert_eq!(
            bench_number("request count", Some("0"), 75000, 1, i32::MAX as u64)
                .map_err(|e| e.to_string()),
            Err("Invalid request count specified. Must be between 1 and 2147483647.".to_string())
        );
        assert_eq!(
            bench_number("request count", None, 75000, 1, 10).ok(),
            Some(75000)
        );
        assert_eq!(
            one_file(&[]).map_err(|e| e.to_string()),
            Err("Expecting one image file name".to_string())
        );
    }
}
