//! Image information as `qemu-img info` reports it ([`ImageInfo`], [`Qcow2Info`]).
//!
//! The fields mirror the JSON keys of `qemu-img info --output=json` (`virtual-size`, `cluster-size`,
//! `backing-filename`, `full-backing-filename`, `backing-filename-format`, `dirty-flag` and the qcow2
//! `format-specific` data). `actual-size` needs I/O and comes from [`crate::Image::actual_size`].

pub use qcow2_format::snapshot::Snapshot;

use crate::options::ImageFormat;

/// What `qemu-img info` shows about one image of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The file name as given to open (or as resolved from the overlay's backing name).
    pub filename: String,
    /// The image format.
    pub format: ImageFormat,
    /// The virtual disk size in bytes (a multiple of 512).
    pub virtual_size: u64,
    /// The cluster size in bytes (qcow2 only).
    pub cluster_size: Option<u64>,
    /// The backing file name exactly as stored in the image.
    pub backing_filename: Option<String>,
    /// The backing file name resolved against the overlay's directory (what is opened).
    pub full_backing_filename: Option<String>,
    /// The backing format stored in the image (`backing_fmt` header extension).
    pub backing_format: Option<String>,
    /// The dirty bit (incompatible bit 0; lazy refcounts in use and not cleanly closed).
    pub dirty: bool,
    /// Internal snapshots (qcow2 only), in table order, as parsed by the format crate (QEMU's limits).
    pub snapshots: Vec<Snapshot>,
    /// qcow2-specific information (`format-specific` data); `None` for raw images.
    pub qcow2: Option<Qcow2Info>,
}

/// The qcow2 `format-specific` data of `qemu-img info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `"0.10"` for version 2, `"1.1"` for version 3.
    pub compat: String,
    /// Lazy refcounts (compatible bit 0).
    pub lazy_refcounts: bool,
    /// Width of a refcount entry in bits (1..=64).
    pub refcount_bits: u64,
    /// The corrupt bit (incompatible bit 1).
    pub corrupt: bool,
    /// Extended L2 entries with 32 subclusters (incompatible bit 4).
    pub extended_l2: bool,
    /// `"zlib"` or `"zstd"`.
    pub compression_type: String,
    /// The external-data-file incompatible bit (2): data lives in another file. Can be set without a
    /// recorded name (`data_file` is then `None`); qemu-img info still reports `data-file-raw` then.
    pub has_data_file: bool,
    /// The external data file name as stored in the image, if any.
    pub data_file: Option<String>,
    /// The `data_file_raw` autoclear bit.
    pub data_file_raw: bool,
}
