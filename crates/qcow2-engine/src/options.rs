//! Options for opening an image ([`OpenOptions`]) and the image formats the engine knows ([`ImageFormat`]).

use std::fmt;

/// The format of one image file in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// QCOW2 (QEMU's `docs/interop/qcow2.txt`), versions 2 and 3.
    Qcow2,
    /// A raw disk image: guest offset = file offset.
    Raw,
}

impl ImageFormat {
    /// The name QEMU uses for the format (`"qcow2"` or `"raw"`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    /// Parses a format name as given to `-f`/`-F` or stored as a backing format (`"qcow2"`, `"raw"`).
    /// Returns `None` for any other name.
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        match name {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to open an image and its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open the top image read-only (backing images are always opened read-only).
    pub read_only: bool,
    /// The format of the top image; `None` probes by magic (qcow2 magic, else raw), as QEMU does.
    pub format: Option<ImageFormat>,
    /// Open the backing chain. When false, unallocated clusters of the top image read as zeros (like
    /// QEMU's `backing: null`); the backing file name is still reported by `info`.
    pub follow_backing: bool,
    /// Size of the L2 slice cache of each qcow2 image in the chain, in bytes. `None`: large enough to map
    /// the whole image, capped at 32 MiB (QEMU's default on Linux).
    pub l2_cache_bytes: Option<u64>,
    /// Bypass the host page cache (`O_DIRECT`) for every file of the chain.
    pub direct: bool,
    /// Open for metadata queries only (QEMU's `BDRV_O_NO_IO`, as `qemu-img info` uses): the external data
    /// file is not opened at all (nor required to exist or be named); reads and block status of that
    /// image then fail. Backing files are opened as usual (set `follow_backing` to false to skip them).
    pub metadata_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            format: None,
            follow_backing: true,
            l2_cache_bytes: None,
            direct: false,
            metadata_only: false,
        }
    }
}
