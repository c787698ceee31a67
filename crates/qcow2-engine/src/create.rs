//! Creating images: [`Image::create`], the engine side of `qemu-img create`.
//!
//! A qcow2 image is written directly, structure by structure, with the format crate's serializers:
//! the header cluster (qcow2.txt, "Header" and "Header extensions": backing format, external data
//! file name and, for version 3 with clusters above 4 KiB as QEMU does, the feature name table), the
//! refcount table and blocks ("Host cluster management"), the L1 table and, with preallocation, L2
//! tables ("Cluster mapping"). Where each one goes is decided by [`layout`], a model of QEMU's
//! allocator, so that the result matches `qemu-img create` byte for byte in the common cases and
//! every cluster in use has refcount 1 (nothing leaked, nothing missing).
//!
//! Options are checked first, in QEMU's order and with QEMU's messages ([`CreateError`]), before any
//! file is touched (QEMU creates the files and deletes them again on such errors; the result is the
//! same: no file).
//!
//! Names: a relative backing file name is stored as given and resolved against the new image's
//! directory to open it (QEMU's `path_combine`); a relative data file name is resolved against the
//! current directory, as QEMU does at create and at open.

mod layout;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use qcow2_format::extensions::{qemu_feature_table, HeaderExtension};
/// The compression type of a new image (re-exported for callers that build [`CreateOptions`]).
pub use qcow2_format::header::CompressionType;
/// The header version of a new image: `Version::V2` is qemu-img's `compat=0.10`, `V3` its `1.1`.
pub use qcow2_format::header::Version;
use qcow2_format::header::{
    AutoclearFeatures, CompatibleFeatures, Header, IncompatibleFeatures, V2_HEADER_LENGTH,
};
use qcow2_format::image_header::ImageHeader;
use qcow2_format::l1::{serialize_l1_table, MAX_L1_SIZE_BYTES};
use qcow2_format::refcount::{serialize_reftable, RefcountOrder};
use qcow2_format::types::Geometry;
use qcow2_io::{Backend, BackendOpen, OpenFlags};

use crate::chain::resolve_backing_name;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::options::{ImageFormat, OpenOptions};

/// qemu-img's default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;
/// qemu-img's default refcount width.
pub const DEFAULT_REFCOUNT_BITS: u64 = 16;

/// Bytes written per request when zero-filling (`preallocation=full`): large enough to be cheap,
/// small enough not to hold much memory.
const ZERO_CHUNK: u64 = 4 << 20;

/// How much of the image to allocate up front (`-o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preallocation {
    /// Nothing: the image holds only the header, refcount structures and L1 table.
    #[default]
    Off,
    /// L2 tables and data clusters are allocated (mapped, refcount 1) but not written.
    Metadata,
    /// Like metadata, and the data area is allocated in the host file (`fallocate`).
    Falloc,
    /// Like metadata, and the data area is written with zeros.
    Full,
}

impl Preallocation {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }

    /// Parses qemu-img's name.
    pub fn from_name(name: &str) -> Option<Preallocation> {
        match name {
            "off" => Some(Preallocation::Off),
            "metadata" => Some(Preallocation::Metadata),
            "falloc" => Some(Preallocation::Falloc),
            "full" => Some(Preallocation::Full),
            _ => None,
        }
    }
}

