//! QCOW2 on-disk structures: parse, validate and serialize.
//!
//! This crate is pure: it performs no I/O and has no async code. Every value read from an image is
//! untrusted; it becomes a typed value only after validation against the specification
//! (QEMU's `docs/interop/qcow2.txt`) and QEMU 10's limits, with checked arithmetic throughout.
//!
//! Modules:
//! - [`error`]: the crate's error type.
//! - [`types`]: offset/index newtypes and the cluster [`types::Geometry`].
//! - [`header`]: the fixed header fields and feature bits.
//! - [`extensions`]: header extensions.
//! - [`image_header`]: the whole header cluster (header + extensions + backing file name), validated.
//! - [`l1`], [`l2`]: L1 and L2 table entries (standard and extended L2).
//! - [`compressed`]: compressed cluster descriptors and (de)compression.
//! - [`refcount`]: refcount table entries and refcount blocks of every width.
//! - [`snapshot`]: the internal snapshot table.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod compressed;
pub mod error;
pub mod extensions;
pub mod header;
pub mod image_header;
pub mod l1;
pub mod l2;
pub mod refcount;
pub mod snapshot;
pub mod types;

mod bytes;

pub use error::{FormatError, Result};
