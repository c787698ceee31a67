//! The commands on top of the engine: opening images, and the [`BlockSource`]/[`BlockSink`] adapters.
//!
//! Every command body is an async fn generic over `B: qcow2_io::BackendOpen`, so that it runs on the
//! multi-threaded Tokio runtime with the std-file backend and on tokio-uring with the local backend.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use qcow2_engine::{Image, ImageFormat, ImageInfo, OpenOptions};
use qcow2_io::{Backend, BackendOpen, OpenFlags};

use crate::args::{self, BenchArgs, CompareArgs, ConvertArgs, InfoArgs, MapArgs, Output};
use crate::bench::{self, BenchParams, BenchTarget, FlushPlan};
use crate::compare;
use crate::convert::{self, ConvertOptions};
use crate::error::CliError;
use crate::info_fmt::{self, FileRecord, InfoRecord, Qcow2Record};
use crate::map_fmt::{MapEntry, Mapper, OutputFormat};
use crate::progress::Progress;
use crate::source::{BlockSink, BlockSource, Extent};

mod qcow2_out;
use qcow2_out::{convert_to_qcow2, ConvertTarget};

/// Largest block-status query of `map` (qemu-img probes 1 GiB at a time).
const MAP_PROBE: u64 = 1 << 30;

/// An opened image as a [`BlockSource`].
pub struct EngineSource<B: Backend> {
    image: Image<B>,
}

impl<B: Backend> BlockSource for EngineSource<B> {
    fn name(&self) -> &str {
        self.image.filename()
    }

    fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    async fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent, CliError> {
        self.image
            .block_status(offset, max_len)
            .await
            .map_err(|e| CliError::Status {
                path: self.name().to_string(),
                offset,
                reason: e.to_string(),
            })
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CliError> {
        self.image
            .read(offset, buf)
            .await
            .map_err(|e| CliError::Read {
                path: self.name().to_string(),
                offset,
                reason: e.to_string(),
            })
    }
}

impl<B: Backend> EngineSource<B> {
    /// [`Image::read_owned`] with the CLI's read error.
    async fn read_buf(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, CliError> {
        self.image
            .read_owned(offset, buf)
            .await
            .map_err(|e| CliError::Read {
                path: self.name().to_string(),
                offset,
                reason: e.to_string(),
            })
    }
}

impl<B: Backend> BenchTarget for EngineSource<B> {
    fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    async fn read_owned(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, CliError> {
        self.read_buf(offset, buf).await
    }

    async fn write_owned(&self, offset: u64, data: Bytes) -> Result<(), CliError> {
        self.image
            .write_bytes(offset, data)
            .await
            .map_err(|e| CliError::Write {
                path: self.name().to_string(),
                offset,
                reason: e.to_string(),
            })
    }

    async fn flush(&self) -> Result<(), CliError> {
        self.image.flush().await.map_err(|e| CliError::Write {
            path: self.name().to_string(),
            offset: 0,
            reason: e.to_string(),
        })
    }
}

/// An output file as a [`BlockSink`].
pub struct FileSink<B: Backend> {
    file: B,
    name: String,
}

impl<B: Backend> BlockSink for FileSink<B> {
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), CliError> {
        self.file
            .write_at(data, offset)
            .await
            .map_err(|e| self.write_error(offset, e))
    }

    async fn zero(&self, offset: u64, len: u64) -> Result<(), CliError> {
        self.file
            .punch_hole(offset, len)
            .await
            .map_err(|e| self.write_error(offset, e))
    }

    async fn set_len(&self, len: u64) -> Result<(), CliError> {
        self.file
            .set_len(len)
            .await
            .map_err(|e| self.write_error(len, e))
    }