/// Options of a new image, as `qemu-img create -f FMT -o ...` takes them.
///
/// Numbers are kept as given (not pre-validated newtypes) because refusing bad values with qemu-img's
/// messages, in qemu-img's order, is part of what [`Image::create`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Format of the new image.
    pub format: ImageFormat,
    /// Virtual size in bytes (rounded up to 512); `None` takes the backing file's size.
    pub size: Option<u64>,
    /// Cluster size in bytes (qcow2): a power of two, 512..=2 MiB.
    pub cluster_size: u64,
    /// Refcount width in bits (qcow2): a power of two, 1..=64.
    pub refcount_bits: u64,
    /// Header version: v2 (compat 0.10) or v3 (compat 1.1, the default).
    pub compat: Version,
    /// Compatible feature "lazy refcounts" (v3 only).
    pub lazy_refcounts: bool,
    /// Extended L2 entries with subclusters (v3, clusters of 16 KiB and more).
    pub extended_l2: bool,
    /// Compression type of compressed clusters (zstd: v3 only).
    pub compression_type: CompressionType,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format (required with a backing file, as in QEMU 10).
    pub backing_fmt: Option<ImageFormat>,
    /// External data file (qcow2 v3): created or truncated, sized to the virtual size.
    pub data_file: Option<String>,
    /// The external data file stays a valid raw image (implies metadata preallocation).
    pub data_file_raw: bool,
}

impl CreateOptions {
    /// A qcow2 image of `size` bytes with qemu-img's defaults (v3, 64 KiB clusters, 16-bit refcounts,
    /// zlib, no preallocation).
    pub fn qcow2(size: u64) -> CreateOptions {
        CreateOptions {
            format: ImageFormat::Qcow2,
            size: Some(size),
            cluster_size: DEFAULT_CLUSTER_SIZE,
            refcount_bits: DEFAULT_REFCOUNT_BITS,
            compat: Version::V3,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
        }
    }

    /// A raw image of `size` bytes.
    pub fn raw(size: u64) -> CreateOptions {
        CreateOptions {
            format: ImageFormat::Raw,
            ..CreateOptions::qcow2(size)
        }
    }

    /// A qcow2 overlay of `backing` (format `fmt`) that takes its size.
    pub fn overlay(backing: impl Into<String>, fmt: ImageFormat) -> CreateOptions {
        CreateOptions {
            size: None,
            backing_file: Some(backing.into()),
            backing_fmt: Some(fmt),
            ..CreateOptions::qcow2(0)
        }
    }
}

