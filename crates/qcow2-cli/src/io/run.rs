//! Running `qcow2 io` commands against an opened image: the command loop, aio requests, the exit status.
//!
//! Commands run in order, each awaited before the next, except `aio_write`: its request is issued and
//! kept in a set of pending futures that is polled together with whatever runs next (later commands, or
//! the wait for the next line of standard input), so aio writes overlap each other and later commands
//! as in qemu-io. `aio_flush` waits until the set is empty; so does the end of the script. Everything
//! runs on the current task (no `spawn`), which keeps the loop the same on the multi-threaded runtime
//! (std backend) and on tokio-uring (whose futures are not `Send`).
//!
//! Exit status as qemu-io's: 1 when any command failed or was refused (bad syntax, I/O error, pattern
//! mismatch), 0 otherwise; a failed aio request is reported but, as in qemu-io, does not change it.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use qcow2_engine::{Error, Image};
use qcow2_io::Backend;

use super::parse::{self, IoCommand, PatternCheck, WriteData};
use super::report;

/// What one command (or one completed aio request) prints, and whether it failed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Text for standard output.
    pub stdout: String,
    /// Text for standard error.
    pub stderr: String,
    /// The command failed (counts for the exit status).
    pub failed: bool,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome {
            stdout,
            ..Outcome::default()
        }
    }

    fn fail(stdout: String) -> Outcome {
        Outcome {
            stdout,
            stderr: String::new(),
            failed: true,
        }
    }
}

/// An issued aio request.
type Pending = Pin<Box<dyn Future<Output = Outcome>>>;

/// Where the command lines come from: the `-c` options, or standard input (read by a helper thread so
/// that pending aio requests keep running while a line is awaited).
pub enum Source {
    /// The `-c` commands, in order.
    Lines(VecDeque<String>),
    /// Lines of standard input, with qemu-io's prompt printed before each.
    Stdin(tokio::sync::mpsc::UnboundedReceiver<String>),
}

impl Source {
    /// Reads standard input on a thread of its own, one line at a time.
    pub fn stdin() -> Source {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(std::mem::take(&mut line)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Source::Stdin(rx)
    }
}

/// Prints outcomes as they come. Write errors on stdout/stderr are ignored: a closed pipe ends the
/// process through SIGPIPE (restored to its default in `main`), and nothing else can be reported.
struct Printer;

impl Printer {
    fn emit(&self, o: &Outcome) {
        if !o.stdout.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out
                .write_all(o.stdout.as_bytes())
                .and_then(|()| out.flush());
        }
        if !o.stderr.is_empty() {
            let _ = std::io::stderr().lock().write_all(o.stderr.as_bytes());
        }
    }

    fn prompt(&self) {
        // qemu-io prints its prompt before each line it reads from standard input, terminal or not;
        // the same text keeps the two tools' outputs comparable line for line.
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"qemu-io> ").and_then(|()| out.flush());
    }
}

/// Awaits `fut` while also driving the pending aio requests, printing each one that completes.
async fn drive<F: Future>(
    pending: &mut FuturesUnordered<Pending>,
    p: &Printer,
    fut: F,
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    loop {
        if pending.is_empty() {
            return fut.await;
        }
        tokio::select! {
            biased;
            out = &mut fut => return out,
            Some(done) = pending.next() => p.emit(&done),
        }
    }
}

/// Runs the whole session: every command of `source`, then waits for pending aio requests and, for a
/// read-write image, closes it (qemu-io closes the image at exit, which flushes it). Returns the exit
/// status.
pub async fn session<B: Backend + 'static>(
    image: Image<B>,
    read_only: bool,
    mut source: Source,
) -> i32 {
    let printer = Printer;
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut failed = false;
    loop {
        let line = match &mut source {
            Source::Lines(lines) => lines.pop_front(),
            Source::Stdin(rx) => {
                printer.prompt();
                drive(&mut pending, &printer, rx.recv()).await
            }
        };
        let Some(line) = line else { break };
        let first = parse::words(&line).first().copied().unwrap_or_default();
        if read_only && IoCommand::needs_write(first) {
            // qemu-io asks for write permission before it looks at the options.
            printer.emit(&Outcome {
                stderr: "qcow2: Block node is read-only\n".into(),
                ..Outcome::default()
            });
            failed = true;
            continue;
        }
        let cmd = match parse::parse(&line) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => continue,
            Err(refusal) => {
                printer.emit(&Outcome {
                    stdout: refusal.stdout,
                    stderr: refusal.stderr,
                    failed: true,
                });
                failed = true;
                continue;
            }
        };
        match cmd {
            IoCommand::Quit => break,
            IoCommand::AioFlush => {
                while let Some(done) = pending.next().await {
                    printer.emit(&done);
                }
            }
            IoCommand::AioWrite {
                offset,
                len,
                data,
                quiet,
            } => {
                let img = image.clone();
                pending.push(Box::pin(async move {
                    let mut o = write(&img, "aio_write", offset, len, data, quiet).await;
                    // A failed aio request is reported but does not change qemu-io's exit status.
                    o.failed = false;
                    o
                }));
            }
            cmd => {
                let o = drive(&mut pending, &printer, execute(&image, cmd)).await;
                failed |= o.failed;
                printer.emit(&o);
            }
        }
    }
    while let Some(done) = pending.next().await {
        printer.emit(&done);
    }
    if !read_only {
        if let Err(e) = image.close().await {
            printer.emit(&Outcome {
                stderr: format!("qcow2: closing {} failed: {e}\n", image.filename()),
                ..Outcome::default()
            });
            failed = true;
        }
    }
    i32::from(failed)
}

