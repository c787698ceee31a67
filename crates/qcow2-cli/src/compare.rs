//! `compare`: qemu-img compare's algorithm, messages and exit codes.
//!
//! Exit codes: 0 identical, 1 different, 2 an image could not be opened, 3 block status failed, 4 a read
//! failed. Both images are walked by block status: ranges that read as zero in both are skipped, ranges
//! allocated in both are read and compared, a range allocated in only one must read as zeros there. When the
//! sizes differ, the longer image's extra part must read as zeros (a warning is printed first); with
//! `strict`, different sizes or different block status already count as a difference. Mismatch offsets are
//! reported at 512-byte granularity, as qemu-img does.

use std::io::Write;

use crate::error::CliError;
use crate::progress::Progress;
use crate::source::{BlockSource, Extent};

/// Largest range read at once (qemu-img's `IO_BUF_SIZE`).
pub const IO_BUF_SIZE: u64 = 2 << 20;
const SECTOR: usize = 512;

/// The result of a comparison that ran to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same content (exit 0).
    Identical,
    /// Different (exit 1); the reason was printed.
    Different,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Identical => 0,
            Outcome::Different => 1,
        }
    }
}

/// Exit code for an error of `compare` (qemu-img: 2 open, 3 block status, 4 read).
pub fn error_exit_code(err: &CliError) -> i32 {
    match err {
        CliError::Status { .. } => 3,
        CliError::Read { .. } => 4,
        CliError::Usage(_) => 1,
        _ => 2,
    }
}

/// Status flags as qemu-img compares them in strict mode.
fn flags(e: &Extent) -> (bool, bool, bool, bool, bool) {
    (e.present, e.zero, e.data, e.compressed, e.offset.is_some())
}

/// Index of the first 512-byte block (relative to the start of the buffers) where they differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b.iter())
        .position(|(x, y)| x != y)
        .map(|i| i / SECTOR * SECTOR)
}

/// Index of the first 512-byte block holding a non-zero byte.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    buf.iter()
        .position(|&x| x != 0)
        .map(|i| i / SECTOR * SECTOR)
}

async fn read_chunk<S: BlockSource>(src: &S, offset: u64, len: u64) -> Result<Vec<u8>, CliError> {
    // len <= IO_BUF_SIZE, so the allocation is bounded.
    let mut buf = vec![0u8; len as usize];
    src.read(offset, &mut buf).await?;
    Ok(buf)
}

async fn status<S: BlockSource>(src: &S, offset: u64, max_len: u64) -> Result<Extent, CliError> {
    let e = src.block_status(offset, max_len).await?;
    if e.len == 0 || e.len > max_len {
        return Err(CliError::Status {
            path: src.name().to_string(),
            offset,
            reason: format!(
                "block status returned length {} for a query of {max_len} bytes",
                e.len
            ),
        });
    }
    Ok(e)
}

/// Runs the comparison, printing qemu-img's messages to `out`.
pub async fn compare<A: BlockSource, B: BlockSource>(
    a: &A,
    b: &B,
    strict: bool,
    progress: &mut Progress,
    out: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let io = |e: std::io::Error| CliError::other(format!("error writing output: {e}"));
    let size1 = a.size();
    let size2 = b.size();
    let total = size1.min(size2);
    let progress_base = size1.max(size2).max(1) as f32;
    progress.set(0.0);

    if strict && size1 != size2 {
        writeln!(out, "Strict mode: Image size mismatch!").map_err(io)?;
        return Ok(Outcome::Different);
    }

    let mut offset = 0u64;
    while offset < total {
        let s1 = status(a, offset, size1 - offset).await?;
        let s2 = status(b, offset, size2 - offset).await?;
        let mut chunk = s1.len.min(s2.len).min(total - offset);
        if strict && flags(&s1) != flags(&s2) {
            writeln!(out, "Strict mode: Offset {offset} block status mismatch!").map_err(io)?;
            return Ok(Outcome::Different);
        }
        if s1.zero && s2.zero {
            // Both read as zeros.
        } else if s1.present == s2.present {
            if s1.present {
                chunk = chunk.min(IO_BUF_SIZE);
                let buf1 = read_chunk(a, offset, chunk).await?;
                let buf2 = read_chunk(b, offset, chunk).await?;
                if let Some(d) = first_difference(&buf1, &buf2) {
                    writeln!(out, "Content mismatch at offset {}!", offset + d as u64)
                        .map_err(io)?;
                    return Ok(Outcome::Different);
                }
            }
        } else {
            chunk = chunk.min(IO_BUF_SIZE);
            let buf = if s1.present {
                read_chunk(a, offset, chunk).await?
            } else {
                read_chunk(b, offset, chunk).await?
            };
            if let Some(d) = first_nonzero(&buf) {
                writeln!(out, "Content mismatch at offset {}!", offset + d as u64).map_err(io)?;
                return Ok(Outcome::Different);
            }
        }
        offset += chunk;
        progress.add(chunk as f32 / progress_base * 100.0);
    }

    if size1 != size2 {
        writeln!(out, "Warning: Image size mismatch!").map_err(io)?;
        let end = size1.max(size2);
        while offset < end {
            let (chunk, nonzero) = if size1 > size2 {
                over_chunk(a, offset, end).await?
            } else {
                over_chunk(b, offset, end).await?
            };
            if let Some(d) = nonzero {
                writeln!(out, "Content mismatch at offset {}!", offset + d as u64).map_err(io)?;
                return Ok(Outcome::Different);
            }
            offset += chunk;
            progress.add(chunk as f32 / progress_base * 100.0);
        }
    }

    writeln!(out, "Images are identical.").map_err(io)?;
    Ok(Outcome::Identical)
}

