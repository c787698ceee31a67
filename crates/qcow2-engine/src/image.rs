//! [`Image`]: an opened image with its backing chain, the engine's public handle.
//!
//! `Image<B>` is a cheap `Clone` (an `Arc`); clones share caches and files and may be used from many
//! tasks at once. Each image of a chain is an `Image<B>` whose [`Image::backing`] is the next one.

use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use qcow2_io::{Backend, BackendOpen};

use crate::error::{Error, Result};
use crate::info::ImageInfo;
use crate::options::{ImageFormat, OpenOptions};
use crate::qcow2::{CacheStats, Qcow2Layer};
use crate::raw::RawLayer;
use crate::status::BlockStatus;

/// The format-specific part of one image of a chain.
pub(crate) enum Layer<B> {
    Qcow2(Box<Qcow2Layer<B>>),
    Raw(RawLayer<B>),
}

pub(crate) struct Inner<B> {
    pub(crate) layer: Layer<B>,
    pub(crate) backing: Option<Image<B>>,
    pub(crate) info: ImageInfo,
    /// Opened read-only (backing images always are).
    pub(crate) read_only: bool,
}

/// An opened disk image (qcow2 or raw) together with its backing chain.
pub struct Image<B> {
    pub(crate) inner: Arc<Inner<B>>,
}

impl<B> Clone for Image<B> {
    fn clone(&self) -> Self {
        Image {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B> std::fmt::Debug for Image<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("filename", &self.inner.info.filename)
            .field("format", &self.inner.info.format)
            .field("virtual_size", &self.inner.info.virtual_size)
            .field("backing", &self.inner.backing)
            .finish()
    }
}

impl<B: BackendOpen> Image<B> {
    /// Opens the image at `path` and its whole backing chain (unless `opts.follow_backing` is false).
    ///
    /// Backing file names are resolved relative to the directory of the overlay's file name (absolute
    /// names as they are); `backing_fmt` is honoured, otherwise the format is probed by magic; a chain
    /// that loops back on itself is refused ([`Error::BackingLoop`]), and the depth is bounded
    /// ([`Error::ChainTooDeep`]). An external data file name is resolved against the process's current
    /// directory, as QEMU does.
    pub async fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image<B>> {
        crate::chain::open_chain(path.as_ref(), opts).await
    }
}

impl<B: Backend> Image<B> {
    /// Opens an image from an already opened backend, without a backing chain (unallocated clusters read
    /// as zeros). An image that needs an external data file is refused; so is one with a backing file
    /// unless `opts.follow_backing` is false. `name` is used in messages and [`Image::filename`].
    pub async fn open_backend(backend: B, name: &str, opts: &OpenOptions) -> Result<Image<B>> {
        crate::chain::open_single(backend, name, opts, None).await
    }

    /// Opens an image from an already opened backend with `backing` as its backing image (already
    /// opened, by the caller's means: another backend, another chain). The image must name a backing
    /// file (its name is not used to find the file). For tests and embedders that keep images outside
    /// the file system.
    pub async fn open_backend_with_backing(
        backend: B,
        name: &str,
        opts: &OpenOptions,
        backing: Image<B>,
    ) -> Result<Image<B>> {
        crate::chain::open_single(backend, name, opts, Some(backing)).await
    }

    /// The virtual disk size in bytes (a multiple of 512).
    pub fn virtual_size(&self) -> u64 {
        self.inner.info.virtual_size
    }

    /// The format of this image.
    pub fn format(&self) -> ImageFormat {
        self.inner.info.format
    }

    /// The file name of this image as opened.
    pub fn filename(&self) -> &str {
        &self.inner.info.filename
    }

    /// What `qemu-img info` shows about this image (without `actual-size`, see [`Image::actual_size`]).
    pub fn info(&self) -> ImageInfo {
        self.inner.info.clone()
    }

    /// The next image in the chain, if a backing file was opened.
    pub fn backing(&self) -> Option<&Image<B>> {
        self.inner.backing.as_ref()
    }