impl CreateOptions {
    /// Opens the backing file as qemu-img does before creating an overlay of it (to check it, and
    /// for its size): `Ok(None)` without a backing file. `path` is the new image's name, against
    /// whose directory a relative backing name is resolved. The CLI calls this before printing its
    /// `Formatting` line, as qemu-img reports backing problems before it.
    pub async fn backing_size<B: BackendOpen>(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<Option<u64>> {
        let name = path.as_ref().display().to_string();
        backing_size::<B>(&name, self)
            .await
            .map_err(|e| e.into_error(&name))
    }
}

/// Why an image cannot be created: qemu-img's reasons, worded as qemu-img words them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// No size and no backing file to take it from.
    #[error("Image creation needs a size parameter")]
    NeedsSize,
    /// Extended L2 with a version 2 header.
    #[error("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    ExtendedL2NeedsV3,
    /// Cluster size not a power of two in 512..=2 MiB.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    BadClusterSize,
    /// Extended L2 below 16 KiB clusters.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize,
    /// Preallocation with a backing file (without extended L2).
    #[error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    )]
    PreallocWithBacking,
    /// A backing format without a backing file.
    #[error("Backing format cannot be used without backing file")]
    BackingFmtWithoutBacking,
    /// Lazy refcounts with a version 2 header.
    #[error("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    LazyNeedsV3,
    /// Refcount width not a power of two, or above 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    BadRefcountBits,
    /// Refcount width other than 16 with a version 2 header.
    #[error("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")]
    RefcountBitsNeedV3,
    /// data_file_raw without data_file.
    #[error("data-file-raw requires data-file")]
    DataFileRawWithoutDataFile,
    /// data_file_raw with a backing file.
    #[error("Backing file and data-file-raw cannot be used at the same time")]
    DataFileRawWithBacking,
    /// An external data file with a version 2 header.
    #[error("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    DataFileNeedsV3,
    /// A compression type other than zlib with a version 2 header.
    #[error("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")]
    CompressionNeedsV3,
    /// The L1 table would exceed 32 MiB.
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    TooLarge,
    /// A backing file for a raw image.
    #[error("Backing file not supported for file format 'raw'")]
    RawBacking,
    /// A preallocation mode raw images do not have.
    #[error("Unsupported preallocation mode: {0}")]
    RawPreallocation(&'static str),
    /// A backing file given without its format (QEMU 10 refuses this).
    #[error("Backing file specified without backing format\nDetected format of {detected}.")]
    BackingWithoutFormat {
        /// The format found by probing.
        detected: String,
    },
    /// The backing file could not be opened (to learn its size or check it).
    #[error("Could not open '{name}': {reason}\nCould not open backing image.")]
    BackingOpen {
        /// The backing file name, resolved.
        name: String,
        /// Why.
        reason: String,
    },
    /// A file could not be created.
    #[error("Could not create '{name}': {reason}")]
    CreateFile {
        /// The file.
        name: String,
        /// Why.
        reason: String,
    },
    /// A bug in the layout model (never expected).
    #[error("internal error while laying out the image: {0}")]
    Internal(String),
}

impl CreateError {
    fn into_error(self, path: &str) -> Error {
        Error::Create {
            path: path.to_owned(),
            source: self,
        }
    }
}

/// The options after validation, with the size known.
struct Checked {
    size: u64,
    geom: Geometry,
    order: RefcountOrder,
    prealloc: Preallocation,
    l1_size: u64,
}

/// Checks a qcow2 image's options in QEMU's order (`qcow2_co_create`), except the size.
fn check_qcow2(o: &CreateOptions) -> std::result::Result<(), CreateError> {
    let v3 = o.compat == Version::V3;
    if o.extended_l2 && !v3 {
        return Err(CreateError::ExtendedL2NeedsV3);
    }
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(CreateError::BadClusterSize);
    }
    if o.extended_l2 && cs < 16384 {
        return Err(CreateError::ExtendedL2ClusterSize);
    }
    if o.backing_file.is_some() && o.preallocation != Preallocation::Off && !o.extended_l2 {
        return Err(CreateError::PreallocWithBacking);
    }
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err(CreateError::BackingFmtWithoutBacking);
    }
    if o.lazy_refcounts && !v3 {
        return Err(CreateError::LazyNeedsV3);
    }
    if o.refcount_bits > 64 || !o.refcount_bits.is_power_of_two() {
        return Err(CreateError::BadRefcountBits);
    }
    if !v3 && o.refcount_bits != 16 {
        return Err(CreateError::RefcountBitsNeedV3);
    }
    if o.data_file_raw && o.data_file.is_none() {
        return Err(CreateError::DataFileRawWithoutDataFile);
    }
    if o.data_file_raw && o.backing_file.is_some() {
        return Err(CreateError::DataFileRawWithBacking);
    }
    if o.data_file.is_some() && !v3 {
        return Err(CreateError::DataFileNeedsV3);
    }
    if o.compression_type != CompressionType::Zlib && !v3 {
        return Err(CreateError::CompressionNeedsV3);
    }
    Ok(())
}

/// Rounds a virtual size up to 512 bytes, as qemu-img does before creating.
fn round_size(size: u64) -> std::result::Result<u64, CreateError> {
    size.checked_next_multiple_of(512)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or(CreateError::TooLarge)
}

/// The message part of an engine error for "Could not open": the OS reason for I/O errors
/// (without Rust's " (os error N)"), else the whole message.
fn open_reason(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => {
            let s = source.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        other => other.to_string(),
    }
}

