//! Consistency check and repair of qcow2 images, as `qemu-img check [-r leaks|all]`.
//!
//! Spec: qcow2.txt, "Host cluster management" (refcounts), "Cluster mapping" (L1/L2 entries, the COPIED
//! flag), "Snapshots". Semantics follow QEMU's `qcow2_check_refcounts`: every reference the image makes
//! (header, L1 tables, L2 tables, data and compressed clusters, snapshot table, refcount table and
//! blocks, bitmaps) is counted in memory and compared with the stored refcounts; a stored refcount
//! below the references is a corruption, above them a leak; COPIED flags must be set exactly on
//! entries whose cluster has refcount 1.
//!
//! Repair goes further than QEMU where QEMU gives up: an L2 entry pointing at an unaligned offset or
//! past the end of the file is dropped (the guest cluster then reads as unallocated), and reported.
//! Repairs are ordered so that an interrupted repair leaves the image no worse than before (see
//! docs/ARCHITECTURE.md, "Check and repair").

use std::path::Path;

use qcow2_io::{Backend, BackendOpen};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::options::ImageFormat;

/// What a check may repair (`qemu-img check -r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Report only; the image is opened read-only and never written.
    #[default]
    None,
    /// `-r leaks`: lower refcounts that are too high.
    Leaks,
    /// `-r all`: fix leaks and corruptions (raise refcounts, fix COPIED flags, drop bad L2 entries).
    All,
}

/// The outcome of a check, with qemu-img's counters (`qemu-img check --output=json` keys in the docs of
/// each field).
///
/// With a repair that fixed anything, the counters are those of a second, read-only pass over the
/// repaired image (qemu-img's "Double checking the fixed image now..."), and `corruptions_fixed` /
/// `leaks_fixed` those of the repair pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// `filename`: the image's name as given.
    pub filename: String,
    /// `format`: always qcow2 (raw images have nothing to check).
    pub format: String,
    /// `check-errors`: problems that stopped the check from completing (I/O errors, unreadable tables).
    pub check_errors: u64,
    /// `corruptions`: references to clusters whose refcount is too low, bad offsets, wrong COPIED flags,
    /// overlapping metadata.
    pub corruptions: u64,
    /// `leaks`: clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// `corruptions-fixed`: corruptions the repair pass fixed.
    pub corruptions_fixed: u64,
    /// `leaks-fixed`: leaks the repair pass fixed.
    pub leaks_fixed: u64,
    /// `image-end-offset`: end of the last cluster that is referenced or has a refcount.
    pub image_end_offset: u64,
    /// `total-clusters`: guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// `allocated-clusters`: guest clusters of the active L1 table with host clusters (data, allocated
    /// zero or compressed).
    pub allocated_clusters: u64,
    /// `fragmented-clusters`: allocated guest clusters not contiguous with the previous one of the same
    /// L2 table (compressed ones always count).
    pub fragmented_clusters: u64,
    /// `compressed-clusters`: compressed guest clusters of the active L1 table.
    pub compressed_clusters: u64,
    /// The lines qemu-img prints to stderr for the final pass, in order ("Leaked cluster 5 refcount=1
    /// reference=0", "ERROR cluster 9 refcount=0 reference=1", "ERROR OFLAG_COPIED data cluster: ...").
    pub messages: Vec<String>,
    /// The stderr lines of the repair pass ("Repairing cluster ...") when a second pass was run; empty
    /// otherwise (then the repair pass is the final one and its lines are in `messages`).
    pub repair_messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit code: 1 if the check could not complete, else 2 with corruptions, else 3
    /// with leaks, else 0.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether the repair pass fixed anything (and the counters come from a second pass).
    pub fn repaired(&self) -> bool {
        self.corruptions_fixed > 0 || self.leaks_fixed > 0
    }
}

/// Checks (and with `repair`, repairs) the image file at `path` as `qemu-img check [-r ...]` does.
///
/// Only the named file is checked (its backing file is not opened). `format` as `-f`; `None` probes.
/// A raw image yields [`Error::Unsupported`] (qemu-img: "This image format does not support checks").
/// With a repair the file is opened read-write even when its corrupt bit is set or its lazy-refcounts
/// dirty bit is set (no automatic refcount rebuild on open: the check does it, and counts it); a
/// repair that leaves no corruption clears both bits.
pub async fn check_file<B: BackendOpen>(
    path: &Path,
    format: Option<ImageFormat>,
    repair: Repair,
) -> Result<CheckReport> {
    let _ = (format, repair);
    Err(Error::Unsupported {
        path: path.display().to_string(),
        what: "check (not implemented yet)".into(),
    })
}

impl<B: Backend> Image<B> {
    /// Checks this image (the top of the chain) as `qemu-img check` would, and with `repair` repairs
    /// it. A read-write handle is flushed first and its metadata lock held for the duration, so the
    /// check sees a quiescent image; requests wait meanwhile. Repair needs a read-write handle.
    pub async fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _ = repair;
        Err(Error::Unsupported {
            path: self.filename().to_owned(),
            what: "check (not implemented yet)".into(),
        })
    }
}
