//! Header extensions (spec: `docs/interop/qcow2.txt`, "Header extensions", "Feature name
//! table", "Bitmaps extension", "Full disk encryption header pointer", "External data file name").
//!
//! Each extension is `magic: u32, length: u32, data[length]`, padded to a multiple of 8; the list
//! ends with magic 0. Unknown extensions are kept verbatim so that rewriting the header preserves
//! them, as QEMU does.

use crate::bytes::{align8, be32, be64, slice};
use crate::error::{FormatError, Result};

/// End of the extension list.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Size of one feature name table entry.
pub const FEATURE_ENTRY_SIZE: usize = 48;
/// Maximum length of a feature name.
pub const FEATURE_NAME_MAX: usize = 46;
/// QEMU keeps the backing format in a 16-byte buffer: a name must be shorter than 16 bytes.
pub const BACKING_FORMAT_MAX: usize = 15;
/// QEMU's maximum number of bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's maximum bitmap directory size.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;

/// Which feature bit field a feature name table entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// 0: incompatible feature.
    Incompatible,
    /// 1: compatible feature.
    Compatible,
    /// 2: autoclear feature.
    Autoclear,
    /// Any other type byte (kept verbatim).
    Other(u8),
}

impl FeatureKind {
    /// Decodes the type byte.
    pub fn from_value(v: u8) -> FeatureKind {
        match v {
            0 => FeatureKind::Incompatible,
            1 => FeatureKind::Compatible,
            2 => FeatureKind::Autoclear,
            o => FeatureKind::Other(o),
        }
    }

    /// The type byte.
    pub fn value(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
            FeatureKind::Other(o) => o,
        }
    }
}

/// Header values that decide how extensions are validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtensionContext {
    /// The image's cluster size in bytes.
    pub cluster_size: u64,
    /// The header's crypt_method.
    pub crypt_method: u32,
    /// Whether the autoclear "bitmaps" bit is set (QEMU validates the bitmaps extension only then).
    pub autoclear_bitmaps: bool,
}

impl ExtensionContext {
    /// A context for an unencrypted image whose bitmaps bit is set.
    pub fn new(cluster_size: u64) -> ExtensionContext {
        ExtensionContext {
            cluster_size,
            crypt_method: 0,
            autoclear_bitmaps: true,
        }
    }
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// Which bit field.
    pub kind: FeatureKind,
    /// Bit number (0..=63 for meaningful entries; other values are kept verbatim).
    pub bit: u8,
    /// Name, at most 46 bytes (NUL padding removed).
    pub name: String,
}