/// Opens the backing file as qemu-img does before creating an overlay (always, also to check it),
/// returning its virtual size.
async fn backing_size<B: BackendOpen>(
    path: &str,
    o: &CreateOptions,
) -> std::result::Result<Option<u64>, CreateError> {
    let Some(backing) = o.backing_file.as_deref() else {
        return Ok(None);
    };
    let full = resolve_backing_name(path, backing);
    let opts = OpenOptions {
        format: o.backing_fmt,
        metadata_only: true,
        ..OpenOptions::default()
    };
    let img = Image::<B>::open(&full, &opts)
        .await
        .map_err(|e| CreateError::BackingOpen {
            name: full.clone(),
            reason: open_reason(&e),
        })?;
    if o.backing_fmt.is_none() {
        return Err(CreateError::BackingWithoutFormat {
            detected: img.format().name().to_string(),
        });
    }
    Ok(Some(img.virtual_size()))
}

impl<B: BackendOpen> Image<B> {
    /// Creates a new image at `path` (overwriting an existing file, as qemu-img does).
    ///
    /// Options qemu-img refuses are refused with its reasons ([`Error::Create`]) before any file is
    /// touched. With a backing file the backing image is opened (its name resolved against `path`'s
    /// directory) to check it and, when `size` is `None`, to take its size.
    pub async fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let name = path.display().to_string();
        match opts.format {
            ImageFormat::Raw => create_raw::<B>(path, &name, opts).await,
            ImageFormat::Qcow2 => create_qcow2::<B>(path, &name, opts).await,
        }
    }
}

/// Opens (creating) `path` and truncates it to 0, as QEMU's file driver does when creating.
async fn open_new<B: BackendOpen>(path: &Path, name: &str) -> Result<B> {
    let file = B::open(
        path,
        OpenFlags {
            create: true,
            ..OpenFlags::default()
        },
    )
    .await
    .map_err(|e| {
        CreateError::CreateFile {
            name: name.to_owned(),
            reason: open_reason(&Error::io(name, "open", 0)(e)),
        }
        .into_error(name)
    })?;
    file.set_len(0)
        .await
        .map_err(Error::io(name, "truncate", 0))?;
    Ok(file)
}

/// Sizes a raw file (the image itself or a data file) to `size` with `prealloc`: `falloc`
/// allocates it (`posix_fallocate` in QEMU), `full` writes zeros.
async fn size_raw_file<B: Backend>(
    file: &B,
    name: &str,
    size: u64,
    prealloc: Preallocation,
) -> Result<()> {
    file.set_len(size)
        .await
        .map_err(Error::io(name, "set length", size))?;
    match prealloc {
        Preallocation::Falloc if size > 0 => file
            .zero_range(0, size)
            .await
            .map_err(Error::io(name, "allocate", 0)),
        Preallocation::Full => write_zeros(file, name, 0, size).await,
        _ => Ok(()),
    }
}

/// Writes `len` zero bytes at `offset` in bounded chunks.
async fn write_zeros<B: Backend>(file: &B, name: &str, offset: u64, len: u64) -> Result<()> {
    let chunk = Bytes::from(vec![0u8; ZERO_CHUNK.min(len) as usize]);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        let off = offset + done;
        file.write_at(chunk.slice(..n as usize), off)
            .await
            .map_err(Error::io(name, "write zeros", off))?;
        done += n;
    }
    Ok(())
}

async fn create_raw<B: BackendOpen>(path: &Path, name: &str, o: &CreateOptions) -> Result<()> {
    if o.backing_file.is_some() {
        return Err(CreateError::RawBacking.into_error(name));
    }
    let size = round_size(
        o.size
            .ok_or(CreateError::NeedsSize)
            .map_err(|e| e.into_error(name))?,
    )
    .map_err(|e| e.into_error(name))?;
    let file = open_new::<B>(path, name).await?;
    if o.preallocation == Preallocation::Metadata {
        // QEMU's file driver has created (and truncated) the file before it refuses the mode.
        return Err(CreateError::RawPreallocation("metadata").into_error(name));
    }
    size_raw_file(&file, name, size, o.preallocation).await?;
    file.flush().await.map_err(Error::io(name, "flush", 0))
}

