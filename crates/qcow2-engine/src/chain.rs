//! Opening an image and its backing chain.
//!
//! - Backing file names are resolved as QEMU's `bdrv_get_full_backing_filename`: an absolute name is used
//!   as is; a relative one is appended to the directory part of the overlay's file name *as given*
//!   (`sub/a.qcow2` + `b.qcow2` = `sub/b.qcow2`), so it is relative to the overlay's directory.
//! - The backing format is the `backing_fmt` header extension when present, else probed by magic
//!   (qcow2 magic -> qcow2, anything else -> raw).
//! - A chain that loops back on itself is refused: each file's canonical path may appear once.
//! - The depth is bounded by [`MAX_CHAIN_DEPTH`].
//! - An external data file name (`data_file` extension) is opened as given, i.e. a relative name is
//!   relative to the process's current directory, exactly as QEMU does both at create and at open.
//!
//! The chain is opened top-down iteratively and assembled bottom-up, so no async recursion is needed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use qcow2_format::error::FormatError;
use qcow2_format::image_header::ImageHeader;
use qcow2_io::{Backend, BackendOpen, OpenFlags};

use crate::error::{Error, Result};
use crate::image::{Image, Inner, Layer};
use crate::info::{ImageInfo, Qcow2Info};
use crate::options::{ImageFormat, OpenOptions};
use crate::qcow2::{read_image_header, read_snapshots, DataFile, Qcow2Layer};
use crate::raw::RawLayer;

/// The deepest backing chain the engine opens (images, the top one included).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// The qcow2 magic `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// QEMU's `path_has_protocol`: a `:` before any `/` (`nbd:...`, `json:{...}`, `file:...`).
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
    }
}

/// QEMU's `bdrv_get_full_backing_filename_from_filename` + `path_combine`: an empty, absolute or
/// protocol name as is, otherwise `name` relative to the directory part of `base`.
pub(crate) fn resolve_backing_name(base: &str, name: &str) -> String {
    if name.is_empty() || name.starts_with('/') || has_protocol(name) {
        return name.to_owned();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_owned(),
    }
}

/// The file to open for a resolved backing name: protocol names (`nbd:...`, `json:{...}`) that QEMU
/// would hand to another driver are refused; a `file:` prefix is stripped (the rest is then relative to
/// the current directory, as in QEMU).
fn plain_file_name<'a>(path: &str, name: &'a str) -> Result<&'a str> {
    if let Some(rest) = name.strip_prefix("file:") {
        return Ok(rest);
    }
    if has_protocol(name) {
        let proto = name.split(':').next().unwrap_or_default();
        return Err(Error::Unsupported {
            path: path.to_owned(),
            what: format!("backing file protocol '{proto}' (in '{name}')"),
        });
    }
    Ok(name)
}

/// Refuses a directory as an image or data file (QEMU: "'file' driver requires ... to be a regular
/// file"); block devices are fine.
fn refuse_directory(path: &Path, name: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::Io {
            path: name.to_owned(),
            op: "open",
            offset: 0,
            source: std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, not a regular file",
            ),
        }),
        _ => Ok(()),
    }
}

