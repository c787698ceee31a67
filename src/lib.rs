//! Facade for the qcow2 engine: re-exports the public API of the workspace crates so that an embedder
//! depends on one crate.
//!
//! - [`format`]: on-disk structures (parse, validate, serialize), no I/O.
//! - [`io`]: the storage backends (std file, io_uring, memory).
//! - [`engine`]: the async engine that opens images and serves reads.

pub use qcow2_engine as engine;
pub use qcow2_format as format;
pub use qcow2_io as io;

#[doc(hidden)]
pub mod fuzzing;
