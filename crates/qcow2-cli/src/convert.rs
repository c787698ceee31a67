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

/// `-o` options of a qcow2 output, as `qemu-img convert -O qcow2 -o ...` takes them.
///
/// Only the syntax is checked here (known keys, value types, qemu-img's messages); whether a combination
/// makes sense (cluster size a power of two, lazy refcounts need compat 1.1, ...) is the engine's
/// `Image::create` to decide, whose refusal becomes `DST: error while converting qcow2: <why>`.
/// NOTE: `qcow2 create` parses the same keys (crates/qcow2-cli/src/create.rs); the two parsers are to be
/// folded into one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qcow2Opts {
    /// `cluster_size` in bytes.
    pub cluster_size: Option<u64>,
    /// `refcount_bits`.
    pub refcount_bits: Option<u64>,
    /// `compat` (`0.10`, `v2`, `1.1`, `v3`) as given.
    pub compat: Option<String>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `extended_l2`.
    pub extended_l2: Option<bool>,
    /// `compression_type` (`zlib`, `zstd`) as given.
    pub compression_type: Option<String>,
    /// `preallocation` (`off`, `metadata`, `falloc`, `full`) as given.
    pub preallocation: Option<String>,
    /// `size` (overrides the source's virtual size).
    pub size: Option<u64>,
}

/// Splits QEMU's option syntax: `key=value` pairs separated by commas, a doubled comma standing for a
/// comma inside a value.
fn split_options(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    parts
}

/// Parses `-o` for a qcow2 output (several `-o` are joined with commas by the caller).
pub fn parse_qcow2_opts(text: &str) -> Result<Qcow2Opts, CliError> {
    let mut o = Qcow2Opts::default();
    let size = |key: &str, v: &str| {
        crate::size::parse_size(v).map_err(|_| {
            CliError::Usage(format!(
                "Parameter '{key}' expects a non-negative number below 2^64 \
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- \
                 and exabytes, respectively."
            ))
        })
    };
    let flag = |key: &str, v: &str| match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(CliError::Usage(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    };
    for part in split_options(text) {
        if part.is_empty() {
            continue;
        }
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (part.as_str(), None),
        };
        let v = value.unwrap_or("");
        match key {
            "cluster_size" => o.cluster_size = Some(size(key, v)?),
            "refcount_bits" => o.refcount_bits = Some(size(key, v)?),
            "size" => o.size = Some(size(key, v)?),
            // A bare boolean key means "on", as in QEMU's option parser.
            "lazy_refcounts" => o.lazy_refcounts = Some(value.is_none() || flag(key, v)?),
            "extended_l2" => o.extended_l2 = Some(value.is_none() || flag(key, v)?),
            "compat" => o.compat = Some(v.to_string()),
            "compression_type" => o.compression_type = Some(v.to_string()),
            "preallocation" => o.preallocation = Some(v.to_string()),
            "backing_file" | "backing_fmt" | "data_file" | "data_file_raw" | "encryption"
            | "encrypt.format" => {
                return Err(CliError::Usage(format!(
                    "convert: the option '{key}' is not supported for the output yet"
                )))
            }
            other => {
                return Err(CliError::Usage(format!("Invalid parameter '{other}'")));
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod opts_tests {
    use super::*;

    #[test]
    fn qcow2_options() {
        let o = parse_qcow2_opts("cluster_size=4k,refcount_bits=1,compat=0.10,lazy_refcounts=on")
            .map_err(|e| e.to_string());
        assert_eq!(
            o,
            Ok(Qcow2Opts {
                cluster_size: Some(4096),
                refcount_bits: Some(1),
                compat: Some("0.10".into()),
                lazy_refcounts: Some(true),
                ..Default::default()
            })
        );
        let err = |t: &str| parse_qcow2_opts(t).err().map(|e| e.to_string());
        assert_eq!(err("foo=1"), Some("Invalid parameter 'foo'".into()));
        assert_eq!(
            err("lazy_refcounts=maybe"),
            Some("Parameter 'lazy_refcounts' expects 'on' or 'off'".into())
        );
        assert!(err("cluster_size=x").is_some_and(|e| e.starts_with("Parameter 'cluster_size'")));
        assert_eq!(split_options("a=1,,2,b"), vec!["a=1,2", "b"]);
        assert_eq!(
            parse_qcow2_opts("extended_l2").map(|o| o.extended_l2).ok(),
            Some(Some(true))
        );
    }
}