    async fn flush(&self) -> Result<(), CliError> {
        self.file.flush().await.map_err(|e| self.write_error(0, e))
    }
}

impl<B: Backend> FileSink<B> {
    fn write_error(&self, offset: u64, e: std::io::Error) -> CliError {
        CliError::Write {
            path: self.name.clone(),
            offset,
            reason: e.to_string(),
        }
    }
}

/// Parses a `-f`/`-F` format name.
fn parse_format(path: &str, fmt: Option<&str>) -> Result<Option<ImageFormat>, CliError> {
    match fmt {
        None => Ok(None),
        Some(name) => ImageFormat::from_name(name)
            .map(Some)
            .ok_or_else(|| CliError::Open {
                path: path.to_string(),
                reason: format!("Unknown driver '{name}'"),
            }),
    }
}

/// How a command opens its image.
#[derive(Debug, Clone, Copy, Default)]
struct OpenMode {
    /// Open the backing chain.
    follow_backing: bool,
    /// O_DIRECT.
    direct: bool,
    /// Metadata only, as `qemu-img info`: the external data file is not opened.
    metadata_only: bool,
    /// Open the top image read-write (`bench -w`); backing images stay read-only.
    writable: bool,
}

/// The mode of the commands that read guest data: whole chain, page cache unless `direct`.
fn data_mode(direct: bool) -> OpenMode {
    OpenMode {
        follow_backing: true,
        direct,
        metadata_only: false,
        writable: false,
    }
}

/// Opens `path` (and, with `mode.follow_backing`, its chain) read-only.
async fn open<B: BackendOpen>(
    path: &str,
    fmt: Option<&str>,
    mode: OpenMode,
) -> Result<Image<B>, CliError> {
    // Future engine options keep their defaults.
    #[allow(clippy::needless_update)]
    let opts = OpenOptions {
        read_only: !mode.writable,
        format: parse_format(path, fmt)?,
        follow_backing: mode.follow_backing,
        direct: mode.direct,
        metadata_only: mode.metadata_only,
        l2_cache_bytes: l2_cache_from_env()?,
        ..OpenOptions::default()
    };
    Image::<B>::open(path, &opts).await.map_err(|e| {
        // The engine's messages start with the file they concern; do not repeat the name just given.
        let text = e.to_string();
        let reason = text
            .strip_prefix(&format!("{path}: "))
            .map(str::to_string)
            .unwrap_or(text);
        CliError::Open {
            path: path.to_string(),
            reason,
        }
    })
}

/// Environment variable setting the L2 cache size of every image opened (bytes, k/M/G suffixes allowed).
pub const L2_CACHE_ENV: &str = "QCOW2_L2_CACHE_SIZE";

pub(crate) fn l2_cache_from_env() -> Result<Option<u64>, CliError> {
    match std::env::var(L2_CACHE_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(CliError::Usage(format!("{L2_CACHE_ENV}: not valid UTF-8")))
        }
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) => crate::size::parse_size(&v)
            .map(Some)
            .map_err(|e| CliError::Usage(format!("{L2_CACHE_ENV}: {e}"))),
    }
}

fn stdout_error(e: std::io::Error) -> CliError {
    CliError::other(format!("error writing to standard output: {e}"))
}

