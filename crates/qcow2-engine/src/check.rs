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

mod fix;
mod walk;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use qcow2_format::header::IncompatibleFeatures;
use qcow2_format::image_header::ImageHeader;
use qcow2_format::refcount::{parse_reftable, RefcountOrder};
use qcow2_format::snapshot::Snapshot;
use qcow2_format::types::Geometry;
use qcow2_io::{Backend, BackendOpen, OpenFlags};

use crate::error::{Error, Result};
use crate::image::{Image, Layer};
use crate::options::ImageFormat;
use crate::qcow2::overlap::{MetaKind, OverlapMap};
use crate::qcow2::refcount::MetaIo;
use walk::RefMap;

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
    /// Set when the check could not complete (an unreadable table, a repair write refused or failed):
    /// qemu-img then prints only `Check failed: <this>` after the stderr lines, and exits with 1.
    /// `check_errors` is nonzero too.
    pub failed: Option<String>,
}

impl CheckReport {
    /// qemu-img check's exit code: 1 if the check could not complete, else 2 with corruptions, else 3
    /// with leaks, else 0.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 || self.failed.is_some() {
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

/// The counters of one pass (QEMU's `BdrvCheckResult`).
#[derive(Debug, Clone, Default)]
struct Counters {
    check_errors: u64,
    corruptions: u64,
    leaks: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

/// A pass stopped early (an unreadable table): the counters so far stand, with a check error.
#[derive(Debug)]
struct PassAbort;

/// Control flow of a pass step.
type Flow<T> = std::result::Result<T, PassAbort>;

/// One pass over an image: what was read, what was counted, what was found.
struct Pass<'a, B> {
    file: &'a B,
    name: &'a str,
    header: ImageHeader,
    geom: Geometry,
    order: RefcountOrder,
    file_len: u64,
    has_data_file: bool,
    /// What this pass may repair.
    fix: Repair,
    res: Counters,
    /// stderr lines, in order.
    msgs: Vec<String>,
    /// Computed references per cluster.
    refs: RefMap,
    /// Clusters to compare: the file's, and any referenced cluster past them.
    nb_clusters: u64,
    /// End of the furthest range anything points at (counted or not).
    max_ref_end: u64,
    /// The stored refcounts cannot be trusted: a new structure is needed (QEMU's `rebuild`).
    rebuild: bool,
    /// Metadata ranges, for the overlap checks of repair writes.
    map: OverlapMap,
    /// Raw refcount table entries and where the table is.
    reftable: Vec<u64>,
    reftable_offset: u64,
    /// Stored refcount blocks read so far (by table index), and those changed.
    blocks: HashMap<u64, Vec<u8>>,
    dirty_blocks: BTreeSet<u64>,
    /// The active L1 table (raw entries, as on disk after this pass's repairs).
    l1: Vec<u64>,
    snapshots: Vec<Snapshot>,
    snapshot_table_len: u64,
    /// Entries were dropped and not yet synced.
    need_sync: bool,
    /// A corruption event was reported (QEMU reports the first one per image only).
    signalled: bool,
    /// Why the pass stopped, as qemu-img words it (`strerror`), when not an I/O error.
    failure: Option<String>,
    /// Entries to give copies of their clusters (repair of refcount overflows).
    copies: Vec<walk::Copy>,
}

impl<'a, B: Backend> Pass<'a, B> {
    /// Reads the header, the active L1 table, the refcount table and the snapshot table. Errors here
    /// are what makes QEMU refuse to open the image.
    async fn load(file: &'a B, name: &'a str, fix: Repair) -> Result<Pass<'a, B>> {
        let file_len = file
            .len()
            .await
            .map_err(Error::io(name, "get file length", 0))?;
        let header = crate::qcow2::read_image_header(file, name, file_len).await?;
        let geom = header.geometry();
        let l1_bytes = header.l1_table_bytes();
        let l1 = read_exact(
            file,
            name,
            header.l1_table_offset().0,
            l1_bytes,
            "read L1 table",
        )
        .await?;
        let reftable_offset = header.refcount_table_offset().0;
        let rt = read_exact(
            file,
            name,
            reftable_offset,
            header.refcount_table_bytes(),
            "read refcount table",
        )
        .await?;
        let (snapshots, snapshot_table_len) =
            crate::qcow2::snapshots::read_snapshot_table(file, name, &header, file_len).await?;
        let cs = geom.cluster_size();
        let res = Counters {
            total_clusters: header.virtual_size().div_ceil(cs),
            ..Counters::default()
        };
        Ok(Pass {
            file,
            name,
            geom,
            order: header.refcount_order(),
            has_data_file: header.has_data_file(),
            file_len,
            fix,
            res,
            msgs: Vec::new(),
            refs: RefMap::default(),
            nb_clusters: file_len.div_ceil(cs),
            max_ref_end: 0,
            rebuild: false,
            map: OverlapMap::new(),
            reftable: parse_reftable(&rt),
            reftable_offset,
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
            l1: qcow2_format::l1::parse_l1_table(&l1),
            snapshots,
            snapshot_table_len,
            need_sync: false,
            signalled: false,
            failure: None,
            copies: Vec::new(),
            header,
        })
    }