/// Probes the format of `file` by its magic.
async fn probe<B: Backend>(file: &B, name: &str) -> Result<ImageFormat> {
    let (res, buf) = file.read_at(crate::buf::io_buf(4), 0).await;
    let n = res.map_err(Error::io(name, "read magic", 0))?;
    Ok(if n >= 4 && buf[..4] == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// What the next image of the chain is.
struct BackingRef {
    path: String,
    format: Option<ImageFormat>,
}

/// An opened image whose backing image is not attached yet.
struct Opened<B> {
    layer: Layer<B>,
    info: ImageInfo,
    backing: Option<BackingRef>,
    read_only: bool,
}

/// The info of a qcow2 image.
fn qcow2_info(name: &str, header: &ImageHeader, virtual_size: u64) -> ImageInfo {
    let backing_filename = header.backing_file.clone();
    let full_backing_filename = backing_filename
        .as_deref()
        .map(|b| resolve_backing_name(name, b));
    ImageInfo {
        filename: name.to_owned(),
        format: ImageFormat::Qcow2,
        virtual_size,
        cluster_size: Some(header.geometry().cluster_size()),
        backing_filename,
        full_backing_filename,
        backing_format: header.backing_format().map(str::to_owned),
        dirty: header.is_dirty(),
        snapshots: Vec::new(),
        qcow2: Some(Qcow2Info {
            compat: header.version().compat().to_owned(),
            lazy_refcounts: header.lazy_refcounts(),
            refcount_bits: u64::from(header.refcount_bits()),
            corrupt: header.is_corrupt(),
            extended_l2: header.geometry().extended_l2,
            compression_type: header.compression_type().name().to_owned(),
            has_data_file: header.has_data_file(),
            data_file: header.data_file().map(str::to_owned),
            data_file_raw: header.data_file_raw(),
        }),
    }
}

/// Checks the header flags against the open mode.
fn check_open_mode(name: &str, header: &ImageHeader, read_only: bool) -> Result<()> {
    if !read_only && header.is_corrupt() {
        return Err(Error::CorruptBitSet {
            path: name.to_owned(),
        });
    }
    Ok(())
}

/// Opens one image from an opened file. `data_file(image_name, data_file_name)` opens the external data
/// file when the image has one (not called for metadata-only opens).
async fn open_layer<B: Backend>(
    file: B,
    name: String,
    format: Option<ImageFormat>,
    opts: &OpenOptions,
    read_only: bool,
    data_file: impl AsyncFnOnce(&str, &str) -> Result<B>,
) -> Result<Opened<B>> {
    let format = match format {
        Some(f) => f,
        None => probe(&file, &name).await?,
    };
    match format {
        ImageFormat::Raw => {
            let raw = RawLayer::open(file, name.clone()).await?;
            let info = ImageInfo {
                filename: name,
                format: ImageFormat::Raw,
                virtual_size: raw.virtual_size,
                cluster_size: None,
                backing_filename: None,
                full_backing_filename: None,
                backing_format: None,
                dirty: false,
                snapshots: Vec::new(),
                qcow2: None,
            };
            Ok(Opened {
                layer: Layer::Raw(raw),
                info,
                backing: None,
                read_only,
            })
        }
        ImageFormat::Qcow2 => {
            let file_len = file
                .len()
                .await
                .map_err(Error::io(&name, "get length", 0))?;
            let header = read_image_header(&file, &name, file_len).await?;
            check_open_mode(&name, &header, read_only)?;
            let snapshots = read_snapshots(&file, &name, &header, file_len).await?;
            // A metadata-only open never touches the data file (as qemu-img info: an untrusted image
            // must not make us open the files it names).
            let data = match (header.has_data_file(), header.data_file()) {
                (false, _) => None,
                (true, _) if opts.metadata_only => None,
                (true, Some(df)) => Some(DataFile {
                    name: df.to_owned(),
                    file: data_file(&name, df).await?,
                }),
                (true, None) => {
                    return Err(Error::Format {
                        path: name,
                        source: FormatError::DataFileRequired,
                    })
                }
            };
            let mut info = qcow2_info(&name, &header, header.header.size & !511);
            info.snapshots = snapshots;
            let backing = match (&info.full_backing_filename, opts.follow_backing) {
                (Some(full), true) => {
                    let format = match header.backing_format() {
                        None => None,
                        Some(f) => {
                            Some(ImageFormat::from_name(f).ok_or_else(|| Error::Unsupported {
                                path: name.clone(),
                                what: format!("backing file format '{f}'"),
                            })?)
                        }
                    };
                    let path = plain_file_name(&name, full)?.to_owned();
                    Some(BackingRef { path, format })
                }
                _ => None,
            };
            let mut layer =
                Qcow2Layer::new(name, file, file_len, header, data, opts.l2_cache_bytes).await?;
            if !read_only {
                layer.enable_writes().await?;
            }
            Ok(Opened {
                layer: Layer::Qcow2(Box::new(layer)),
                info,
                backing,
                read_only,
            })
        }
    }
}

/// Opens `path` and its chain.
pub(crate) async fn open_chain<B: BackendOpen>(
    path: &Path,
    opts: &OpenOptions,
) -> Result<Image<B>> {
    let mut opened: Vec<Opened<B>> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut next = Some(BackingRef {
        path: path.to_string_lossy().into_owned(),
        format: opts.format,
    });
    let mut next_path = path.to_path_buf();
    while let Some(BackingRef { path: name, format }) = next.take() {
        let is_top = opened.is_empty();
        if opened.len() >= MAX_CHAIN_DEPTH {
            let last = opened
                .last()
                .map(|o| o.info.filename.clone())
                .unwrap_or_default();
            return Err(Error::ChainTooDeep {
                path: last,
                limit: MAX_CHAIN_DEPTH,
            });
        }
        let canonical = std::fs::canonicalize(&next_path).map_err(Error::io(&name, "open", 0))?;
        refuse_directory(&canonical, &name)?;
        if !seen.insert(canonical) {
            return Err(Error::BackingLoop { path: name });
        }
        let read_only = if is_top { opts.read_only } else { true };
        let flags = OpenFlags {
            read_only,
            create: false,
            direct: opts.direct,
        };
        let file = B::open(&next_path, flags)
            .await
            .map_err(Error::io(&name, "open", 0))?;
        let data_flags = flags;
        let o = open_layer(
            file,
            name,
            format,
            opts,
            read_only,
            async |_img: &str, df: &str| {
                refuse_directory(Path::new(df), df)?;
                B::open(Path::new(df), data_flags)
                    .await
                    .map_err(Error::io(df, "open data file", 0))
            },
        )
        .await?;
        if let Some(b) = &o.backing {
            next_path = PathBuf::from(&b.path);
            next = Some(BackingRef {
                path: b.path.clone(),
                format: b.format,
            });
        }
        opened.push(o);
    }
    assemble(opened)
}

/// Opens a single image from a backend (no chain, no data file).
pub(crate) async fn open_single<B: Backend>(
    backend: B,
    name: &str,
    opts: &OpenOptions,
    backing: Option<Image<B>>,
) -> Result<Image<B>> {
    let o = open_layer(
        backend,
        name.to_owned(),
        opts.format,
        opts,
        opts.read_only,
        async |img: &str, df: &str| {
            Err(Error::Unsupported {
                path: img.to_owned(),
                what: format!("external data file '{df}' when opening from a backend"),
            })
        },
    )
    .await?;
    if let Some(below) = backing {
        if o.backing.is_none() && opts.follow_backing {
            return Err(Error::Unsupported {
                path: name.to_owned(),
                what: "a backing image for an image that names no backing file".into(),
            });
        }
        let mut o = o;
        o.backing = None;
        let img = assemble(vec![o])?;
        return Ok(attach_backing(img, below));
    }
    if o.backing.is_some() {
        return Err(Error::Unsupported {
            path: name.to_owned(),
            what:
                "a backing file when opening from a backend (set follow_backing to false to read \
                   without it)"
                    .into(),
        });
    }
    assemble(vec![o])
}

/// Puts `below` under the single image `img` (just assembled, so its `Arc` is not shared yet).
fn attach_backing<B>(img: Image<B>, below: Image<B>) -> Image<B> {
    match std::sync::Arc::try_unwrap(img.inner) {
        Ok(mut inner) => {
            inner.backing = Some(below);
            Image {
                inner: std::sync::Arc::new(inner),
            }
        }
        // Unreachable: `assemble` returned the only reference. Keep the image as it is.
        Err(inner) => Image { inner },
    }
}

/// Links opened images bottom-up into `Image`s.
fn assemble<B>(opened: Vec<Opened<B>>) -> Result<Image<B>> {
    let mut below: Option<Image<B>> = None;
    for o in opened.into_iter().rev() {
        below = Some(Image {
            inner: std::sync::Arc::new(Inner {
                layer: o.layer,
                backing: below.take(),
                info: o.info,
                read_only: o.read_only,
            }),
        });
    }
    // `open_chain` always opens at least the top image before assembling.
    below.ok_or_else(|| Error::Unsupported {
        path: String::new(),
        what: "an empty chain".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_like_qemu() {
        assert_eq!(resolve_backing_name("a.qcow2", "b.qcow2"), "b.qcow2");
        assert_eq!(
            resolve_backing_name("dir/a.qcow2", "b.qcow2"),
            "dir/b.qcow2"
        );
        assert_eq!(resolve_backing_name("/x/y/a", "../b"), "/x/y/../b");
        assert_eq!(resolve_backing_name("/x/y/a", "/abs/b"), "/abs/b");
        assert_eq!(resolve_backing_name("dir/a", "sub/b"), "dir/sub/b");
        assert_eq!(
            resolve_backing_name("dir/a", "nbd:localhost:10809"),
            "nbd:localhost:10809"
        );
        assert_eq!(resolve_backing_name("dir/a", "file:b.img"), "file:b.img");
        assert_eq!(resolve_backing_name("dir/a", "./x:y"), "dir/./x:y");
    }

    #[test]
    fn protocols_refused() {
        assert!(plain_file_name("x", "nbd:localhost:10809").is_err());
        assert!(plain_file_name("x", "json:{}").is_err());
        assert_eq!(plain_file_name("x", "file:a.img").unwrap(), "a.img");
        assert_eq!(plain_file_name("x", "./a:b").unwrap(), "./a:b");
    }
}