/// `qcow2 info`.
pub async fn info<B: BackendOpen>(a: &InfoArgs) -> Result<i32, CliError> {
    let output = a.report.output()?;
    let path = args::one_file(&a.files)?;
    // As qemu-img: without --backing-chain the backing file is not opened (it may be missing).
    // Nor is an external data file (qemu-img info never opens it, so untrusted images can be inspected).
    let mode = OpenMode {
        follow_backing: a.backing_chain,
        direct: false,
        metadata_only: true,
        writable: false,
    };
    let image = open::<B>(path, a.report.format.as_deref(), mode).await?;
    let layers: Vec<&Image<B>> = if a.backing_chain {
        image.chain()
    } else {
        vec![&image]
    };
    let mut records = Vec::with_capacity(layers.len());
    for layer in layers {
        let actual = layer
            .actual_size()
            .await
            .map_err(|e| CliError::other(e.to_string()))?;
        records.push(info_record(layer.info(), actual));
    }
    let text = match output {
        Output::Json => info_fmt::render_json(&records, a.backing_chain),
        Output::Human => info_fmt::render_human(&records),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(stdout_error)?;
    Ok(0)
}

/// Builds the printable record of one image.
fn info_record(info: ImageInfo, engine_actual_size: Option<u64>) -> InfoRecord {
    // qemu-img reports the protocol node's length rounded up to whole sectors, and the image's
    // `actual-size` as the allocation of the image file itself (not counting an external data file).
    let file = std::fs::metadata(&info.filename).ok().map(|m| FileRecord {
        filename: info.filename.clone(),
        length: m.len().div_ceil(512).saturating_mul(512),
        actual_size: Some(m.blocks().saturating_mul(512)),
        protocol: if m.file_type().is_block_device() || m.file_type().is_char_device() {
            "host_device"
        } else {
            "file"
        },
    });
    let actual_size = file
        .as_ref()
        .and_then(|f| f.actual_size)
        .or(engine_actual_size);
    InfoRecord {
        filename: info.filename,
        format: info.format.name().to_string(),
        virtual_size: info.virtual_size,
        actual_size,
        cluster_size: info.cluster_size,
        dirty: info.dirty,
        backing_filename: info.backing_filename,
        full_backing_filename: info.full_backing_filename,
        backing_format: info.backing_format,
        snapshots: info.snapshots,
        qcow2: info.qcow2.map(|q| Qcow2Record {
            compat: q.compat,
            compression_type: q.compression_type,
            lazy_refcounts: q.lazy_refcounts,
            refcount_bits: q.refcount_bits,
            corrupt: q.corrupt,
            extended_l2: q.extended_l2,
            data_file: q.data_file,
            data_file_raw: q.has_data_file.then_some(q.data_file_raw),
        }),
        file,
    }
}

/// The host file holding the data of the layer at `depth` (its data file, if it has one).
fn data_filename<B: Backend>(chain: &[&Image<B>], depth: u32) -> Option<String> {
    let layer = chain.get(depth as usize)?;
    let info = layer.info();
    Some(
        info.qcow2
            .and_then(|q| q.data_file)
            .unwrap_or(info.filename),
    )
}

/// `qcow2 map`.
pub async fn map<B: BackendOpen>(a: &MapArgs) -> Result<i32, CliError> {
    let output = a.report.output()?;
    let path = args::one_file(&a.files)?;
    let image = open::<B>(path, a.report.format.as_deref(), data_mode(false)).await?;
    let chain = image.chain();
    let size = image.virtual_size();
    let start = a.start_offset.unwrap_or(0);
    let end = match a.max_length {
        Some(max) => start.saturating_add(max).min(size),
        None => size,
    };
    let format = match output {
        Output::Json => OutputFormat::Json,
        Output::Human => OutputFormat::Human,
    };
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    let map_err = |e: crate::map_fmt::MapError| match e {
        crate::map_fmt::MapError::Unmappable => CliError::other(format!("{path}: {e}")),
        crate::map_fmt::MapError::Output(io) => stdout_error(io),
    };
    let mut mapper = Mapper::new(out, format, start).map_err(map_err)?;
    while mapper.next_offset() < end {
        let offset = mapper.next_offset();
        let n = (end - offset).min(MAP_PROBE);
        let st = image
            .block_status(offset, n)
            .await
            .map_err(|e| CliError::Status {
                path: path.to_string(),
                offset,
                reason: e.to_string(),
            })?;
        if st.len == 0 || st.len > n {
            return Err(CliError::Status {
                path: path.to_string(),
                offset,
                reason: format!(
                    "block status returned length {} for a query of {n} bytes",
                    st.len
                ),
            });
        }
        let filename = st.offset.and_then(|_| data_filename(&chain, st.depth));
        mapper
            .push(MapEntry {
                start: offset,
                length: st.len,
                depth: st.depth,
                present: st.present,
                zero: st.zero,
                data: st.data,
                compressed: st.compressed,
                offset: st.offset,
                filename,
            })
            .map_err(map_err)?;
    }
    mapper.finish().map_err(map_err)?;
    Ok(0)
}

/// True when `a` and `b` name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// `qcow2 convert`.
pub async fn convert<B: BackendOpen>(a: &ConvertArgs) -> Result<i32, CliError> {
    if a.files.len() < 2 {
        return Err(CliError::Usage("Must specify image file name".into()));
    }
    if a.files.len() > 2 {
        return Err(CliError::Usage(
            "concatenating several source images is not supported".into(),
        ));
    }
    let (src_path, dst_path) = (a.files[0].as_str(), a.files[1].as_str());
    let qcow2_out = match a.output_format.as_deref() {
        None | Some("raw") => false,
        Some("qcow2") => true,
        Some(other) => {
            return Err(CliError::Usage(format!(
                "{dst_path}: output format '{other}' is not supported yet (only raw and qcow2)"
            )))
        }
    };
    if a.compress {
        return Err(CliError::Usage(format!(
            "{dst_path}: {}",
            if qcow2_out {
                "Compressed output is not supported yet"
            } else {
                "Compression not supported for this file format"
            }
        )));
    }
    // qcow2 `-o` options are parsed with `qcow2 create`'s parser when the target is created.
    if !qcow2_out {
        if let Some(o) = a.options.as_deref().filter(|o| !o.is_empty()) {
            return Err(CliError::Usage(format!(
                "{dst_path}: Invalid options for file format 'raw': {o}"
            )));
        }
    }
    let parallel = match a.parallel.as_deref() {
        None => 8,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=16).contains(&n) => n,
            _ => return Err(CliError::Usage(
                "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
                    .into(),
            )),
        },
    };
    let dst_direct = args::cache_is_direct(a.target_cache.as_deref())?;
    let src_direct = args::cache_is_direct(a.source_cache.as_deref())?;
    let image = open::<B>(src_path, a.format.as_deref(), data_mode(src_direct)).await?;
    for layer in image.chain() {
        let info = layer.info();
        let mut files = vec![info.filename];
        files.extend(info.qcow2.and_then(|q| q.data_file));
        if files
            .iter()
            .any(|f| same_file(Path::new(f), Path::new(dst_path)))
        {
            return Err(CliError::other(format!(
                "{dst_path}: the output file is also an input ({src_path} or its backing chain); refusing to overwrite it"
            )));
        }
    }
    if qcow2_out {
        let target = ConvertTarget {
            path: dst_path,
            direct: dst_direct,
            existing: a.no_create,
        };
        return convert_to_qcow2::<B>(image, target, parallel, a).await;
    }
    // A block device cannot be truncated: write into it as into an existing file (as qemu-img does).
    let existing = a.no_create
        || std::fs::metadata(dst_path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
    let flags = OpenFlags {
        read_only: false,
        create: !existing,
        direct: false,
    };
    let file = B::open(Path::new(dst_path), flags).await.map_err(|e| {
        CliError::other(format!(
            "{dst_path}: error while converting raw: Could not create '{dst_path}': {e}"
        ))
    })?;
    let sink = FileSink {
        file,
        name: dst_path.to_string(),
    };
    if existing {
        let len = sink.file.len().await.map_err(|e| sink.write_error(0, e))?;
        if len < image.virtual_size() {
            return Err(CliError::other(format!(
                "{dst_path}: output file is smaller than input file"
            )));
        }
    }
    let opts = ConvertOptions {
        parallel,
        min_sparse: a.min_sparse.unwrap_or(4096),
        existing_target: existing,
    };
    let mut progress = Progress::new(a.verbosity.show_progress(), 1.0);
    let src = EngineSource { image };
    let result = convert::convert(&src, &sink, opts, &mut progress).await;
    progress.end();
    result?;
    Ok(0)
}