/// One step over the part of the longer image beyond the shorter one: returns the step length and the
/// position of non-zero data in it, if any.
async fn over_chunk<S: BlockSource>(
    src: &S,
    offset: u64,
    end: u64,
) -> Result<(u64, Option<usize>), CliError> {
    let s = status(src, offset, end - offset).await?;
    if s.present && !s.zero {
        let chunk = s.len.min(IO_BUF_SIZE);
        let buf = read_chunk(src, offset, chunk).await?;
        return Ok((chunk, first_nonzero(&buf)));
    }
    Ok((s.len, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mem::MemImage;

    fn run(a: &MemImage, b: &MemImage, strict: bool) -> (Result<Outcome, String>, String) {
        let mut out = Vec::new();
        let mut p = Progress::new(false, 2.0);
        let rt = tokio::runtime::Builder::new_current_thread().build();
        let r = match rt {
            Ok(rt) => rt
                .block_on(compare(a, b, strict, &mut p, &mut out))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 | 1).collect()
    }

    #[test]
    fn identical() {
        let a = MemImage::dense("a", data(10000));
        let b = MemImage::sparse("b", data(10000));
        let (r, out) = run(&a, &b, false);
        assert_eq!(r, Ok(Outcome::Identical));
        assert_eq!(out, "Images are identical.\n");
    }

    #[test]
    fn content_mismatch_rounds_down_to_sector() {
        let a = MemImage::dense("a", data(1 << 20));
        let mut d = data(1 << 20);
        d[5000] ^= 0xff;
        let b = MemImage::dense("b", d);
        let (r, out) = run(&a, &b, false);
        assert_eq!(r, Ok(Outcome::Different));
        assert_eq!(out, "Content mismatch at offset 4608!\n");
    }

    #[test]
    fn allocated_on_one_side_only() {
        let mut d = vec![0u8; 8192];
        d[3000] = 1;
        let a = MemImage::dense("a", d.clone());
        let b = MemImage::sparse("b", vec![0u8; 8192]);
        let (r, out) = run(&a, &b, false);
        assert_eq!(r, Ok(Outcome::Different));
        assert_eq!(out, "Content mismatch at offset 2560!\n");
        // Allocated zeros against unallocated: identical.
        let a = MemImage::dense("a", vec![0u8; 8192]);
        let (r, _) = run(&a, &b, false);
        assert_eq!(r, Ok(Outcome::Identical));
    }

    #[test]
    fn size_mismatch() {
        let a = MemImage::dense("a", data(4096));
        let mut longer = data(4096);
        longer.extend(vec![0u8; 4096]);
        let b = MemImage::sparse("b", longer.clone());
        let (r, out) = run(&a, &b, false);
        assert_eq!(r, Ok(Outcome::Identical));
        assert_eq!(
            out,
            "Warning: Image size mismatch!\nImages are identical.\n"
        );
        let (r, out) = run(&a, &b, true);
        assert_eq!(r, Ok(Outcome::Different));
        assert_eq!(out, "Strict mode: Image size mismatch!\n");
        longer[7000] = 9;
        let b = MemImage::dense("b", longer);
        let (r, out) = run(&b, &a, false);
        assert_eq!(r, Ok(Outcome::Different));
        assert_eq!(
            out,
            "Warning: Image size mismatch!\nContent mismatch at offset 6656!\n"
        );
    }

    #[test]
    fn strict_block_status() {
        let mut d = data(4096);
        d[1024..1536].fill(0);
        let a = MemImage::dense("a", d.clone());
        let b = MemImage::sparse("b", d);
        let (r, out) = run(&a, &b, true);
        assert_eq!(r, Ok(Outcome::Different));
        assert_eq!(out, "Strict mode: Offset 0 block status mismatch!\n");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::Identical.exit_code(), 0);
        assert_eq!(Outcome::Different.exit_code(), 1);
        assert_eq!(error_exit_code(&CliError::Usage("x".into())), 1);
        assert_eq!(
            error_exit_code(&CliError::Open {
                path: "x".into(),
                reason: "y".into()
            }),
            2
        );
        assert_eq!(
            error_exit_code(&CliError::Status {
                path: "x".into(),
                offset: 0,
                reason: "y".into()
            }),
            3
        );
        assert_eq!(
            error_exit_code(&CliError::Read {
                path: "x".into(),
                offset: 0,
                reason: "y".into()
            }),
            4
        );
    }
}
