//! The engine's error type.
//!
//! Every variant that concerns a file names it, so that a caller can print one line
//! `<file>: <problem>`. Corruption found at run time is [`Error::Corrupt`], never a generic I/O error, so
//! that callers can react to it.

use qcow2_format::error::FormatError;

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the engine. The `Display` text of variants with a `path` starts with that path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("{path}: {op}{} failed: {source}", at_offset(op, *offset))]
    Io {
        /// The file.
        path: String,
        /// What was being done (`"open"`, `"read L2 table"`, ...).
        op: &'static str,
        /// The byte offset in the file (0 where not applicable).
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image's metadata failed validation in the format crate.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: String,
        /// What the format crate found.
        #[source]
        source: FormatError,
    },
    /// The image is corrupt: metadata points somewhere it must not.
    #[error("{path}: image is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// Which table / entry / offset, what was found and what was expected.
        detail: String,
    },
    /// A read-write open of an image whose corrupt bit (incompatible bit 1) is set.
    #[error(
        "{path}: image is marked as corrupt and can only be opened read-only; \
         run `qcow2 check -r all` to repair it"
    )]
    CorruptBitSet {
        /// The file.
        path: String,
    },
    /// The backing chain loops back on itself.
    #[error("{path}: backing chain loops back on itself (this file is already part of the chain)")]
    BackingLoop {
        /// The file that appears a second time in the chain.
        path: String,
    },
    /// The backing chain is deeper than the engine allows.
    #[error("{path}: backing chain is deeper than the limit of {limit} images")]
    ChainTooDeep {
        /// The file whose backing file would exceed the limit.
        path: String,
        /// The limit.
        limit: usize,
    },
    /// A request outside the virtual disk.
    #[error(
        "request of {len} bytes at offset {offset} is outside the virtual disk of {size} bytes"
    )]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },
    /// A refcount would exceed the maximum of the image's refcount width.
    #[error("{path}: refcount of the cluster at host offset {offset:#x} would exceed the maximum of {max}")]
    RefcountOverflow {
        /// The file.
        path: String,
        /// Host offset of the cluster.
        offset: u64,
        /// The largest refcount the image's refcount width can hold.
        max: u64,
    },
    /// A write to an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// The image uses something the engine does not (yet) support.
    #[error("{path}: {what} is not supported")]
    Unsupported {
        /// The file.
        path: String,
        /// What is not supported.
        what: String,
    },
    /// An image cannot be created with these options (qemu-img's reason).
    #[error("{path}: {source}")]
    Create {
        /// The image being created.
        path: String,
        /// Why.
        #[source]
        source: crate::create::CreateError,
    },
}

/// " at offset N" for positioned operations, nothing for open/stat-like ones.
fn at_offset(op: &str, offset: u64) -> String {
    if op.starts_with("open") || op.starts_with("stat") || op.starts_with("get length") {
        String::new()
    } else {
        format!(" at offset {offset}")
    }
}

impl Error {
    /// Builds a closure mapping an `io::Error` to [`Error::Io`] for `path`, `op` and `offset`.
    pub(crate) fn io<'a>(
        path: &'a str,
        op: &'static str,
        offset: u64,
    ) -> impl FnOnce(std::io::Error) -> Error + use<'a> {
        move |source| Error::Io {
            path: path.to_owned(),
            op,
            offset,
            source,
        }
    }

    /// Builds a closure mapping a [`FormatError`] to [`Error::Format`] for `path`.
    pub(crate) fn format(path: &str) -> impl FnOnce(FormatError) -> Error + '_ {
        move |source| Error::Format {
            path: path.to_owned(),
            source,
        }
    }

    /// A [`Error::Corrupt`] for `path`.
    pub(crate) fn corrupt(path: &str, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            path: path.to_owned(),
            detail: detail.into(),
        }
    }

    /// True for [`Error::Corrupt`].
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }
}
