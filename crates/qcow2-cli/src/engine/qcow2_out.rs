//! `convert -O qcow2`: the engine's image as the convert driver's output.
//!
//! The target is created by the engine (`Image::create`, unless `-n`), opened read-write without a
//! backing chain, filled by the generic convert driver (which skips zero and unallocated source ranges,
//! so they stay unallocated in the target, as with qemu-img convert), then closed (flush, refcounts,
//! clean state) even after a failed copy.

use bytes::Bytes;
use qcow2_engine::{Image, ImageFormat};
use qcow2_io::{Backend, BackendOpen};

use super::{data_mode, open, EngineSource};
use crate::args::ConvertArgs;
use crate::convert::{self, ConvertOptions};
use crate::error::CliError;
use crate::progress::Progress;
use crate::source::BlockSink;

/// A qcow2 image opened read-write as a [`BlockSink`] (`convert -O qcow2`).
struct ImageSink<B: Backend> {
    image: Image<B>,
}

impl<B: Backend> ImageSink<B> {
    fn error(&self, offset: u64, e: qcow2_engine::Error) -> CliError {
        CliError::Write {
            path: self.image.filename().to_string(),
            offset,
            reason: e.to_string(),
        }
    }
}

impl<B: Backend> BlockSink for ImageSink<B> {
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), CliError> {
        self.image
            .write_bytes(offset, data)
            .await
            .map_err(|e| self.error(offset, e))
    }

    async fn zero(&self, offset: u64, len: u64) -> Result<(), CliError> {
        // Only with -n (an existing target): zero clusters, host clusters released, as qemu-img does.
        self.image
            .write_zeroes(offset, len, true)
            .await
            .map_err(|e| self.error(offset, e))
    }

    async fn set_len(&self, len: u64) -> Result<(), CliError> {
        // The convert driver truncates a fresh raw output to 0 and extends it to the virtual size; a
        // freshly created image already has that size and reads as zeros, so both are no-ops here.
        if len == 0 || len == self.image.virtual_size() {
            return Ok(());
        }
        Err(CliError::Write {
            path: self.image.filename().to_string(),
            offset: len,
            reason: format!(
                "the output image has {} bytes, not the {len} needed",
                self.image.virtual_size()
            ),
        })
    }

    async fn flush(&self) -> Result<(), CliError> {
        self.image.flush().await.map_err(|e| self.error(0, e))
    }
}

/// Where `convert -O qcow2` writes.
pub(super) struct ConvertTarget<'a> {
    /// The output file.
    pub(super) path: &'a str,
    /// `-t none`: O_DIRECT.
    pub(super) direct: bool,
    /// `-n`: the target exists and is not created.
    pub(super) existing: bool,
}

/// The engine's [`CreateOptions`](qcow2_engine::CreateOptions) for `convert -O qcow2 -o ...`, parsed by
/// `qcow2 create`'s option parser: the source's size unless `-o size=` says otherwise.
fn convert_create_options(size: u64, text: &str) -> Result<qcow2_engine::CreateOptions, CliError> {
    let list = crate::create::parse_options(ImageFormat::Qcow2, &[text.to_string()])
        .map_err(CliError::Usage)?;
    let mut o =
        crate::create::to_create_options(ImageFormat::Qcow2, &list).map_err(CliError::Usage)?;
    if o.size.is_none() {
        o.size = Some(size);
    }
    Ok(o)
}

/// `qcow2 convert -O qcow2`: create the target with the engine (unless `-n`), open it read-write, copy
/// the source's data (zero and unallocated ranges are not written, so they stay unallocated in the
/// target, as with qemu-img), then close it (flush, refcounts, clean state).
pub(super) async fn convert_to_qcow2<B: BackendOpen>(
    src: Image<B>,
    target: ConvertTarget<'_>,
    parallel: usize,
    a: &ConvertArgs,
) -> Result<i32, CliError> {
    let dst_path = target.path;
    let converting = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        let reason = text
            .strip_prefix(&format!("{dst_path}: "))
            .map(str::to_string)
            .unwrap_or(text);
        CliError::other(format!(
            "{dst_path}: error while converting qcow2: {reason}"
        ))
    };
    if !target.existing {
        let create =
            convert_create_options(src.virtual_size(), a.options.as_deref().unwrap_or(""))?;
        Image::<B>::create(dst_path, &create)
            .await
            .map_err(|e| converting(&e))?;
    }
    let mut mode = data_mode(target.direct);
    mode.follow_backing = false;
    mode.writable = true;
    let dst = open::<B>(dst_path, Some("qcow2"), mode).await?;
    if target.existing && dst.virtual_size() < src.virtual_size() {
        return Err(CliError::other(format!(
            "{dst_path}: output file is smaller than input file"
        )));
    }
    let sink = ImageSink { image: dst };
    let opts = ConvertOptions {
        parallel,
        min_sparse: a.min_sparse.unwrap_or(4096),
        existing_target: target.existing,
    };
    let mut progress = Progress::new(a.verbosity.show_progress(), 1.0);
    let source = EngineSource { image: src };
    let result = convert::convert(&source, &sink, opts, &mut progress).await;
    progress.end();
    // Close even after a failed copy, so that the image is left consistent; the copy error wins.
    let closed = sink.image.close().await;
    result?;
    closed.map_err(|e| converting(&e))?;
    Ok(0)
}
