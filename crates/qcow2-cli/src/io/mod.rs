//! `qcow2 io`: the subset of qemu-io that tests and users need, with qemu-io's syntax, output and exit
//! status.
//!
//! ```text
//! qcow2 io [-f FMT] [-c CMD]... [-r] [-U] [-i threads|io_uring] [-t CACHE] [-n] IMG
//! ```
//!
//! Commands (see [`parse`]): `read`, `write`, `aio_write`, `aio_flush`, `discard`, `flush`, `quit`.
//! With no `-c`, command lines are read from standard input (as qemu-io does), which is also how long
//! scripts are passed without hitting the command-line length limit. `-i threads` (default, as
//! qemu-io) runs the std-file backend on the multi-threaded runtime; `-i io_uring` the local backend on
//! tokio-uring. `-t none` (or `-n`) opens with `O_DIRECT`. A read-write image is always closed at the
//! end (flush, refcounts written, dirty bit cleared), as qemu-io closes its image.

mod parse;
mod report;
mod run;

use clap::Args;
use qcow2_engine::{Image, ImageFormat, OpenOptions};
use qcow2_io::BackendOpen;

use crate::args;
use crate::error::CliError;

/// `qcow2 io [-f FMT] [-c CMD]... [-r] [-U] [-i AIO] [-t CACHE] [-n] FILENAME`
#[derive(Debug, Args)]
pub struct IoArgs {
    /// A command to run (repeatable, run in order); without any, commands are read from stdin.
    #[arg(
        short = 'c',
        long = "cmd",
        value_name = "COMMAND",
        allow_hyphen_values = true
    )]
    pub commands: Vec<String>,
    /// Image format (qcow2 or raw); probed when absent.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Force shared permissions (accepted; no locking is done).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// I/O engine: threads (default) or io_uring.
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    pub aio: Option<String>,
    /// Cache mode: none/directsync (O_DIRECT), writeback (default), writethrough, unsafe.
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Bypass the host page cache (same as `-t none`).
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// The image.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// Runs `qcow2 io`: picks the backend and runtime from `-i`, opens the image, runs the commands.
pub fn run(a: &IoArgs) -> Result<i32, CliError> {
    let path = args::one_file(&a.files)?.to_string();
    let direct = a.nocache || args::cache_is_direct(a.cache.as_deref())?;
    let uring = match a.aio.as_deref() {
        None | Some("threads") => false,
        // Linux AIO ("native") is not implemented; io_uring is the closest.
        Some("io_uring") | Some("native") => true,
        Some(other) => return Err(CliError::Usage(format!("Invalid aio option: {other}"))),
    };
    let format = match a.format.as_deref() {
        None => None,
        Some(name) => Some(ImageFormat::from_name(name).ok_or_else(|| {
            CliError::other(format!("can't open device {path}: Unknown driver '{name}'"))
        })?),
    };
    // Future engine options keep their defaults.
    #[allow(clippy::needless_update)]
    let opts = OpenOptions {
        read_only: a.read_only,
        format,
        follow_backing: true,
        direct,
        // As every command of the tool: QCOW2_L2_CACHE_SIZE sets the L2 cache (tests use a tiny one to
        // exercise evictions of dirty slices).
        l2_cache_bytes: crate::engine::l2_cache_from_env()?,
        ..OpenOptions::default()
    };
    let source = if a.commands.is_empty() {
        run::Source::stdin()
    } else {
        run::Source::Lines(a.commands.iter().cloned().collect())
    };
    let read_only = a.read_only;
    if uring {
        qcow2_io::start_local(async move {
            let image = open::<qcow2_io::LocalBackend>(&path, &opts).await?;
            Ok(run::session(image, read_only, source).await)
        })
        .map_err(|e| CliError::other(format!("cannot start the I/O runtime: {e}")))?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::other(format!("cannot start the I/O runtime: {e}")))?
            .block_on(async move {
                let image = open::<qcow2_io::StdFileBackend>(&path, &opts).await?;
                Ok(run::session(image, read_only, source).await)
            })
    }
}

/// Opens the image (and its backing chain, read-only); the error is qemu-io's
/// `can't open device IMG: Could not open 'IMG': <why>`.
async fn open<B: BackendOpen + 'static>(
    path: &str,
    opts: &OpenOptions,
) -> Result<Image<B>, CliError> {
    Image::<B>::open(path, opts).await.map_err(|e| {
        let text = e.to_string();
        let reason = text
            .strip_prefix(&format!("{path}: "))
            .map(str::to_string)
            .unwrap_or(text);
        CliError::other(format!(
            "can't open device {path}: Could not open '{path}': {reason}"
        ))
    })
}
