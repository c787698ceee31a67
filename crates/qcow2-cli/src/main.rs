//! `qcow2`: a command-line tool for QCOW2 images that speaks qemu-img's language.
//!
//! Commands: `info`, `map`, `convert`, `compare`, `bench` (read mode), `check`, with qemu-img's options and output
//! formats. Every error is one line on stderr, `qcow2: <message>`, and a non-zero exit status (1, or
//! qemu-img's codes for `compare`: 2 open failure, 3 block-status failure, 4 read failure; 63 for
//! `check` of a format without checks).
//!
//! The command logic lives in modules that do not depend on the engine (formatting, merging, compare,
//! convert and bench drivers over the [`source::BlockSource`] trait); `engine` adapts the engine to them.

mod args;
mod bench;
mod check;
mod compare;
mod convert;
mod create;
mod engine;
mod error;
mod info_fmt;
mod io;
mod localtime;
mod map_fmt;
mod progress;
mod qjson;
use qcow2_cli::size;
mod source;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::error::CliError;

fn main() {
    install_panic_hook();
    // Like qemu-img, die quietly when the reader of stdout goes away (`qcow2 map x | head`).
    // SAFETY: resetting a signal disposition to its default before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                let _ = e.print();
                std::process::exit(0);
            }
            clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                fail("Not enough arguments (try 'qcow2 --help')", 1)
            }
            _ => fail(&args::one_line(&e), 1),
        },
    };
    let is_compare = matches!(cli.command, Command::Compare(_));
    match run(cli.command) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let code = if is_compare {
                compare::error_exit_code(&e)
            } else {
                1
            };
            fail(&e.to_string(), code)
        }
    }
}

/// Prints `qcow2: <message>` on stderr and exits with `code`.
fn fail(message: &str, code: i32) -> ! {
    // One line, whatever the message holds.
    let line = message.replace('\n', " ");
    eprintln!("qcow2: {line}");
    std::process::exit(code)
}

/// A panic is a bug; still, print one line instead of a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "qcow2: internal error (this is a bug): {}{location}",
            msg.replace('\n', " ")
        );
    }));
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
}

fn run(command: Command) -> Result<i32, CliError> {
    use qcow2_io::{LocalBackend, StdFileBackend};

    if let Command::Io(a) = &command {
        return io::run(a);
    }

    if let Command::Bench(a) = &command {
        let plan = engine::bench_plan(a)?;
        if plan.uring {
            return qcow2_io::start_local(engine::bench::<LocalBackend>(a, &plan))
                .map_err(|e| CliError::other(format!("cannot start the I/O runtime: {e}")))?;
        }
        return multi_thread()?.block_on(engine::bench_threads(a, &plan));
    }
    let rt = multi_thread()?;
    rt.block_on(async {
        match &command {
            Command::Info(a) => engine::info::<StdFileBackend>(a).await,
            Command::Map(a) => engine::map::<StdFileBackend>(a).await,
            Command::Convert(a) => engine::convert::<StdFileBackend>(a).await,
            Command::Compare(a) => engine::compare::<StdFileBackend>(a).await,
            Command::Bench(_) | Command::Io(_) => Err(CliError::other("handled above")),
            Command::Create(a) => create::create::<StdFileBackend>(a).await,
            Command::Check(a) => check::check::<StdFileBackend>(a).await,
        }
    })
}

fn multi_thread() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::other(format!("cannot start the I/O runtime: {e}")))
}