    fn cs(&self) -> u64 {
        self.geom.cluster_size()
    }

    /// Refcount entries per block.
    fn epb(&self) -> u64 {
        self.order.entries_per_block(self.geom.cluster_bits)
    }

    /// Clusters the file covers (the last one possibly partial).
    fn file_clusters(&self) -> u64 {
        self.file_len.div_ceil(self.cs())
    }

    fn meta_io(&self) -> MetaIo<'_, B> {
        MetaIo {
            file: self.file,
            name: self.name,
            geom: self.geom,
        }
    }

    /// A corruption, with its stderr line.
    fn error(&mut self, msg: String) {
        self.res.corruptions += 1;
        self.msgs.push(msg);
    }

    /// A check error (the check could not do something), with its stderr line.
    fn check_error(&mut self, msg: String) {
        self.res.check_errors += 1;
        self.msgs.push(msg);
    }

    /// A corruption found and repaired, with its stderr line.
    fn fixed_corruption(&mut self, msg: String) {
        self.res.corruptions_fixed += 1;
        self.msgs.push(msg);
    }

    /// Reads the part of `[off, off + len)` that lies inside the file (what lies past its end reads as
    /// zeros, so callers treat missing bytes as zeros, and a hostile offset costs no work); on failure
    /// records a check error with `err` and returns `None`.
    async fn read(&mut self, off: u64, len: u64, err: &str) -> Option<Vec<u8>> {
        let len = len.min(self.file_len.saturating_sub(off));
        match read_exact(self.file, self.name, off, len, "read").await {
            Ok(b) => Some(b),
            Err(e) => {
                self.check_error(format!("{err}: {e}"));
                None
            }
        }
    }

    /// Overlap-checks and writes a repair; on refusal or failure records a check error and returns
    /// false.
    async fn write(
        &mut self,
        off: u64,
        data: Vec<u8>,
        own: Option<(MetaKind, u64)>,
        what: &'static str,
    ) -> bool {
        let io = self.meta_io();
        match crate::qcow2::refcount::write_checked(&io, &self.map, off, data, own, what).await {
            Ok(()) => true,
            Err(e) => {
                self.check_error(format!("ERROR: Could not {what}: {e}"));
                false
            }
        }
    }

    /// fdatasync; on failure records a check error and returns false.
    async fn sync(&mut self) -> bool {
        self.need_sync = false;
        match crate::qcow2::refcount::sync(&self.meta_io()).await {
            Ok(()) => true,
            Err(e) => {
                self.check_error(format!("ERROR: {e}"));
                false
            }
        }
    }

    /// Syncs when entries were dropped since the last sync.
    async fn sync_if_needed(&mut self) {
        if self.need_sync {
            self.sync().await;
        }
    }

    /// QEMU's `qcow2_check_refcounts` followed by the marking of `qcow2_co_check_locked`. Returns the
    /// finished pass (possibly replaced by a recount after a rebuild) and whether it completed.
    async fn run(mut self) -> Result<(Pass<'a, B>, bool)> {
        // QEMU's limit: the in-memory counts of a larger file would not fit its arrays.
        if self.file_clusters() > i32::MAX as u64 {
            self.res.check_errors += 1;
            self.failure = Some("File too large".into());
            return Ok((self, false));
        }
        if self.calculate().await.is_err() || self.make_copies().await.is_err() {
            return Ok((self, false));
        }
        let pre = self.res.clone();
        let mut highest = self.compare(Repair::None).await;
        if self.rebuild && self.fix == Repair::All {
            self.msgs.push("Rebuilding refcount structure".into());
            let old = self.res.clone();
            if !self.rebuild_structure().await {
                return Ok((self, false));
            }
            // The references are recounted over the new structure; what the first count found in the
            // refcounts is now fixed.
            let mut next = Pass::load(self.file, self.name, Repair::None).await?;
            next.msgs = std::mem::take(&mut self.msgs);
            next.res = Counters {
                corruptions: 0,
                leaks: 0,
                ..self.res.clone()
            };
            if next.calculate().await.is_err() {
                return Ok((next, false));
            }
            // The old structure is now leaked: free it (the counters of this comparison are not
            // kept, as in QEMU, except leaks it could not fix).
            let saved = next.res.clone();
            next.res = Counters::default();
            highest = next.compare(Repair::Leaks).await;
            if next.rebuild {
                next.msgs
                    .push("ERROR rebuilt refcount structure is still broken".into());
            }
            let fresh_leaks = next.res.leaks;
            next.res = saved;
            next.res.corruptions_fixed += old.corruptions.saturating_sub(next.res.corruptions);
            next.res.leaks_fixed += old.leaks.saturating_sub(next.res.leaks);
            next.res.leaks += fresh_leaks;
            next.fix = self.fix;
            self = next;
        } else if self.fix != Repair::None {
            if self.rebuild {
                self.check_error("ERROR need to rebuild refcount structures".into());
                return Ok((self, false));
            }
            if self.res.leaks > 0 || self.res.corruptions > 0 {
                self.res = pre;
                highest = self.compare(self.fix).await;
            }
        }
        if self.check_copied().await.is_err() {
            return Ok((self, false));
        }
        self.res.image_end_offset = (highest + 1) * self.cs();
        if self.fix != Repair::None && self.res.check_errors == 0 && self.res.corruptions == 0 {
            self.mark_clean().await;
        }
        Ok((self, true))
    }

    /// Clears the lazy-refcounts dirty bit and the corrupt bit (QEMU's `qcow2_mark_clean` and
    /// `qcow2_mark_consistent`), after a repair that left no corruption.
    async fn mark_clean(&mut self) {
        let h = &self.header.header;
        let bits = h
            .incompatible
            .with(IncompatibleFeatures::DIRTY, false)
            .with(IncompatibleFeatures::CORRUPT, false);
        if bits == h.incompatible {
            return;
        }
        let data = bits.0.to_be_bytes().to_vec();
        if self
            .write(72, data, Some((MetaKind::Header, 0)), "write header")
            .await
        {
            self.sync().await;
        }
    }

    /// The report of this pass.
    fn report(self, completed: bool) -> CheckReport {
        let r = self.res;
        CheckReport {
            filename: self.name.to_owned(),
            format: "qcow2".into(),
            check_errors: r.check_errors,
            corruptions: r.corruptions,
            leaks: r.leaks,
            corruptions_fixed: r.corruptions_fixed,
            leaks_fixed: r.leaks_fixed,
            image_end_offset: r.image_end_offset,
            total_clusters: r.total_clusters,
            allocated_clusters: r.allocated_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            // QEMU's check returns -EIO for every failure but the size limit; qemu-img prints its
            // strerror.
            failed: (!completed)
                .then(|| self.failure.unwrap_or_else(|| "Input/output error".into())),
            messages: self.msgs,
            repair_messages: Vec::new(),
        }
    }
}