/// `qcow2 compare`. Errors carry qemu-img's exit codes (see [`compare::error_exit_code`]).
pub async fn compare<B: BackendOpen>(a: &CompareArgs) -> Result<i32, CliError> {
    let [p1, p2] = a.files.as_slice() else {
        return Err(CliError::Usage("Expecting two image file names".into()));
    };
    let direct = args::cache_is_direct(a.cache.as_deref())?;
    let i1 = open::<B>(p1, a.format_a.as_deref(), data_mode(direct)).await?;
    let i2 = open::<B>(p2, a.format_b.as_deref(), data_mode(direct)).await?;
    let (s1, s2) = (EngineSource { image: i1 }, EngineSource { image: i2 });
    let mut progress = Progress::new(a.verbosity.show_progress(), 2.0);
    let mut stdout = std::io::stdout().lock();
    let mut sink = std::io::sink();
    let out: &mut dyn Write = if a.verbosity.quiet {
        &mut sink
    } else {
        &mut stdout
    };
    let result = compare::compare(&s1, &s2, a.strict, &mut progress, out).await;
    let _ = out.flush();
    progress.end();
    Ok(result?.exit_code())
}

/// Validated `bench` parameters and open options.
pub struct BenchPlan {
    /// Request pattern.
    pub params: BenchParams,
    /// O_DIRECT.
    pub direct: bool,
    /// Use io_uring (tokio-uring) instead of the thread pool.
    pub uring: bool,
    /// Write mode (`-w`): the pattern byte and the flush plan.
    pub write: Option<(u8, Option<FlushPlan>)>,
}

