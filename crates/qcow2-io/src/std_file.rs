//! The std-file backend: blocking positioned I/O (`pread`/`pwrite`/`pwritev`, `fdatasync`, `fallocate`,
//! `lseek(SEEK_DATA/SEEK_HOLE)`) run off the runtime threads with `tokio::task::spawn_blocking`.
//!
//! It works on any Tokio runtime, multi-threaded included, and its futures are `Send`. It is the
//! fallback wherever io_uring is unavailable, so it must be correct everywhere. (The module is called
//! `std_file` rather than `std` so that it cannot shadow the standard library's crate name.)

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};

use crate::aligned::{is_direct_ready, AlignedBuf, AlignedRange, DIRECT_ALIGN, DIRECT_ALIGN_U64};
use crate::sys::{self, check_range, len64};
use crate::{Backend, BackendOpen, HostStatus, OpenFlags};

/// Opens `path` as a `std::fs::File` according to `flags` (`O_DIRECT` through `custom_flags`).
pub(crate) fn open_file(path: &Path, flags: OpenFlags) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    if !flags.read_only {
        opts.write(true);
        opts.create(flags.create);
    } else if flags.create {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot create a file that is opened read-only",
        ));
    }
    if flags.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path)
}

/// A file plus the state that `O_DIRECT` needs; every method blocks.
///
/// With `O_DIRECT`, writes that do not cover whole aligned blocks are done as read-modify-write of the
/// blocks at their ends, serialised by `rmw` (held exclusively by those, shared by aligned writes) so
/// that two of them never rewrite the same block from stale copies.
pub(crate) struct SyncFile {
    file: File,
    direct: bool,
    rmw: RwLock<()>,
}

impl SyncFile {
    /// Wraps `file`; `direct` says whether it was opened with `O_DIRECT`.
    pub(crate) fn new(file: File, direct: bool) -> SyncFile {
        SyncFile {
            file,
            direct,
            rmw: RwLock::new(()),
        }
    }

