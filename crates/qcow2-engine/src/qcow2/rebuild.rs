//! Rebuilding refcounts of a dirty lazy-refcounts image on a read-write open (QEMU's
//! `qcow2_check_refcounts` with `BDRV_FIX_ERRORS` on a dirty image).
//!
//! SKELETON (issue 3): H-ref implements.

use qcow2_format::image_header::ImageHeader;
use qcow2_io::Backend;

use super::refcount::MetaIo;
use crate::error::{Error, Result};

/// Recounts every reference (header, L1 tables active and of snapshots, L2 tables, data and compressed
/// clusters, refcount table and blocks, snapshot table, bitmap directory) and rewrites the refcount
/// blocks on disk to match (leaks and too-low counts both corrected), then fdatasyncs. The caller then
/// clears the dirty bit. `l1` is the active L1 table.
pub(crate) async fn rebuild_refcounts<B: Backend>(
    io: &MetaIo<'_, B>,
    header: &ImageHeader,
    l1: &[u64],
    file_len: u64,
) -> Result<()> {
    let _ = (header, l1, file_len);
    Err(Error::Unsupported {
        path: io.name.to_owned(),
        what: "read-write open of a dirty image (refcount rebuild not implemented yet)".into(),
    })
}