/// Validates everything and learns the size (opening the backing file).
async fn check_all<B: BackendOpen>(
    name: &str,
    o: &CreateOptions,
) -> std::result::Result<Checked, CreateError> {
    let backing = backing_size::<B>(name, o).await?;
    let size = match (o.size, backing) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => return Err(CreateError::NeedsSize),
    };
    let size = round_size(size)?;
    check_qcow2(o)?;
    let cluster_bits = o.cluster_size.trailing_zeros();
    let geom =
        Geometry::new(cluster_bits, o.extended_l2).map_err(|_| CreateError::BadClusterSize)?;
    let l1_size = geom
        .l1_entries_for(size)
        .map_err(|_| CreateError::TooLarge)?;
    if l1_size > MAX_L1_SIZE_BYTES / 8 {
        return Err(CreateError::TooLarge);
    }
    let order = RefcountOrder::new(o.refcount_bits.trailing_zeros())
        .map_err(|_| CreateError::BadRefcountBits)?;
    let mut prealloc = o.preallocation;
    if o.data_file_raw && prealloc == Preallocation::Off {
        prealloc = Preallocation::Metadata;
    }
    Ok(Checked {
        size,
        geom,
        order,
        prealloc,
        l1_size,
    })
}

/// The header cluster QEMU writes for these options.
fn header_cluster(
    name: &str,
    o: &CreateOptions,
    c: &Checked,
    l: &layout::Layout,
) -> Result<Vec<u8>> {
    let cs = c.geom.cluster_size();
    let mut h = Header::new_v3(c.geom.cluster_bits, c.size);
    h.l1_size = u32::try_from(c.l1_size).map_err(|_| CreateError::TooLarge.into_error(name))?;
    h.l1_table_offset = l.l1_offset;
    h.refcount_table_offset = l.reftable_offset;
    h.refcount_table_clusters =
        u32::try_from(l.reftable_clusters).map_err(|_| CreateError::TooLarge.into_error(name))?;
    let mut extensions = Vec::new();
    if let Some(fmt) = o.backing_fmt {
        extensions.push(HeaderExtension::BackingFormat(fmt.name().to_string()));
    }
    match o.compat {
        Version::V2 => {
            h.version = Version::V2;
            h.header_length = V2_HEADER_LENGTH;
        }
        Version::V3 => {
            h.refcount_order = c.order.0;
            h.compression_type = o.compression_type;
            h.incompatible = IncompatibleFeatures::default()
                .with(
                    IncompatibleFeatures::EXTERNAL_DATA_FILE,
                    o.data_file.is_some(),
                )
                .with(
                    IncompatibleFeatures::COMPRESSION_TYPE,
                    o.compression_type != CompressionType::Zlib,
                )
                .with(IncompatibleFeatures::EXTENDED_L2, o.extended_l2);
            h.compatible = CompatibleFeatures::default()
                .with(CompatibleFeatures::LAZY_REFCOUNTS, o.lazy_refcounts);
            h.autoclear =
                AutoclearFeatures::default().with(AutoclearFeatures::RAW_EXTERNAL, o.data_file_raw);
            if let Some(df) = &o.data_file {
                extensions.push(HeaderExtension::ExternalDataFile(df.clone()));
            }
            // QEMU adds the feature name table only above 4 KiB clusters.
            if cs > 4096 {
                extensions.push(HeaderExtension::FeatureNameTable(qemu_feature_table()));
            }
        }
    }
    let ih = ImageHeader {
        header: h,
        extensions,
        backing_file: o.backing_file.clone(),
    };
    ih.serialize(cs).map_err(Error::format(name))
}