/// One header extension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderExtension {
    /// Backing file format name (e.g. "qcow2", "raw").
    BackingFormat(String),
    /// Feature name table.
    FeatureNameTable(Vec<FeatureName>),
    /// Bitmaps extension.
    Bitmaps {
        /// Number of bitmaps.
        nb_bitmaps: u32,
        /// Size of the bitmap directory in bytes.
        bitmap_directory_size: u64,
        /// Offset of the bitmap directory.
        bitmap_directory_offset: u64,
    },
    /// Full disk encryption header pointer.
    FullDiskEncryption {
        /// Offset of the encryption header.
        offset: u64,
        /// Length of the encryption header.
        length: u64,
    },
    /// External data file name.
    ExternalDataFile(String),
    /// An extension this implementation does not know, kept verbatim.
    Unknown {
        /// Its magic.
        magic: u32,
        /// Its data (without padding).
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The extension's magic.
    pub fn magic(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNameTable(_) => EXT_FEATURE_TABLE,
            HeaderExtension::Bitmaps { .. } => EXT_BITMAPS,
            HeaderExtension::FullDiskEncryption { .. } => EXT_CRYPTO_HEADER,
            HeaderExtension::ExternalDataFile(_) => EXT_DATA_FILE,
            HeaderExtension::Unknown { magic, .. } => *magic,
        }
    }

    /// The extension's data bytes (without the 8-byte extension header and padding).
    pub fn data(&self) -> Result<Vec<u8>> {
        Ok(match self {
            HeaderExtension::BackingFormat(s) | HeaderExtension::ExternalDataFile(s) => {
                s.as_bytes().to_vec()
            }
            HeaderExtension::FeatureNameTable(t) => {
                let mut v = Vec::with_capacity(t.len().saturating_mul(FEATURE_ENTRY_SIZE));
                for f in t {
                    let name = f.name.as_bytes();
                    if name.len() > FEATURE_NAME_MAX {
                        return Err(FormatError::Serialize {
                            what: "feature name table",
                            detail: format!("name {:?} is longer than 46 bytes", f.name),
                        });
                    }
                    v.push(f.kind.value());
                    v.push(f.bit);
                    v.extend_from_slice(name);
                    v.resize(v.len() + FEATURE_NAME_MAX - name.len(), 0);
                }
                v
            }
            HeaderExtension::Bitmaps {
                nb_bitmaps,
                bitmap_directory_size,
                bitmap_directory_offset,
            } => {
                let mut v = Vec::with_capacity(24);
                v.extend_from_slice(&nb_bitmaps.to_be_bytes());
                v.extend_from_slice(&0u32.to_be_bytes());
                v.extend_from_slice(&bitmap_directory_size.to_be_bytes());
                v.extend_from_slice(&bitmap_directory_offset.to_be_bytes());
                v
            }
            HeaderExtension::FullDiskEncryption { offset, length } => {
                let mut v = Vec::with_capacity(16);
                v.extend_from_slice(&offset.to_be_bytes());
                v.extend_from_slice(&length.to_be_bytes());
                v
            }
            HeaderExtension::Unknown { data, .. } => data.clone(),
        })
    }

    /// Serialises the extension: header, data, zero padding to a multiple of 8.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let data = self.data()?;
        let len = u32::try_from(data.len()).map_err(|_| FormatError::Serialize {
            what: "header extension",
            detail: format!("data of {} bytes does not fit a 32-bit length", data.len()),
        })?;
        if self.magic() == EXT_END {
            return Err(FormatError::Serialize {
                what: "header extension",
                detail: "magic 0 is the end marker".into(),
            });
        }
        let padded = align8(data.len()).ok_or(FormatError::Serialize {
            what: "header extension",
            detail: "length overflows".into(),
        })?;
        let mut v = Vec::with_capacity(8 + padded);
        v.extend_from_slice(&self.magic().to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&data);
        v.resize(8 + padded, 0);
        Ok(v)
    }

    /// Decodes one extension's data. `offset` (of the extension header) is used in errors;
    /// `cluster_size` for the alignment checks.
    ///
    /// Checks, as QEMU does: backing format shorter than 16 bytes; bitmaps extension exactly
    /// 24 bytes and, only when the autoclear bitmaps bit is set (QEMU ignores the extension
    /// otherwise), reserved field zero, 1..=65535 bitmaps, directory offset cluster-aligned,
    /// directory size <= 64 MiB; encryption pointer only with LUKS (crypt_method 2), exactly
    /// 16 bytes, offset cluster-aligned;
    /// feature name table a whole number of 48-byte entries (QEMU tolerates a partial last
    /// entry; it is ignored here too).
    pub fn decode(
        magic: u32,
        data: &[u8],
        offset: u64,
        ctx: &ExtensionContext,
    ) -> Result<HeaderExtension> {
        let cluster_size = ctx.cluster_size;
        let bad = |detail: String| FormatError::InvalidHeaderExtension {
            magic,
            offset,
            detail,
        };
        Ok(match magic {
            EXT_BACKING_FORMAT => {
                if data.len() > BACKING_FORMAT_MAX {
                    return Err(bad(format!(
                        "backing format name of {} bytes is too long (max {BACKING_FORMAT_MAX})",
                        data.len()
                    )));
                }
                HeaderExtension::BackingFormat(c_string(data, "backing format name")?)
            }
            EXT_DATA_FILE => {
                HeaderExtension::ExternalDataFile(c_string(data, "external data file name")?)
            }
            EXT_FEATURE_TABLE => {
                let mut t = Vec::new();
                for e in data.chunks_exact(FEATURE_ENTRY_SIZE) {
                    t.push(FeatureName {
                        kind: FeatureKind::from_value(e[0]),
                        bit: e[1],
                        name: String::from_utf8_lossy(trim_nul(&e[2..])).into_owned(),
                    });
                }
                HeaderExtension::FeatureNameTable(t)
            }
            EXT_BITMAPS => {
                if data.len() != 24 {
                    return Err(bad(format!(
                        "bitmaps_ext: Invalid extension length {} (expected 24)",
                        data.len()
                    )));
                }
                let nb_bitmaps = be32(data, 0, "bitmaps extension")?;
                let reserved = be32(data, 4, "bitmaps extension")?;
                let bitmap_directory_size = be64(data, 8, "bitmaps extension")?;
                let bitmap_directory_offset = be64(data, 16, "bitmaps extension")?;
                if !ctx.autoclear_bitmaps {
                    return Ok(HeaderExtension::Bitmaps {
                        nb_bitmaps,
                        bitmap_directory_size,
                        bitmap_directory_offset,
                    });
                }
                if reserved != 0 {
                    return Err(bad(format!(
                        "bitmaps_ext: Reserved field is not zero ({reserved:#x})"
                    )));
                }
                if nb_bitmaps > MAX_BITMAPS {
                    return Err(bad(format!(
                        "bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
                    )));
                }
                if nb_bitmaps == 0 {
                    return Err(bad("found bitmaps extension with zero bitmaps".into()));
                }
                if bitmap_directory_offset % cluster_size.max(1) != 0 {
                    return Err(bad(format!(
                        "bitmaps_ext: invalid bitmap directory offset {bitmap_directory_offset:#x} (not cluster-aligned)"
                    )));
                }
                if bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE {
                    return Err(bad(format!(
                        "bitmaps_ext: bitmap directory size ({bitmap_directory_size}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})"
                    )));
                }
                HeaderExtension::Bitmaps {
                    nb_bitmaps,
                    bitmap_directory_size,
                    bitmap_directory_offset,
                }
            }
            EXT_CRYPTO_HEADER => {
                if ctx.crypt_method != 2 {
                    return Err(bad(
                        "CRYPTO header extension only expected with LUKS encryption method".into(),
                    ));
                }
                if data.len() != 16 {
                    return Err(bad(format!(
                        "CRYPTO header extension size {}, but expected size 16",
                        data.len()
                    )));
                }
                let off = be64(data, 0, "encryption header pointer")?;
                let length = be64(data, 8, "encryption header pointer")?;
                if off % cluster_size.max(1) != 0 {
                    return Err(bad(format!(
                        "Encryption header offset '{off}' is not a multiple of cluster size '{cluster_size}'"
                    )));
                }
                HeaderExtension::FullDiskEncryption {
                    offset: off,
                    length,
                }
            }
            _ => HeaderExtension::Unknown {
                magic,
                data: data.to_vec(),
            },
        })
    }
}

