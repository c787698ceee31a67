//! The backend for current-thread (thread-per-core) runtimes: io_uring where the kernel allows it and
//! the code runs inside a tokio-uring runtime, the std backend otherwise.
//!
//! Whether io_uring works is probed once per process ([`uring_available`]: can a ring be created?
//! seccomp filters and `kernel.io_uring_disabled` make `io_uring_setup` fail with `EPERM`, old kernels
//! with `ENOSYS`). Whether the caller runs inside a tokio-uring runtime started by [`start_local`] is
//! checked at each open ([`in_uring_runtime`]). When either says no, [`LocalBackend::open`] uses [`StdFileBackend`] and logs
//! one `tracing::warn!` line per process saying why.
//!
//! [`start_local`] runs a future on the best current-thread runtime available: tokio-uring if possible,
//! else a plain Tokio current-thread runtime with a `LocalSet` (so `spawn_local` works in both).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Once, OnceLock};

use bytes::{Bytes, BytesMut};

use crate::{Backend, BackendOpen, HostStatus, OpenFlags, StdFileBackend, UringBackend};

/// Result of the one io_uring probe: `Err(reason)` when rings cannot be created.
static PROBE: OnceLock<Result<(), String>> = OnceLock::new();

/// Emits the fallback warning at most once per process.
static WARN_ONCE: Once = Once::new();

/// Which kind of runtime [`start_local`] is running on this thread, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalRuntime {
    Uring,
    Tokio,
}

thread_local! {
    static CURRENT: Cell<Option<LocalRuntime>> = const { Cell::new(None) };
}

fn probe() -> &'static Result<(), String> {
    PROBE.get_or_init(|| match tokio_uring::uring_builder().build(2) {
        Ok(_ring) => Ok(()),
        Err(e) => Err(format!("cannot create an io_uring instance: {e}")),
    })
}

/// Whether this process can create io_uring instances (probed once, then cached).
pub fn uring_available() -> bool {
    probe().is_ok()
}

/// Whether the calling code runs inside a tokio-uring runtime started by [`start_local`], where
/// [`UringBackend`] works.
///
/// tokio-uring offers no way to ask whether a future runs on its runtime (its operations panic outside
/// it), so the answer comes only from [`start_local`]'s thread marker: embedders that want io_uring run
/// their image tasks under [`start_local`]. Anywhere else this is false and [`LocalBackend`] uses the
/// std backend, which is always correct.
pub fn in_uring_runtime() -> bool {
    CURRENT.with(Cell::get) == Some(LocalRuntime::Uring)
}

/// Resets the thread's runtime marker when [`start_local`] returns or unwinds.
struct MarkerGuard(Option<LocalRuntime>);

impl Drop for MarkerGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Runs `future` to completion on a new current-thread runtime on this thread: tokio-uring when io_uring
/// works, else Tokio's current-thread runtime inside a `LocalSet` (after the one fallback warning).
///
/// Fails when no runtime can be built. Like `tokio_uring::start`, it must not be called from inside
/// another runtime.
pub fn start_local<F: Future>(future: F) -> io::Result<F::Output> {
    let previous = CURRENT.with(Cell::get);
    let _guard = MarkerGuard(previous);
    if uring_available() {
        match tokio_uring::Runtime::new(&tokio_uring::builder()) {
            Ok(rt) => {
                CURRENT.with(|c| c.set(Some(LocalRuntime::Uring)));
                return Ok(rt.block_on(future));
            }
            Err(e) => warn_fallback(&format!("cannot start a tokio-uring runtime: {e}")),
        }
    } else {
        warn_fallback(probe().as_ref().err().map_or("", String::as_str));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    CURRENT.with(|c| c.set(Some(LocalRuntime::Tokio)));
    let local = tokio::task::LocalSet::new();
    Ok(local.block_on(&rt, future))
}

fn warn_fallback(reason: &str) {
    WARN_ONCE.call_once(|| {
        tracing::warn!(
            "io_uring unavailable ({reason}); using the thread-pool file backend instead"
        );
    });
}

/// io_uring when available inside a tokio-uring runtime, else the std backend; for current-thread
/// runtimes (its futures are not `Send`). Cloning shares the file.
#[derive(Clone, Debug)]
pub enum LocalBackend {
    /// io_uring through tokio-uring.
    Uring(UringBackend),
    /// Blocking I/O on the crate's I/O thread pool (the std backend).
    Std(StdFileBackend),
}

impl LocalBackend {
    /// True for the io_uring variant.
    pub fn is_uring(&self) -> bool {
        matches!(self, LocalBackend::Uring(_))
    }
}

impl Backend for LocalBackend {
    async fn read_at(&self, buf: BytesMut, offset: u64) -> (io::Result<usize>, BytesMut) {
        match self {
            LocalBackend::Uring(b) => b.read_at(buf, offset).await,
            LocalBackend::Std(b) => b.read_at(buf, offset).await,
        }
    }

    async fn write_at(&self, buf: Bytes, offset: u64) -> io::Result<()> {
        match self {
            LocalBackend::Uring(b) => b.write_at(buf, offset).await,
            LocalBackend::Std(b) => b.write_at(buf, offset).await,
        }
    }

    async fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        match self {
            LocalBackend::Uring(b) => b.writev_at(bufs, offset).await,
            LocalBackend::Std(b) => b.writev_at(bufs, offset).await,
        }
    }

    async fn flush(&self) -> io::Result<()> {
        match self {
            LocalBackend::Uring(b) => b.flush().await,
            LocalBackend::Std(b) => b.flush().await,
        }
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            LocalBackend::Uring(b) => b.zero_range(offset, len).await,
            LocalBackend::Std(b) => b.zero_range(offset, len).await,
        }
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            LocalBackend::Uring(b) => b.punch_hole(offset, len).await,
            LocalBackend::Std(b) => b.punch_hole(offset, len).await,
        }
    }

    async fn len(&self) -> io::Result<u64> {
        match self {
            LocalBackend::Uring(b) => b.len().await,
            LocalBackend::Std(b) => b.len().await,
        }
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            LocalBackend::Uring(b) => b.set_len(len).await,
            LocalBackend::Std(b) => b.set_len(len).await,
        }
    }

    async fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        match self {
            LocalBackend::Uring(b) => b.host_status(offset, max_len).await,
            LocalBackend::Std(b) => b.host_status(offset, max_len).await,
        }
    }

    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        match self {
            LocalBackend::Uring(b) => b.allocated_size().await,
            LocalBackend::Std(b) => b.allocated_size().await,
        }
    }
}

impl BackendOpen for LocalBackend {
    /// Opens `path` with io_uring when [`uring_available`] and [`in_uring_runtime`], else with the std
    /// backend (logging the reason once per process).
    async fn open(path: &Path, flags: OpenFlags) -> io::Result<LocalBackend> {
        if uring_available() && in_uring_runtime() {
            return UringBackend::open(path, flags)
                .await
                .map(LocalBackend::Uring);
        }
        match probe() {
            Err(reason) => warn_fallback(reason),
            Ok(()) => warn_fallback("not running inside a tokio-uring runtime"),
        }
        StdFileBackend::open(path, flags)
            .await
            .map(LocalBackend::Std)
    }
}
