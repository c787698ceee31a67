//! The async qcow2 engine: create qcow2 and raw images, open them with their backing chains, read and
//! write them.
//!
//! The entry point is [`Image`], generic over a storage backend (`qcow2_io::Backend`):
//! [`Image::create`] makes an image as `qemu-img create` does, [`Image::open`] opens an image and its
//! chain (read-write with `OpenOptions { read_only: false, .. }`), [`Image::read`] and [`Image::write`]
//! serve any range of the virtual disk, [`Image::write_zeroes`], [`Image::discard`], [`Image::flush`]
//! and [`Image::close`] behave as QEMU's, [`Image::block_status`] reports allocation as `qemu-img map`
//! does, [`Image::info`] what `qemu-img info` shows. `Image` is a cheap clone, usable from many tasks
//! at once.
//!
//! Module map (one concept each):
//! - [`error`]: the error type; [`options`]: open options and formats; [`info`]: image information;
//!   [`status`]: block status;
//! - `image`: the handle; `chain`: opening and resolving backing chains; `raw`: raw images;
//! - `qcow2`: header, L1 table, L2 slice cache and lookup, and (`qcow2::write`, `refcount`, `overlap`,
//!   `rebuild`) the write side; `cache`: the LRU cache; `mapping`: extents of a lookup; `read`: the
//!   read path; `write`: the image-level write path; `create`: image creation.
//!
//! The on-disk format is QEMU's `docs/interop/qcow2.txt`; behaviour is checked against QEMU 10.
//!
//! ```no_run
//! # async fn demo() -> qcow2_engine::Result<()> {
//! use qcow2_engine::{Image, OpenOptions};
//! use qcow2_io::StdFileBackend;
//!
//! let img = Image::<StdFileBackend>::open("disk.qcow2", &OpenOptions::default()).await?;
//! let mut buf = vec![0u8; 4096];
//! img.read(1 << 20, &mut buf).await?;
//! let st = img.block_status(0, img.virtual_size()).await?;
//! println!("first {} bytes: data={} zero={} depth={}", st.len, st.data, st.zero, st.depth);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod buf;
mod cache;
mod chain;
pub mod check;
mod create;
pub mod error;
mod image;
pub mod info;
mod mapping;
pub mod options;
mod qcow2;
mod raw;
mod read;
pub mod status;
mod write;

pub use chain::MAX_CHAIN_DEPTH;
pub use check::{check_backend, check_file, CheckReport, Repair};
pub use create::{CompressionType, CreateError, CreateOptions, Preallocation, Version};
pub use error::{Error, Result};
pub use image::Image;
pub use info::{ImageInfo, Qcow2Info, Snapshot};
pub use options::{ImageFormat, OpenOptions};
pub use qcow2::CacheStats;
pub use status::BlockStatus;