/// Reads exactly `len` bytes at `off` (zeros past the end of the file).
async fn read_exact<B: Backend>(
    file: &B,
    name: &str,
    off: u64,
    len: u64,
    what: &'static str,
) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| {
        Error::corrupt(
            name,
            format!("{what}: {len} bytes at {off:#x} do not fit in memory"),
        )
    })?;
    let (res, buf) = file.read_at(crate::buf::io_buf(n), off).await;
    res.map_err(Error::io(name, what, off))?;
    Ok(buf.to_vec())
}

/// Checks (and with `repair`, repairs) the qcow2 image in `file`, which nothing else may use meanwhile,
/// as qemu-img would: one pass with `repair`, and when it fixed anything, a second read-only pass whose
/// counters are reported. `name` is used in messages and the report. For images that live outside
/// the file system (an in-memory backend); [`check_file`] opens a path first.
pub async fn check_backend<B: Backend>(
    file: &B,
    name: &str,
    repair: Repair,
) -> Result<CheckReport> {
    if !is_qcow2(file, name).await? {
        return Err(unsupported(name));
    }
    let (pass, done) = Pass::load(file, name, repair).await?.run().await?;
    let first = pass.report(done);
    if repair == Repair::None || !first.repaired() || first.failed.is_some() {
        return Ok(first);
    }
    let (pass, done) = Pass::load(file, name, Repair::None).await?.run().await?;
    let mut report = pass.report(done);
    report.corruptions_fixed = first.corruptions_fixed;
    report.leaks_fixed = first.leaks_fixed;
    report.repair_messages = first.messages;
    Ok(report)
}

