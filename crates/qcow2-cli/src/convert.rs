//! `convert -O raw`: copy an image's guest content into a sparse raw file.
//!
//! The source is walked by block status. Ranges that read as zero are not written (the freshly truncated
//! output reads as zeros there, and stays sparse); other ranges are read in chunks of at most
//! [`BUF_SIZE`] with several chunks in flight, and inside each chunk, blocks of `min_sparse` bytes that
//! are all zeros are skipped too (qemu-img's `-S`, default 4 KiB). With `-S 0` every byte is written.
//! With `-n` (existing output, not created) zero ranges are deallocated explicitly instead.

use bytes::Bytes;
use futures::stream::{self, TryStreamExt};

use crate::error::CliError;
use crate::progress::Progress;
use crate::source::{BlockSink, BlockSource};

/// Largest chunk read and written at once.
pub const BUF_SIZE: u64 = 2 << 20;

/// How to convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Chunks in flight (qemu-img `-m`, default 8).
    pub parallel: usize,
    /// Zero runs at least this long inside data are not written (qemu-img `-S`); 0 writes everything.
    pub min_sparse: u64,
    /// The output exists already and was not truncated (qemu-img `-n`).
    pub existing_target: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            parallel: 8,
            min_sparse: 4096,
            existing_target: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Data { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

impl Work {
    fn len(&self) -> u64 {
        match *self {
            Work::Data { len, .. } | Work::Zero { len, .. } => len,
        }
    }
}

/// The non-zero runs of `buf` (which starts at guest `base`), at `block` granularity aligned to guest
/// offsets: each run is a maximal union of adjacent blocks holding a non-zero byte. Returns `(start, end)`
/// indices into `buf`. With `block == 0` the whole buffer is one run.
pub fn data_runs(buf: &[u8], base: u64, block: u64) -> Vec<(usize, usize)> {
    if block == 0 {
        return if buf.is_empty() {
            vec![]
        } else {
            vec![(0, buf.len())]
        };
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        // End of the block containing `pos`, aligned to guest offsets.
        let guest = base + pos as u64;
        let to_boundary = (block - guest % block) as usize;
        let end = (pos + to_boundary).min(buf.len());
        if buf[pos..end].iter().any(|&b| b != 0) {
            match runs.last_mut() {
                Some(last) if last.1 == pos => last.1 = end,
                _ => runs.push((pos, end)),
            }
        }
        pos = end;
    }
    runs
}

/// Copies `src`'s guest content to `dst` (already opened); sets `dst`'s length to the virtual size.
pub async fn convert<S: BlockSource, D: BlockSink>(
    src: &S,
    dst: &D,
    opts: ConvertOptions,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let total = src.size();
    progress.set(0.0);
    if !opts.existing_target {
        // A fresh raw file: truncate, then extend; everything reads as zeros and is unallocated.
        dst.set_len(0).await?;
        dst.set_len(total).await?;
    }

    // The planner: block status, sequentially, cut into work items.
    let planner = stream::try_unfold(0u64, |offset| async move {
        if offset >= total {
            return Ok::<_, CliError>(None);
        }
        let ext = src.block_status(offset, total - offset).await?;
        if ext.len == 0 || ext.len > total - offset {
            return Err(CliError::Status {
                path: src.name().to_string(),
                offset,
                reason: format!(
                    "block status returned length {} for a query of {} bytes",
                    ext.len,
                    total - offset
                ),
            });
        }
        let to_boundary = BUF_SIZE - offset % BUF_SIZE;
        let len = ext.len.min(to_boundary);
        let work = if ext.zero {
            Work::Zero { offset, len }
        } else {
            Work::Data { offset, len }
        };
        Ok(Some((work, offset + len)))
    });

    let done = planner
        .map_ok(|work| async move { do_work(src, dst, work, opts).await.map(|()| work.len()) })
        .try_buffer_unordered(opts.parallel.max(1));
    let denom = total.max(1) as f32;
    let mut done = std::pin::pin!(done);
    while let Some(len) = done.try_next().await? {
        progress.add(len as f32 / denom * 100.0);
    }
    dst.flush().await?;
    progress.set(100.0);
    Ok(())
}

async fn do_work<S: BlockSource, D: BlockSink>(
    src: &S,
    dst: &D,
    work: Work,
    opts: ConvertOptions,
) -> Result<(), CliError> {
    match work {
        Work::Zero { offset, len } => {
            if opts.min_sparse == 0 {
                // Fully allocated output: write the zeros (len <= BUF_SIZE).
                dst.write(offset, Bytes::from(vec![0u8; len as usize]))
                    .await
            } else if opts.existing_target {
                dst.zero(offset, len).await
            } else {
                Ok(())
            }
        }
        Work::Data { offset, len } => {
            // len <= BUF_SIZE: bounded allocation.
            let mut buf = vec![0u8; len as usize];
            src.read(offset, &mut buf).await?;
            let runs = data_runs(&buf, offset, opts.min_sparse);
            let buf = Bytes::from(buf);
            if opts.existing_target && opts.min_sparse != 0 {
                // Holes between the runs must be made zero in an existing file.
                let mut pos = 0usize;
                for &(s, e) in &runs {
                    if s > pos {
                        dst.zero(offset + pos as u64, (s - pos) as u64).await?;
                    }
                    pos = e;
                }
                if pos < buf.len() {
                    dst.zero(offset + pos as u64, (buf.len() - pos) as u64)
                        .await?;
                }
            }
            for (s, e) in runs {
                dst.write(offset + s as u64, buf.slice(s..e)).await?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mem::{MemImage, MemSink};

    #[test]
    fn runs_skip_zero_blocks() {
        let mut b = vec![0u8; 16384];
        b[10] = 1;
        b[4096 * 2 + 5] = 1;
        b[4096 * 3 + 4095] = 1;
        assert_eq!(data_runs(&b, 0, 4096), vec![(0, 4096), (8192, 16384)]);
        // Guest alignment: the buffer starts 512 bytes into a block.
        assert_eq!(
            data_runs(&b, 512, 4096),
            vec![(0, 3584), (7680, 11776), (15872, 16384)]
        );
        assert_eq!(data_runs(&b, 0, 0), vec![(0, 16384)]);
        assert_eq!(data_runs(&[0u8; 100], 0, 4096), vec![]);
    }

    fn run(src: &MemImage, opts: ConvertOptions) -> MemSink {
        let sink = MemSink::default();
        let mut p = Progress::new(false, 1.0);
        let rt = tokio::runtime::Builder::new_current_thread().build();
        let r = match rt {
            Ok(rt) => rt
                .block_on(convert(src, &sink, opts, &mut p))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(r, Ok(()));
        sink
    }

    #[test]
    fn sparse_copy_is_identical_and_skips_zeros() {
        let mut d = vec![0u8; 5 << 20];
        for (i, x) in d.iter_mut().enumerate().skip(100_000).take(3 << 20) {
            *x = (i % 7) as u8 + 1;
        }
        let src = MemImage::sparse("s", d.clone());
        let sink = run(&src, ConvertOptions::default());
        assert!(*sink.data.borrow() == d);
        let written: usize = sink.writes.borrow().iter().map(|w| w.1).sum();
        assert!(written < (3 << 20) + 8192, "wrote {written}");
        // Dense source: zero blocks inside data are skipped as well.
        let src = MemImage::dense("s", d.clone());
        let sink = run(&src, ConvertOptions::default());
        assert!(*sink.data.borrow() == d);
        let written: usize = sink.writes.borrow().iter().map(|w| w.1).sum();
        assert!(written < (3 << 20) + 8192, "wrote {written}");
        // -S 0 writes everything.
        let sink = run(
            &src,
            ConvertOptions {
                min_sparse: 0,
                ..Default::default()
            },
        );
        let written: usize = sink.writes.borrow().iter().map(|w| w.1).sum();
        assert_eq!(written, 5 << 20);
        assert!(*sink.data.borrow() == d);
    }

    #[test]
    fn odd_sizes() {
        let d: Vec<u8> = (0..1000u32).map(|i| (i % 255) as u8 + 1).collect();
        let src = MemImage::dense("s", d.clone());
        let sink = run(
            &src,
            ConvertOptions {
                parallel: 1,
                ..Default::default()
            },
        );
        assert!(*sink.data.borrow() == d);
        let src = MemImage::dense("s", vec![]);
        let sink = run(&src, ConvertOptions::default());
        assert!(sink.data.borrow().is_empty());
    }
}
