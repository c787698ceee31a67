//! Storage backends for the qcow2 engine.
//!
//! The engine talks to storage only through [`Backend`]: positioned, owned-buffer I/O (the shape io_uring
//! needs, since the kernel holds the buffer while the operation runs), flush as `fdatasync`, and the
//! space-management calls (`zero_range`, `punch_hole`, `set_len`).
//!
//! Implementations:
//! - [`StdFileBackend`]: blocking positioned I/O run off the runtime threads (an I/O thread pool); works on
//!   any Tokio runtime, multi-threaded included. Its futures are `Send`.
//! - [`UringBackend`]: io_uring through tokio-uring; only inside a tokio-uring runtime
//!   (current-thread, thread-per-core). Its futures are not `Send`.
//! - [`MemoryBackend`]: a growable byte vector, for tests and fuzzing.
//! - [`FaultBackend`]: an in-memory backend that simulates power cuts, injects I/O errors and completes
//!   operations in a seeded order, for crash-consistency and deterministic-simulation tests.
//! - [`LocalBackend`]: io_uring when the kernel allows it, else the std backend, chosen at open with one
//!   log line; for current-thread runtimes.
//!
//! The trait uses `async fn` in traits without a `Send` bound: code generic over `B: Backend` is `Send`
//! exactly when `B`'s futures are, which the compiler checks at the concrete type. That lets one generic
//! engine serve the multi-threaded runtime (std backend) and thread-per-core io_uring.

// `Backend::len` is the async length of a file; an `is_empty` companion would add nothing.
#![allow(clippy::len_without_is_empty)]

use std::future::Future;
use std::io;
use std::path::Path;

use bytes::{Bytes, BytesMut};

pub mod aligned;
pub mod fault;
pub mod local;
pub mod memory;
mod pool;
mod rmw;
pub mod std_file;
mod sys;
pub mod uring;

pub use aligned::{AlignedBuf, DIRECT_ALIGN};
pub use fault::{CutMode, FaultBackend, InjectedError, OpKind};
pub use local::{in_uring_runtime, start_local, uring_available, LocalBackend};
pub use memory::MemoryBackend;
pub use std_file::StdFileBackend;
pub use uring::UringBackend;

/// How to open a file-backed backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenFlags {
    /// Open read-only; every write call then fails with `EBADF`-like errors from the OS.
    pub read_only: bool,
    /// Create the file if it does not exist (never truncates an existing one).
    pub create: bool,
    /// Bypass the host page cache (`O_DIRECT`). Backends bounce unaligned buffers through aligned ones.
    pub direct: bool,
}

/// Positioned, owned-buffer storage I/O.
///
/// All offsets are byte offsets in the underlying file. Implementations must allow many calls to be in
/// flight at once from different tasks (`&self`); ordering between concurrent calls is not guaranteed, and
/// durability only by [`Backend::flush`].
pub trait Backend: 'static {
    /// Fills `buf` (all of `buf.len()` bytes) from `offset`. Returns how many bytes came from the file:
    /// less than `buf.len()` only when the range runs past the end of the file, in which case the rest of
    /// the buffer is zeroed (as QEMU's block layer reads beyond EOF as zeros). The buffer is handed back
    /// whatever the outcome.
    fn read_at(
        &self,
        buf: BytesMut,
        offset: u64,
    ) -> impl Future<Output = (io::Result<usize>, BytesMut)>;

    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: Bytes, offset: u64) -> impl Future<Output = io::Result<()>>;

    /// Writes the buffers back to back starting at `offset`, as one operation where the backend can.
    fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> impl Future<Output = io::Result<()>>;

    /// Makes every completed write durable (`fdatasync`).
    fn flush(&self) -> impl Future<Output = io::Result<()>>;

    /// Makes `len` bytes at `offset` read as zeros, keeping them allocated where the host allows
    /// (`fallocate(FALLOC_FL_ZERO_RANGE)`); emulated with writes of zeros where unsupported.
    fn zero_range(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>>;

    /// Deallocates `len` bytes at `offset` (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); they read as zeros after.
    /// Where the host cannot punch holes, writes zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>>;

    /// The current length of the file in bytes.
    fn len(&self) -> impl Future<Output = io::Result<u64>>;

    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> impl Future<Output = io::Result<()>>;

    /// Whether the host file holds data at `offset` (as opposed to a hole), and for how many bytes from
    /// `offset` (at most `max_len`, at least 1 when `max_len > 0`) that answer stays the same
    /// (`SEEK_DATA`/`SEEK_HOLE`). Past the end of the file is a hole. Backends that cannot tell report data.
    /// `qemu-img map` reports host holes under data as zero, so the engine needs this to match it.
    fn host_status(
        &self,
        offset: u64,
        max_len: u64,
    ) -> impl Future<Output = io::Result<HostStatus>>;

    /// Bytes actually allocated on the host (for `actual-size` in `info`); `None` where unknown.
    fn allocated_size(&self) -> impl Future<Output = io::Result<Option<u64>>>;
}

/// The answer of [`Backend::host_status`]: a run of bytes that are all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus {
    /// True when the run holds data; false when it is a hole (reads as zeros, no space allocated).
    pub data: bool,
    /// Length of the run in bytes, starting at the queried offset.
    pub len: u64,
}

/// A backend that can be opened from a path, so that the engine can follow backing-file and data-file
/// names found in an image.
pub trait BackendOpen: Backend + Sized {
    /// Opens `path` with `flags`.
    fn open(path: &Path, flags: OpenFlags) -> impl Future<Output = io::Result<Self>>;
}