/// The repair a read-write open of an image with the lazy-refcounts dirty bit runs first (QEMU's
/// `qcow2_do_open` runs its check with `BDRV_FIX_ERRORS | BDRV_FIX_LEAKS` there): one repairing pass,
/// which also clears the dirty bit. An image the pass cannot bring to "no corruption, no check error" is
/// refused, as QEMU refuses one with check errors ("Could not repair dirty image").
pub(crate) async fn repair_dirty<B: Backend>(file: &B, name: &str) -> Result<()> {
    let (pass, done) = Pass::load(file, name, Repair::All).await?.run().await?;
    let r = pass.report(done);
    if r.failed.is_some() || r.check_errors > 0 || r.corruptions > 0 {
        let detail = r
            .messages
            .iter()
            .find(|m| m.starts_with("ERROR") || m.starts_with("Can't"))
            .cloned()
            .or(r.failed)
            .unwrap_or_default();
        return Err(Error::corrupt(
            name,
            format!("could not repair the dirty lazy-refcounts image: {detail}"),
        ));
    }
    tracing::info!(
        file = name,
        "repaired a dirty lazy-refcounts image: {} leaks and {} corruptions fixed",
        r.leaks_fixed,
        r.corruptions_fixed
    );
    Ok(())
}

/// Whether `file` starts with the qcow2 magic.
async fn is_qcow2<B: Backend>(file: &B, name: &str) -> Result<bool> {
    let magic = read_exact(file, name, 0, 4, "read header").await?;
    Ok(magic == b"QFI\xfb")
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
    let name = path.display().to_string();
    let flags = OpenFlags {
        read_only: repair == Repair::None,
        ..OpenFlags::default()
    };
    let file = B::open(path, flags)
        .await
        .map_err(Error::io(&name, "open", 0))?;
    if format == Some(ImageFormat::Raw) {
        return Err(unsupported(&name));
    }
    check_backend(&file, &name, repair).await
}

/// The error for an image format without checks (raw).
fn unsupported(name: &str) -> Error {
    Error::Unsupported {
        path: name.to_owned(),
        what: "checks of this image format (This image format does not support checks)".into(),
    }
}

impl<B: Backend> Image<B> {
    /// Checks this image (the top of the chain) as `qemu-img check` would.
    ///
    /// A read-write handle first writes back all its metadata (refcounts too, also with lazy
    /// refcounts) and holds its metadata lock for the duration, so the check sees a quiescent,
    /// consistent image; requests wait meanwhile. Clusters whose release is deferred because a request
    /// still uses them show as leaks. Repair needs exclusive access to the file: use [`check_file`] on
    /// a closed image (`Repair::None` only here; anything else is [`Error::Unsupported`]).
    pub async fn check(&self, repair: Repair) -> Result<CheckReport> {
        let Layer::Qcow2(q) = &self.inner.layer else {
            return Err(unsupported(self.filename()));
        };
        if repair != Repair::None {
            return Err(Error::Unsupported {
                path: self.filename().to_owned(),
                what: "repair of an open image (close it and use check_file)".into(),
            });
        }
        let mut meta = q.meta.lock().await;
        if meta.w.is_some() {
            q.check_usable()?;
            q.write_back_all(&mut meta).await?;
        }
        let report = match Pass::load(&q.file, &q.name, Repair::None).await {
            Ok(pass) => pass.run().await.map(|(p, done)| p.report(done)),
            Err(e) => Err(e),
        };
        drop(meta);
        report
    }
}