/// qemu's request check: past the end of the disk is `EIO`, reported as qemu-io reports it.
fn in_range<B: Backend>(image: &Image<B>, offset: u64, len: u64) -> bool {
    let size = image.virtual_size();
    offset <= size && size - offset >= len
}

/// The `<op> failed: <why>` line; out-of-range requests say what qemu-io says (`Input/output error`).
fn failed_line(op: &str, e: &Error) -> String {
    match e {
        Error::OutOfRange { .. } => format!("{op} failed: Input/output error\n"),
        e => format!("{op} failed: {e}\n"),
    }
}

/// Runs one synchronous command.
async fn execute<B: Backend>(image: &Image<B>, cmd: IoCommand) -> Outcome {
    match cmd {
        IoCommand::Read {
            offset,
            len,
            check,
            verbose,
            quiet,
        } => read(image, offset, len, check, verbose, quiet).await,
        IoCommand::Write {
            compressed: true, ..
        } => Outcome::fail(
            "write failed: Operation not supported (compressed writes are not implemented)\n"
                .into(),
        ),
        IoCommand::Write {
            offset,
            len,
            data,
            quiet,
            ..
        } => write(image, "write", offset, len, data, quiet).await,
        IoCommand::Discard { offset, len, quiet } => {
            if !in_range(image, offset, len) {
                return Outcome::fail("discard failed: Input/output error\n".into());
            }
            let t = Instant::now();
            let r = if len == 0 {
                Ok(())
            } else {
                image.discard(offset, len).await
            };
            match r {
                Err(e) => Outcome::fail(failed_line("discard", &e)),
                Ok(()) if quiet => Outcome::default(),
                Ok(()) => Outcome::ok(report::report("discard", t.elapsed(), offset, len)),
            }
        }
        IoCommand::Flush => match image.flush().await {
            Ok(()) => Outcome::default(),
            // qemu-io prints nothing here and only sets the exit status; a line saying why helps more.
            Err(e) => Outcome::fail(failed_line("flush", &e)),
        },
        // Handled by the command loop.
        IoCommand::AioWrite { .. } | IoCommand::AioFlush | IoCommand::Quit => Outcome::default(),
    }
}

async fn read<B: Backend>(
    image: &Image<B>,
    offset: u64,
    len: u64,
    check: Option<PatternCheck>,
    verbose: bool,
    quiet: bool,
) -> Outcome {
    if !in_range(image, offset, len) {
        return Outcome::fail("read failed: Input/output error\n".into());
    }
    // len <= MAX_REQUEST (checked by the parser), so it fits in memory terms of usize.
    let Ok(n) = usize::try_from(len) else {
        return Outcome::fail("read failed: Cannot allocate memory\n".into());
    };
    let mut buf = vec![0u8; n];
    let t = Instant::now();
    let r = if n == 0 {
        Ok(())
    } else {
        image.read(offset, &mut buf).await
    };
    let elapsed = t.elapsed();
    if let Err(e) = r {
        return Outcome::fail(failed_line("read", &e));
    }
    let mut o = Outcome::default();
    if let Some(c) = check {
        // The parser checked offset + len <= the read length.
        let range = usize::try_from(c.offset)
            .ok()
            .zip(usize::try_from(c.offset + c.len).ok())
            .and_then(|(a, b)| buf.get(a..b));
        if range.is_none_or(|r| r.iter().any(|&b| b != c.byte)) {
            o.stdout.push_str(&format!(
                "Pattern verification failed at offset {}, {} bytes\n",
                offset + c.offset,
                c.len
            ));
            o.failed = true;
        }
    }
    if quiet {
        return o;
    }
    if verbose {
        o.stdout.push_str(&report::dump(&buf, offset));
    }
    o.stdout
        .push_str(&report::report("read", elapsed, offset, len));
    o
}

/// `write` and `aio_write`: a pattern buffer (aligned, so that an `O_DIRECT` image takes it without a
/// bounce) or a zero write.
async fn write<B: Backend>(
    image: &Image<B>,
    op: &str,
    offset: u64,
    len: u64,
    data: WriteData,
    quiet: bool,
) -> Outcome {
    if !in_range(image, offset, len) {
        return Outcome::fail(format!("{op} failed: Input/output error\n"));
    }
    let t = Instant::now();
    let r = match data {
        _ if len == 0 => Ok(()),
        WriteData::Zeroes { unmap } => image.write_zeroes(offset, len, unmap).await,
        WriteData::Pattern(byte) => match usize::try_from(len) {
            Ok(n) => {
                let mut buf = qcow2_io::aligned::aligned_bytes_mut(n);
                buf.fill(byte);
                image.write_bytes(offset, buf.freeze()).await
            }
            Err(_) => {
                return Outcome::fail(format!("{op} failed: Cannot allocate memory\n"));
            }
        },
    };
    match r {
        Err(e) => Outcome::fail(failed_line(op, &e)),
        Ok(()) if quiet => Outcome::default(),
        Ok(()) => Outcome::ok(report::report("wrote", t.elapsed(), offset, len)),
    }
}