    /// Fills `buf` from `offset`; zero-fills past EOF and returns the bytes that came from the file.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        check_range(offset, len64(buf.len()))?;
        if buf.is_empty() {
            return Ok(0);
        }
        let n = if !self.direct {
            sys::pread_full(&self.file, buf, offset)?
        } else if is_direct_ready(buf.as_ptr(), buf.len(), offset) {
            sys::pread_direct(&self.file, buf, offset, DIRECT_ALIGN)?
        } else {
            let range = AlignedRange::cover(offset, buf.len())?;
            let mut bounce = AlignedBuf::zeroed(range.len())?;
            let got =
                sys::pread_direct(&self.file, bounce.as_mut_slice(), range.start, DIRECT_ALIGN)?;
            // `offset - range.start` < DIRECT_ALIGN, so it fits usize.
            let skip = (offset - range.start) as usize;
            let avail = got.saturating_sub(skip).min(buf.len());
            buf[..avail].copy_from_slice(&bounce.as_slice()[skip..skip + avail]);
            avail
        };
        buf[n..].fill(0);
        Ok(n)
    }

    /// Writes the parts back to back from `offset`.
    pub(crate) fn write_parts(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        let total = parts
            .iter()
            .try_fold(0usize, |acc, p| acc.checked_add(p.len()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffers too large"))?;
        let end = check_range(offset, len64(total))?;
        if total == 0 {
            return Ok(());
        }
        if !self.direct {
            return match parts {
                [one] => sys::pwrite_all(&self.file, one, offset),
                _ => sys::pwritev_all(&self.file, parts, offset),
            };
        }
        if let [one] = parts {
            if is_direct_ready(one.as_ptr(), one.len(), offset) {
                let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
                return sys::pwrite_all(&self.file, one, offset);
            }
        }
        let range = AlignedRange::cover(offset, total)?;
        let mut bounce = AlignedBuf::zeroed(range.len())?;
        let aligned_ends = range.start == offset && range.end == end;
        if aligned_ends {
            copy_parts(bounce.as_mut_slice(), parts);
            let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            return sys::pwrite_all(&self.file, bounce.as_slice(), range.start);
        }
        let _exclusive = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        let old_len = sys::file_len(&self.file)?;
        let span = range.len();
        let head_partial = offset != range.start;
        if head_partial {
            sys::pread_direct(
                &self.file,
                &mut bounce.as_mut_slice()[..DIRECT_ALIGN],
                range.start,
                DIRECT_ALIGN,
            )?;
        }
        let tail_start = range.end - DIRECT_ALIGN_U64;
        if end != range.end && !(head_partial && tail_start == range.start) {
            sys::pread_direct(
                &self.file,
                &mut bounce.as_mut_slice()[span - DIRECT_ALIGN..],
                tail_start,
                DIRECT_ALIGN,
            )?;
        }
        // `offset - range.start` < DIRECT_ALIGN.
        let skip = (offset - range.start) as usize;
        copy_parts(&mut bounce.as_mut_slice()[skip..skip + total], parts);
        sys::pwrite_all(&self.file, bounce.as_slice(), range.start)?;
        // The aligned write may have extended the file past the requested end: trim it back.
        let want = old_len.max(end);
        if range.end > want {
            self.file.set_len(want)?;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset` in bounded chunks (the emulation of `fallocate`).
    pub(crate) fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = check_range(offset, len)?;
        let chunk_max = len64(sys::ZERO_CHUNK);
        let zeros =
            AlignedBuf::zeroed(sys::ZERO_CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX)))?;
        let mut pos = offset;
        while pos < end {
            // Stop the first chunk at a chunk boundary so that later ones are aligned.
            let n = (end - pos).min(chunk_max - pos % chunk_max);
            // n <= ZERO_CHUNK and <= len, so it fits the zero buffer.
            let n = n as usize;
            self.write_parts(&[&zeros.as_slice()[..n]], pos)?;
            pos += len64(n);
        }
        Ok(())
    }

    /// `fallocate(ZERO_RANGE)`, or zeros written where unsupported.
    pub(crate) fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match sys::fallocate(self.file.as_raw_fd(), sys::MODE_ZERO_RANGE, offset, len) {
            Err(e) if sys::is_unsupported(&e) => self.write_zeros(offset, len),
            other => other,
        }
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`, or zeros written (within the file) where unsupported.
    pub(crate) fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match sys::fallocate(self.file.as_raw_fd(), sys::MODE_PUNCH_HOLE, offset, len) {
            Err(e) if sys::is_unsupported(&e) => self.punch_emulated(offset, end),
            other => other,
        }
    }

    /// The emulation of hole punching: zeros written over the part of `[offset, end)` inside the file.
    fn punch_emulated(&self, offset: u64, end: u64) -> io::Result<()> {
        let end = end.min(sys::file_len(&self.file)?);
        if offset < end {
            self.write_zeros(offset, end - offset)
        } else {
            Ok(())
        }
    }

    /// `fdatasync`.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The file length.
    pub(crate) fn len(&self) -> io::Result<u64> {
        sys::file_len(&self.file)
    }

    /// `ftruncate`.
    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        check_range(len, 0)?;
        self.file.set_len(len)
    }

    /// `SEEK_DATA`/`SEEK_HOLE` status.
    pub(crate) fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        check_range(offset, 0)?;
        sys::host_status(&self.file, offset, max_len)
    }

    /// `st_blocks * 512`.
    pub(crate) fn allocated_size(&self) -> io::Result<Option<u64>> {
        sys::allocated_size(&self.file)
    }
}

impl std::fmt::Debug for SyncFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncFile")
            .field("fd", &self.file.as_raw_fd())
            .field("direct", &self.direct)
            .finish()
    }
}

/// Copies `parts` back to back into `dst` (which is exactly their total length).
fn copy_parts(dst: &mut [u8], parts: &[&[u8]]) {
    let mut at = 0usize;
    for p in parts {
        dst[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
}

/// A file accessed with blocking positioned I/O on Tokio's blocking thread pool.
///
/// Cloning is cheap and shares the file. Works on any Tokio runtime; outside a runtime the calls run
/// inline on the calling thread.
#[derive(Clone, Debug)]
pub struct StdFileBackend {
    inner: Arc<SyncFile>,
}

impl StdFileBackend {
    /// Wraps an open file. Pass `direct: true` if it was opened with `O_DIRECT`, so that unaligned
    /// transfers are bounced through aligned buffers.
    pub fn from_file(file: File, direct: bool) -> StdFileBackend {
        StdFileBackend {
            inner: Arc::new(SyncFile::new(file, direct)),
        }
    }

    /// Opens `path` synchronously (for callers outside any runtime).
    pub fn open_blocking(path: &Path, flags: OpenFlags) -> io::Result<StdFileBackend> {
        Ok(StdFileBackend::from_file(
            open_file(path, flags)?,
            flags.direct,
        ))
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.inner.file
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// Runs `f` on the shared file off the runtime threads.
    async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&SyncFile) -> io::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || f(&inner)).await?
    }
}