/// Strips trailing NUL bytes (and anything after the first NUL, as C strings end there).
fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(p) => &b[..p],
        None => b,
    }
}

/// Decodes a name stored without terminator (QEMU reads it as a C string: it ends at a NUL).
fn c_string(b: &[u8], what: &'static str) -> Result<String> {
    String::from_utf8(trim_nul(b).to_vec()).map_err(|_| FormatError::InvalidUtf8 { what })
}

/// Parses the extension area `buf[start..end]` of the header cluster, where `buf` starts at
/// image offset 0. Bytes missing at the end of `buf` read as zero (QEMU reads past the end of a
/// short file as zeros), so a list that runs into them ends there.
///
/// Stops at the end marker or when the next extension header would start at or beyond `end`.
/// An extension whose length runs past `end` is [`FormatError::HeaderExtensionTooLarge`].
pub fn parse_extensions(
    buf: &[u8],
    start: u64,
    end: u64,
    ctx: &ExtensionContext,
) -> Result<Vec<HeaderExtension>> {
    let mut out = Vec::new();
    let mut off = start;
    while off < end {
        let hdr_end = off.saturating_add(8);
        let (magic, len) = if hdr_end as u128 <= buf.len() as u128 {
            // off + 8 <= buf.len() <= usize::MAX, so the casts are lossless.
            (
                be32(buf, off as usize, "header extension")?,
                be32(buf, off as usize + 4, "header extension")?,
            )
        } else if off as u128 >= buf.len() as u128 {
            (0, 0)
        } else {
            let mut h = [0u8; 8];
            let avail = &buf[off as usize..];
            h[..avail.len()].copy_from_slice(avail);
            (
                u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
                u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            )
        };
        let data_off = hdr_end;
        if data_off > end || u64::from(len) > end - data_off {
            return Err(FormatError::HeaderExtensionTooLarge {
                magic,
                offset: off,
                len: u64::from(len),
                end,
            });
        }
        if magic == EXT_END {
            break;
        }
        // data_off + len <= end <= cluster size (<= 2 MiB), so these fit in usize.
        let data = slice(
            buf,
            data_off as usize,
            len as usize,
            "header extension data",
        )?;
        out.push(HeaderExtension::decode(magic, data, off, ctx)?);
        let padded = (u64::from(len) + 7) & !7;
        off = data_off + padded;
    }
    Ok(out)
}