    /// This image followed by its backing images, top to bottom.
    pub fn chain(&self) -> Vec<&Image<B>> {
        let mut v = vec![self];
        let mut cur = self;
        while let Some(b) = cur.backing() {
            v.push(b);
            cur = b;
        }
        v
    }

    /// Bytes allocated on the host for this image's file, as `actual-size` of `qemu-img info` (which,
    /// in QEMU 10, does not count an external data file); `None` where the backend cannot tell.
    pub async fn actual_size(&self) -> Result<Option<u64>> {
        let name = &self.inner.info.filename;
        let file = match &self.inner.layer {
            Layer::Raw(r) => &r.file,
            Layer::Qcow2(q) => &q.file,
        };
        file.allocated_size()
            .await
            .map_err(Error::io(name, "stat", 0))
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`. Any range within the virtual size is
    /// allowed (unaligned, crossing clusters and L2 tables). Unallocated ranges read from the backing
    /// chain, or as zeros.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::read::read(self, offset, buf).await
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset` into the owned buffer `buf` and hands it
    /// back filled; same semantics and range rules as [`Image::read`].
    ///
    /// When the request maps to one host-contiguous run of data in one image of the chain (the usual
    /// case for requests within a cluster), `buf` itself is given to the backend, saving the copy that
    /// [`Image::read`] makes from the backend's buffer into the caller's slice. With `O_DIRECT`, pass a
    /// buffer aligned to `qcow2_io::DIRECT_ALIGN` (see `qcow2_io::aligned::aligned_bytes_mut`) so that
    /// aligned requests are not bounced either. On error the buffer is dropped.
    pub async fn read_owned(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        crate::read::read_owned(self, offset, buf).await
    }

    /// The status of the range starting at `offset`, at most `max_len` bytes (see [`BlockStatus`]), with
    /// the meaning of one `qemu-img map --output=json` extent. `offset` must be below the virtual size
    /// and `max_len` non-zero.
    pub async fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        crate::status::block_status(self, offset, max_len).await
    }

    /// Whether this handle was opened read-only (writes fail with [`Error::ReadOnly`]).
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Writes `data` to the virtual disk at `offset`. Any range within the virtual size is allowed
    /// (unaligned, crossing clusters and L2 tables). The data is on the host when this returns, but
    /// durable only after [`Image::flush`].
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        crate::write::write(self, offset, bytes::Bytes::copy_from_slice(data)).await
    }

    /// As [`Image::write`], with an owned buffer that is handed to the backend without a copy where the
    /// write needs no copy-on-write.
    pub async fn write_bytes(&self, offset: u64, data: bytes::Bytes) -> Result<()> {
        crate::write::write(self, offset, data).await
    }

    /// Makes `[offset, offset + len)` read as zeros, as qemu-io's `write -z` (`unmap`: `-u`, the host
    /// clusters may be released). Whole clusters become zero clusters; partial clusters are written.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        crate::write::write_zeroes(self, offset, len, unmap).await
    }

    /// Discards `[offset, offset + len)` as qemu-io's `discard` (unmap enabled): only whole clusters are
    /// discarded; the host file gets a hole where clusters are freed.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        crate::write::discard(self, offset, len).await
    }

    /// Makes every write completed before this call durable. A failed flush is sticky: every later
    /// flush fails too.
    pub async fn flush(&self) -> Result<()> {
        crate::write::flush(self).await
    }

    /// Flushes and closes a read-write image cleanly: refcounts written, lazy-refcounts dirty bit
    /// cleared. The handle stays usable for reads; call it once, when done writing.
    pub async fn close(&self) -> Result<()> {
        crate::write::close(self).await
    }

    /// L2 cache statistics of this image (qcow2 only).
    pub async fn l2_cache_stats(&self) -> Option<CacheStats> {
        match &self.inner.layer {
            Layer::Qcow2(q) => Some(q.cache_stats().await),
            Layer::Raw(_) => None,
        }
    }
}