async fn create_qcow2<B: BackendOpen>(path: &Path, name: &str, o: &CreateOptions) -> Result<()> {
    let c = check_all::<B>(name, o)
        .await
        .map_err(|e| e.into_error(name))?;
    let params = layout::Params {
        geom: c.geom,
        order: c.order,
        size: c.size,
        l1_size: c.l1_size,
        prealloc: c.prealloc,
        data_file: o.data_file.is_some(),
    };
    let l = layout::plan(&params).map_err(|e| e.into_error(name))?;
    let header = header_cluster(name, o, &c, &l)?;

    // The data file first: QEMU creates it before the image.
    if let Some(df) = &o.data_file {
        let dpath = PathBuf::from(df);
        let data = open_new::<B>(&dpath, df).await?;
        let mode = match c.prealloc {
            Preallocation::Falloc | Preallocation::Full => c.prealloc,
            _ => Preallocation::Off,
        };
        // With preallocation QEMU maps whole (sub)clusters and then extends the data file to the
        // end of the last one, so its length is the virtual size rounded up to that granularity.
        let len = if c.prealloc == Preallocation::Off {
            c.size
        } else {
            let granularity = if o.extended_l2 {
                c.geom.subcluster_size()
            } else {
                c.geom.cluster_size()
            };
            c.size
                .checked_next_multiple_of(granularity)
                .ok_or_else(|| CreateError::TooLarge.into_error(name))?
        };
        size_raw_file(&data, df, len, mode).await?;
        data.flush().await.map_err(Error::io(df, "flush", 0))?;
    }

    let file = open_new::<B>(path, name).await?;
    let write = |buf: Vec<u8>, off: u64, what: &'static str| {
        let f = &file;
        async move {
            f.write_at(Bytes::from(buf), off)
                .await
                .map_err(Error::io(name, what, off))
        }
    };
    write(header, 0, "write header").await?;
    for (off, bytes) in &l.stale {
        write(bytes.clone(), *off, "write refcount table").await?;
    }
    write(
        serialize_reftable(&l.reftable),
        l.reftable_offset,
        "write refcount table",
    )
    .await?;
    for (i, &off) in l.reftable.iter().enumerate() {
        if off != 0 {
            write(
                l.refblock(i as u64).map_err(|e| e.into_error(name))?,
                off,
                "write refcount block",
            )
            .await?;
        }
    }
    if c.l1_size > 0 {
        write(
            serialize_l1_table(&l.l1_entries(c.l1_size)),
            l.l1_offset,
            "write L1 table",
        )
        .await?;
    }
    for t in &l.l2_tables {
        write(
            l.l2_table(t, c.geom).map_err(|e| e.into_error(name))?,
            t.offset,
            "write L2 table",
        )
        .await?;
    }
    if let Some((off, len)) = l.data_area {
        match c.prealloc {
            Preallocation::Falloc => file
                .zero_range(off, len)
                .await
                .map_err(Error::io(name, "allocate", off))?,
            Preallocation::Full => write_zeros(&file, name, off, len).await?,
            _ => {}
        }
    }
    file.set_len(l.file_len)
        .await
        .map_err(Error::io(name, "set length", l.file_len))?;
    file.flush().await.map_err(Error::io(name, "flush", 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_in_qemus_order() {
        let mut o = CreateOptions::qcow2(1 << 20);
        o.compat = Version::V2;
        o.extended_l2 = true;
        o.cluster_size = 8192;
        assert_eq!(check_qcow2(&o), Err(CreateError::ExtendedL2NeedsV3));
        o.compat = Version::V3;
        assert_eq!(check_qcow2(&o), Err(CreateError::ExtendedL2ClusterSize));
        o.cluster_size = 1000;
        assert_eq!(check_qcow2(&o), Err(CreateError::BadClusterSize));
        let mut o = CreateOptions::qcow2(1 << 20);
        o.compat = Version::V2;
        o.refcount_bits = 8;
        o.lazy_refcounts = true;
        assert_eq!(check_qcow2(&o), Err(CreateError::LazyNeedsV3));
        o.lazy_refcounts = false;
        assert_eq!(check_qcow2(&o), Err(CreateError::RefcountBitsNeedV3));
        o.refcount_bits = 16;
        o.data_file = Some("d".into());
        o.compression_type = CompressionType::Zstd;
        assert_eq!(check_qcow2(&o), Err(CreateError::DataFileNeedsV3));
    }
}
