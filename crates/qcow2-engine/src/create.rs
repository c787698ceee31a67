//! Creating images: `Image::create`, the engine side of `qemu-img create`.
//!
//! SKELETON (issue 3): H-create implements. `CreateOptions` may gain fields; keep the names.

use std::path::Path;

use qcow2_io::BackendOpen;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::options::ImageFormat;

/// Options of a new image, as `qemu-img create -f FMT -o ...` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Format of the new image.
    pub format: ImageFormat,
    /// Virtual size in bytes; `None` takes the backing file's size.
    pub size: Option<u64>,
}

impl<B: BackendOpen> Image<B> {
    /// Creates a new image at `path` (overwriting an existing file, as qemu-img does).
    pub async fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let _ = opts;
        Err(Error::Unsupported {
            path: path.as_ref().display().to_string(),
            what: "creating images".into(),
        })
    }
}