/// Checks `bench`'s options (before any runtime starts).
pub fn bench_plan(a: &BenchArgs) -> Result<BenchPlan, CliError> {
    const INT_MAX: u64 = i32::MAX as u64;
    let count = args::bench_number("request count", a.count.as_deref(), 75000, 1, INT_MAX)?;
    // qemu-img allows INT_MAX; more than 65536 tasks in flight only wastes memory.
    let depth = args::bench_number("queue depth", a.depth.as_deref(), 64, 1, 65536)?;
    let bufsize = args::bench_number("buffer size", a.bufsize.as_deref(), 4096, 1, INT_MAX)?;
    let offset = args::bench_number("offset", a.offset.as_deref(), 0, 0, i64::MAX as u64)?;
    // A step of 0 means one request size, as in qemu-img.
    let step = match args::bench_number("step size", a.step.as_deref(), 0, 0, INT_MAX)? {
        0 => bufsize,
        s => s,
    };
    if depth.saturating_mul(bufsize) > 4 << 30 {
        return Err(CliError::Usage(format!(
            "bench: {depth} requests of {bufsize} bytes in flight need more than 4 GiB of buffers"
        )));
    }
    let mut direct = args::cache_is_direct(a.cache.as_deref())?;
    let mut uring = match a.aio.as_deref() {
        None | Some("threads") => false,
        Some("io_uring") => true,
        // Linux AIO ("native") is not implemented; io_uring is the closest.
        Some("native") => true,
        Some(other) => return Err(CliError::Usage(format!("Invalid aio option: {other}"))),
    };
    if a.native || a.aio.as_deref() == Some("native") {
        // qemu-img's -n asks for native AIO, which needs O_DIRECT: use io_uring with O_DIRECT.
        uring = true;
        direct = true;
    }
    let write = bench_write_plan(a)?;
    Ok(BenchPlan {
        write,
        params: BenchParams {
            count,
            depth: depth as usize,
            bufsize,
            offset,
            step,
        },
        direct,
        uring,
    })
}

/// `-w`, `--pattern`, `--flush-interval` and `--no-drain` as qemu-img bench checks them.
fn bench_write_plan(a: &BenchArgs) -> Result<Option<(u8, Option<FlushPlan>)>, CliError> {
    let interval = match a.flush_interval.as_deref() {
        None => 0,
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| CliError::Usage(format!("Invalid flush interval specified: '{text}'.")))?,
    };
    if !a.write {
        if interval > 0 {
            return Err(CliError::Usage(
                "--flush-interval is only available in write tests".into(),
            ));
        }
        return Ok(None);
    }
    let pattern = match a.pattern.as_deref() {
        None => 0,
        Some(text) => {
            let hex = text
                .strip_prefix("0x")
                .or_else(|| text.strip_prefix("0X"))
                .map(|h| u64::from_str_radix(h, 16).ok());
            let value = match hex {
                Some(v) => v,
                None => crate::size::parse_size(text).ok(),
            };
            value.and_then(|v| u8::try_from(v).ok()).ok_or_else(|| {
                CliError::Usage("Invalid pattern byte specified. Must be between 0 and 255.".into())
            })?
        }
    };
    let flush = (interval > 0).then_some(FlushPlan {
        interval: u64::from(interval),
        drain: !a.no_drain,
    });
    Ok(Some((pattern, flush)))
}