/// Runs `f` on Tokio's blocking pool, or inline when there is no runtime.
pub(crate) async fn blocking<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| io::Error::other(format!("blocking I/O task did not complete: {e}"))),
        Err(_) => Ok(f()),
    }
}

impl Backend for StdFileBackend {
    async fn read_at(&self, buf: BytesMut, offset: u64) -> (io::Result<usize>, BytesMut) {
        let inner = Arc::clone(&self.inner);
        let len = buf.len();
        let res = blocking(move || {
            let mut buf = buf;
            let r = inner.read(&mut buf[..], offset);
            (r, buf)
        })
        .await;
        match res {
            Ok(pair) => pair,
            // The task was cancelled (runtime shutting down): the buffer is gone; hand back zeros.
            Err(e) => (Err(e), BytesMut::zeroed(len)),
        }
    }

    async fn write_at(&self, buf: Bytes, offset: u64) -> io::Result<()> {
        self.run(move |f| f.write_parts(&[&buf[..]], offset)).await
    }

    async fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        self.run(move |f| {
            let parts: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
            f.write_parts(&parts, offset)
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.run(|f| f.sync_data()).await
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(move |f| f.zero_range(offset, len)).await
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(move |f| f.punch_hole(offset, len)).await
    }

    async fn len(&self) -> io::Result<u64> {
        self.run(|f| f.len()).await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.run(move |f| f.set_len(len)).await
    }

    async fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        self.run(move |f| f.host_status(offset, max_len)).await
    }

    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.run(|f| f.allocated_size()).await
    }
}

impl BackendOpen for StdFileBackend {
    async fn open(path: &Path, flags: OpenFlags) -> io::Result<StdFileBackend> {
        let path = path.to_path_buf();
        blocking(move || StdFileBackend::open_blocking(&path, flags)).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_zeros_chunks_and_unaligned_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z");
        let f = SyncFile::new(
            open_file(
                &path,
                OpenFlags {
                    create: true,
                    ..Default::default()
                },
            )
            .unwrap(),
            false,
        );
        let len = 3 * sys::ZERO_CHUNK + 123;
        f.write_parts(&[&vec![0xAAu8; len + 100]], 0).unwrap();
        f.write_zeros(7, len64(len)).unwrap();
        let mut back = vec![1u8; len + 100];
        assert_eq!(f.read(&mut back, 0).unwrap(), len + 100);
        assert!(back[..7].iter().all(|&b| b == 0xAA));
        assert!(back[7..7 + len].iter().all(|&b| b == 0));
        assert!(back[7 + len..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn punch_emulation_stays_inside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let f = SyncFile::new(
            open_file(
                &path,
                OpenFlags {
                    create: true,
                    ..Default::default()
                },
            )
            .unwrap(),
            false,
        );
        f.write_parts(&[&[7u8; 10_000]], 0).unwrap();
        f.punch_emulated(9_000, 20_000).unwrap();
        f.punch_emulated(50_000, 60_000).unwrap();
        assert_eq!(f.len().unwrap(), 10_000);
        let mut back = vec![1u8; 10_000];
        assert_eq!(f.read(&mut back, 0).unwrap(), 10_000);
        assert!(back[..9_000].iter().all(|&b| b == 7));
        assert!(back[9_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn huge_offsets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        let f = SyncFile::new(
            open_file(
                &path,
                OpenFlags {
                    create: true,
                    ..Default::default()
                },
            )
            .unwrap(),
            false,
        );
        let mut buf = [0u8; 8];
        assert_eq!(
            f.read(&mut buf, u64::MAX - 3).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(f.write_parts(&[&buf], u64::MAX).is_err());
        assert!(f.zero_range(u64::MAX, 2).is_err());
        assert!(f.punch_hole(1 << 63, 1).is_err());
        assert!(f.set_len(u64::MAX).is_err());
        assert!(f.host_status(u64::MAX, 1).is_err());
    }
}