/// Serialises a list of extensions followed by the end marker.
pub fn serialize_extensions(exts: &[HeaderExtension]) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    for e in exts {
        v.extend_from_slice(&e.serialize()?);
    }
    v.extend_from_slice(&[0u8; 8]);
    Ok(v)
}

/// The feature name table QEMU 10 writes into v3 images it creates (observed with qemu-img 10.0:
/// only for cluster sizes of 8 KiB and more; images with smaller clusters get none).
pub fn qemu_feature_table() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(FeatureKind::Incompatible, 0, "dirty bit"),
        f(FeatureKind::Incompatible, 1, "corrupt bit"),
        f(FeatureKind::Incompatible, 2, "external data file"),
        f(FeatureKind::Incompatible, 3, "compression type"),
        f(FeatureKind::Incompatible, 4, "extended L2 entries"),
        f(FeatureKind::Compatible, 0, "lazy refcounts"),
        f(FeatureKind::Autoclear, 0, "bitmaps"),
        f(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(e: HeaderExtension) {
        let b = serialize_extensions(std::slice::from_ref(&e)).unwrap();
        assert_eq!(b.len() % 8, 0);
        let p = parse_extensions(&b, 0, b.len() as u64, &ExtensionContext::new(65536)).unwrap();
        assert_eq!(p, vec![e]);
    }

    #[test]
    fn roundtrips() {
        roundtrip(HeaderExtension::BackingFormat("qcow2".into()));
        roundtrip(HeaderExtension::ExternalDataFile(
            "/tmp/some data file".into(),
        ));
        roundtrip(HeaderExtension::FeatureNameTable(qemu_feature_table()));
        roundtrip(HeaderExtension::Bitmaps {
            nb_bitmaps: 3,
            bitmap_directory_size: 100,
            bitmap_directory_offset: 0x50000,
        });
        let e = HeaderExtension::FullDiskEncryption {
            offset: 0x20000,
            length: 4096,
        };
        let b = e.serialize().unwrap();
        let mut ctx = ExtensionContext::new(65536);
        assert!(parse_extensions(&b, 0, b.len() as u64, &ctx).is_err());
        ctx.crypt_method = 2;
        assert_eq!(
            parse_extensions(&b, 0, b.len() as u64, &ctx).unwrap(),
            vec![e]
        );
        roundtrip(HeaderExtension::Unknown {
            magic: 0x1234_5678,
            data: vec![1, 2, 3],
        });
    }

    #[test]
    fn too_large() {
        let mut b = HeaderExtension::BackingFormat("raw".into())
            .serialize()
            .unwrap();
        b[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            parse_extensions(&b, 0, 4096, &ExtensionContext::new(4096)),
            Err(FormatError::HeaderExtensionTooLarge { .. })
        ));
    }

    #[test]
    fn short_buffer_reads_as_end() {
        let b = HeaderExtension::BackingFormat("raw".into())
            .serialize()
            .unwrap();
        let p = parse_extensions(&b, 0, 4096, &ExtensionContext::new(4096)).unwrap();
        assert_eq!(p, vec![HeaderExtension::BackingFormat("raw".into())]);
    }

    #[test]
    fn bitmaps_checks() {
        let mk = |nb: u32, size: u64, off: u64| {
            HeaderExtension::Bitmaps {
                nb_bitmaps: nb,
                bitmap_directory_size: size,
                bitmap_directory_offset: off,
            }
            .serialize()
            .unwrap()
        };
        for b in [
            mk(0, 1, 0),
            mk(65536, 1, 0),
            mk(1, 1, 100),
            mk(1, 1 << 40, 0),
        ] {
            assert!(matches!(
                parse_extensions(&b, 0, b.len() as u64, &ExtensionContext::new(4096)),
                Err(FormatError::InvalidHeaderExtension { .. })
            ));
        }
    }

    #[test]
    fn backing_format_too_long() {
        let b = HeaderExtension::BackingFormat("a".repeat(16))
            .serialize()
            .unwrap();
        assert!(matches!(
            parse_extensions(&b, 0, b.len() as u64, &ExtensionContext::new(4096)),
            Err(FormatError::InvalidHeaderExtension { .. })
        ));
    }
}