/// Opens the image for `bench` (read-write in write mode) and prints the banner.
async fn bench_open<B: BackendOpen>(a: &BenchArgs, plan: &BenchPlan) -> Result<Image<B>, CliError> {
    let path = args::one_file(&a.files)?;
    let mode = OpenMode {
        writable: plan.write.is_some(),
        ..data_mode(plan.direct)
    };
    let image = open::<B>(path, a.format.as_deref(), mode).await?;
    if !a.quiet {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", plan.params.banner(plan.write.is_some()))
            .and_then(|()| match plan.write {
                Some((_, Some(f))) => writeln!(out, "{}", bench::flush_line(f.interval)),
                _ => Ok(()),
            })
            .and_then(|()| out.flush())
            .map_err(stdout_error)?;
    }
    Ok(image)
}

/// After a write run: close the image (flush, refcounts, dirty bit), outside the measured time as
/// qemu-img bench closes its image after printing the time.
async fn bench_close<B: Backend>(image: &Image<B>, plan: &BenchPlan) -> Result<(), CliError> {
    if plan.write.is_none() {
        return Ok(());
    }
    image.close().await.map_err(|e| {
        CliError::other(format!(
            "{}: closing the image failed: {e}",
            image.filename()
        ))
    })
}

fn bench_done(a: &BenchArgs, elapsed: std::time::Duration) -> Result<i32, CliError> {
    if !a.quiet {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", bench::completed_line(elapsed))
            .and_then(|()| out.flush())
            .map_err(stdout_error)?;
    }
    Ok(0)
}

fn bench_error(e: CliError) -> CliError {
    match e {
        CliError::Read {
            path,
            offset,
            reason,
        }
        | CliError::Write {
            path,
            offset,
            reason,
        } => CliError::other(format!(
            "{path}: Failed request at offset {offset}: {reason}"
        )),
        other => other,
    }
}

/// `qcow2 bench -i threads`: `depth` tasks spread over the multi-threaded runtime, each taking the next
/// request number until all are done (the std backend's futures are `Send`).
pub async fn bench_threads(a: &BenchArgs, plan: &BenchPlan) -> Result<i32, CliError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let image = bench_open::<qcow2_io::StdFileBackend>(a, plan).await?;
    let p = plan.params;
    let size = image.virtual_size();
    let next = Arc::new(AtomicU64::new(0));
    let workers = p.depth.min(usize::try_from(p.count).unwrap_or(usize::MAX));
    let flusher = Arc::new(bench::Flusher::new(plan.write.and_then(|(_, f)| f)));
    let mut wbufs = match plan.write {
        Some((pattern, _)) => bench::pattern_buffers(workers as u64, p.bufsize as usize, pattern),
        None => Vec::new(),
    };
    let start = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let src = EngineSource {
            image: image.clone(),
        };
        let next = Arc::clone(&next);
        if let Some(data) = wbufs.pop() {
            let flusher = Arc::clone(&flusher);
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= p.count {
                        return Ok::<(), CliError>(());
                    }
                    flusher
                        .write(&src, bench::offset_of(p, size, i), data.clone())
                        .await?;
                }
            });
            continue;
        }
        tasks.spawn(async move {
            // bufsize <= i32::MAX and depth * bufsize <= 4 GiB were checked by bench_plan.
            let mut buf = qcow2_io::aligned::aligned_bytes_mut(p.bufsize as usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= p.count {
                    return Ok::<(), CliError>(());
                }
                buf = src.read_buf(bench::offset_of(p, size, i), buf).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => r.map_err(bench_error)?,
            Err(e) => return Err(CliError::other(format!("bench: a worker task failed: {e}"))),
        }
    }
    let elapsed = start.elapsed();
    bench_close(&image, plan).await?;
    bench_done(a, elapsed)
}

/// `qcow2 bench` on one current-thread runtime (io_uring), read or write mode.
pub async fn bench<B: BackendOpen>(a: &BenchArgs, plan: &BenchPlan) -> Result<i32, CliError> {
    let image = bench_open::<B>(a, plan).await?;
    let src = EngineSource { image };
    let elapsed = match plan.write {
        None => bench::run_read(&src, plan.params).await,
        Some((pattern, flush)) => bench::run_write(&src, plan.params, pattern, flush).await,
    }
    .map_err(bench_error)?;
    bench_close(&src.image, plan).await?;
    bench_done(a, elapsed)
}
