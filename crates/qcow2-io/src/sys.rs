//! Blocking system-call helpers shared by the file backends.
//!
//! Everything here is synchronous: the std backend calls it on its I/O thread pool (the crate's `pool`
//! module), the io_uring backend only for the cheap metadata calls (`fstat`, `ftruncate`, `lseek`) that
//! io_uring has no opcode for in tokio-uring.
//!
//! Lengths always come from [`file_len`]/[`host_len`], never from `st_size` directly: `st_size` is 0 for
//! a block device (an image on an LVM volume, a raw device, a device used as a backing file), whose size
//! is read with `lseek(fd, 0, SEEK_END)` instead. Block devices are never `ftruncate`d ([`set_len`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};

use crate::HostStatus;

/// Size of the chunks of zeros written when the host cannot `fallocate` (bounded memory use).
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// Largest number of iovecs passed to one `pwritev` (Linux's `IOV_MAX`).
pub(crate) const IOV_MAX: usize = 1024;

/// Largest file offset the kernel accepts (`off_t` is signed 64-bit).
const MAX_OFFSET: u64 = i64::MAX as u64;

/// Checks that `[offset, offset + len)` is representable as a file range, returning its end.
pub(crate) fn check_range(offset: u64, len: u64) -> io::Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_OFFSET => Ok(end),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "byte range at offset {offset} of length {len} exceeds the largest file offset {MAX_OFFSET}"
            ),
        )),
    }
}

/// Converts a `usize` length to `u64` (lossless on every supported target).
pub(crate) fn len64(len: usize) -> u64 {
    // usize is at most 64 bits on every target Rust supports for Linux.
    len as u64
}

/// True when an error means "this operation is not supported here", so that an emulation applies.
pub(crate) fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    ) || err.kind() == io::ErrorKind::Unsupported
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the bytes read. Retries
/// `EINTR`. Does not touch `buf[n..]`.
pub(crate) fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + len64(done);
        match file.read_at(&mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// One `preadv2(RWF_NOWAIT)` into `buf` at `offset`: reads only what the page cache holds, never
/// waiting for the disk. Returns the bytes read (0 at or past the end of the file); fails with `EAGAIN`
/// when the first page is not cached, and with `EOPNOTSUPP`/`ENOSYS`/`EINVAL` where the kernel or file
/// system does not support the flag. `EINTR` is returned as is (the caller falls back to a blocking read).
pub(crate) fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} too large"),
        )
    })?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: the one iovec points at `buf`, a live, exclusively borrowed slice of exactly `iov_len`
    // bytes, for the whole (synchronous) call; the kernel writes at most that many bytes into it. The
    // file descriptor stays open while `file` is borrowed.
    let ret = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // ret >= 0 and at most buf.len().
    Ok(usize::try_from(ret).unwrap_or(0).min(buf.len()))
}

/// Like [`pread_full`] for `O_DIRECT` files, where `offset` and `buf` are block-aligned: stops at the
/// first read that is not a whole number of `align` blocks (the end of the file), since the next read
/// would start at an unaligned offset.
pub(crate) fn pread_direct(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    align: usize,
) -> io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + len64(done);
        match file.read_at(&mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if !n.is_multiple_of(align) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`, retrying `EINTR` and short writes.
pub(crate) fn pwrite_all(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + len64(done);
        match file.write_at(&buf[done..], pos) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("write at offset {pos} wrote nothing"),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes the slices back to back from `offset` with `pwritev`, looping on partial writes and splitting
/// at [`IOV_MAX`] iovecs.
pub(crate) fn pwritev_all(file: &File, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // Index of the first buffer not yet fully written, and how much of it is written.
    let mut first = 0usize;
    let mut skip = 0usize;
    let mut pos = offset;
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOV_MAX));
    loop {
        while first < bufs.len() && skip == bufs[first].len() {
            first += 1;
            skip = 0;
        }
        if first == bufs.len() {
            return Ok(());
        }
        iovs.clear();
        for (i, b) in bufs[first..].iter().take(IOV_MAX).enumerate() {
            let start = if i == 0 { skip } else { 0 };
            let rest = &b[start..];
            iovs.push(libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            });
        }
        let count = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
        let off = libc::off_t::try_from(pos).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {pos} too large"),
            )
        })?;
        // SAFETY: every iovec points into a live slice of `bufs` with its exact remaining length; the
        // kernel only reads from them.
        let ret = unsafe { libc::pwritev(fd, iovs.as_ptr(), count, off) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = usize::try_from(ret).unwrap_or(0);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("vectored write at offset {pos} wrote nothing"),
            ));
        }
        pos += len64(n);
        while n > 0 && first < bufs.len() {
            let left = bufs[first].len() - skip;
            if n >= left {
                n -= left;
                first += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
}

/// `fallocate(2)` on `fd`, retrying `EINTR`.
pub(crate) fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let l = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    loop {
        // SAFETY: plain system call on a file descriptor the caller keeps open.
        let ret = unsafe { libc::fallocate(fd, mode, off, l) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `FALLOC_FL_ZERO_RANGE`: zero a range keeping it allocated (extends the file if it ends past EOF).
pub(crate) const MODE_ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE;

/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate a range, never changing the file size.
pub(crate) const MODE_PUNCH_HOLE: libc::c_int =
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// One `lseek` with `whence` (`SEEK_DATA`/`SEEK_HOLE`); `Ok(None)` on `ENXIO`.
fn lseek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: plain system call; it only moves the file position, which positioned I/O ignores.
    let ret = unsafe { libc::lseek(fd, off, whence) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(u64::try_from(ret).ok())
}

/// Data/hole status at `offset` for at most `max_len` bytes, from `SEEK_DATA`/`SEEK_HOLE`.
///
/// Past the end of the file is a hole; where the file system cannot tell, the file's bytes are data.
pub(crate) fn host_status(file: &File, offset: u64, max_len: u64) -> io::Result<HostStatus> {
    let file_len = file_len(file)?;
    if max_len == 0 {
        return Ok(HostStatus {
            data: offset < file_len,
            len: 0,
        });
    }
    if offset >= file_len {
        return Ok(HostStatus {
            data: false,
            len: max_len,
        });
    }
    let in_file = (file_len - offset).min(max_len);
    let fd = file.as_raw_fd();
    match lseek(fd, offset, libc::SEEK_DATA) {
        // No data at or after `offset`: hole to the end of the file, and past it too.
        Ok(None) => Ok(HostStatus {
            data: false,
            len: max_len,
        }),
        Ok(Some(data)) if data > offset => Ok(HostStatus {
            data: false,
            len: (data - offset).min(max_len),
        }),
        Ok(Some(_)) => {
            let hole = match lseek(fd, offset, libc::SEEK_HOLE) {
                Ok(Some(h)) if h > offset => h,
                // Raced with a concurrent change or the fs cannot tell: the bytes up to EOF are data.
                Ok(_) | Err(_) => file_len,
            };
            Ok(HostStatus {
                data: true,
                len: (hole - offset).min(in_file).max(1),
            })
        }
        // The file system does not support SEEK_DATA: report data.
        Err(_) => Ok(HostStatus {
            data: true,
            len: in_file,
        }),
    }
}

/// Bytes allocated on the host for `file` (`st_blocks * 512`).
pub(crate) fn allocated_size(file: &File) -> io::Result<Option<u64>> {
    let meta = file.metadata()?;
    Ok(meta.blocks().checked_mul(512))
}

/// The length of a host file and whether it is a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostLen {
    /// Length in bytes: `st_size` for a regular file (0 for a character device or pipe), the device
    /// size for a block device.
    pub(crate) len: u64,
    /// True for a block device, whose size is fixed (it is never truncated or extended).
    pub(crate) block_device: bool,
}

/// The length of `file` and whether it is a block device: `fstat`, then for a block device (whose
/// `st_size` is 0) `lseek(fd, 0, SEEK_END)`.
pub(crate) fn host_len(file: &File) -> io::Result<HostLen> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        Ok(HostLen {
            len: device_len(file)?,
            block_device: true,
        })
    } else {
        Ok(HostLen {
            len: meta.len(),
            block_device: false,
        })
    }
}

/// The size of the block device `file` from `lseek(fd, 0, SEEK_END)` (positioned I/O ignores the file
/// position this moves).
fn device_len(file: &File) -> io::Result<u64> {
    // SAFETY: plain system call on a descriptor kept open by the borrow of `file`.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot get the size of block device (lseek SEEK_END): {e}"),
        ));
    }
    u64::try_from(ret).map_err(|_| {
        io::Error::other(format!(
            "lseek SEEK_END on a block device returned a negative size {ret}"
        ))
    })
}

/// The current length of `file` (the device size for a block device; see [`host_len`]).
pub(crate) fn file_len(file: &File) -> io::Result<u64> {
    Ok(host_len(file)?.len)
}

/// `ftruncate` for regular files. A block device cannot be resized: asking for its current size
/// succeeds without doing anything, any other length fails with [`io::ErrorKind::InvalidInput`].
pub(crate) fn set_len(file: &File, len: u64) -> io::Result<()> {
    check_range(len, 0)?;
    let host = host_len(file)?;
    if !host.block_device {
        return file.set_len(len);
    }
    if len == host.len {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "cannot resize a block device to {len} bytes: its size is {} bytes and devices cannot be \
             resized",
            host.len
        ),
    ))
}

/// How many bytes of an `O_DIRECT` read-modify-write bounce buffer of `span` bytes at `start` to write
/// back, for a write whose data ends at `end` (`old` is the length from before the write): all of it,
/// except on a block device whose size is not a multiple of the bounce alignment, where the write stops
/// at the end of the device (which is block-aligned) rather than fail with `ENOSPC`.
pub(crate) fn direct_write_span(old: HostLen, start: u64, end: u64, span: usize) -> usize {
    if old.block_device && old.len >= end && old.len > start {
        // `old.len - start` < `start + span - start` = `span` in this branch, so it fits usize.
        let to_dev_end = old.len - start;
        if to_dev_end < len64(span) {
            return to_dev_end as usize;
        }
    }
    span
}

/// After an `O_DIRECT` write of whole blocks that may have extended the file past `want` bytes, trims
/// it back to `want` (`old` is the length from before the write). Block devices are never trimmed.
pub(crate) fn trim_after_direct_write(file: &File, old: HostLen, want: u64) -> io::Result<()> {
    if old.block_device {
        return Ok(());
    }
    file.set_len(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::std_file::SyncFile;
    use std::os::unix::fs::OpenOptionsExt;
    use std::process::Command;

    #[test]
    fn len_of_character_device_is_zero() {
        let f = File::open("/dev/null").unwrap();
        assert_eq!(
            host_len(&f).unwrap(),
            HostLen {
                len: 0,
                block_device: false
            }
        );
        assert_eq!(file_len(&f).unwrap(), 0);
        assert!(!host_status(&f, 0, 4096).unwrap().data);
    }

    #[test]
    fn len_of_regular_file_and_set_len() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        assert_eq!(file_len(&f).unwrap(), 0);
        set_len(&f, 12345).unwrap();
        assert_eq!(
            host_len(&f).unwrap(),
            HostLen {
                len: 12345,
                block_device: false
            }
        );
        set_len(&f, 100).unwrap();
        assert_eq!(file_len(&f).unwrap(), 100);
        assert!(set_len(&f, u64::MAX).is_err());
    }

    /// Detaches the loop device when dropped.
    struct Loop(String);

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    /// A block device (a loop device over a 1 MiB + 512 byte file): sizes come from the device, it is
    /// never resized, and the O_DIRECT read-modify-write path does not try to trim it. Needs root and
    /// `losetup`; skipped with a note otherwise.
    #[test]
    fn block_device_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        let size: u64 = (1 << 20) + 512;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let out = match Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(&path)
            .output()
        {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                eprintln!(
                    "note: block_device_length skipped, losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return;
            }
            Err(e) => {
                eprintln!("note: block_device_length skipped, cannot run losetup: {e}");
                return;
            }
        };
        let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev.0)
            .unwrap();
        assert_eq!(
            host_len(&f).unwrap(),
            HostLen {
                len: size,
                block_device: true
            }
        );
        set_len(&f, size).unwrap();
        let err = set_len(&f, size + 4096).unwrap_err();
        assert!(err.to_string().contains("cannot be resized"), "{err}");
        assert!(set_len(&f, 0).is_err());
        let st = host_status(&f, 0, 1 << 30).unwrap();
        assert!(st.data && st.len > 0 && st.len <= size, "{st:?}");
        let st = host_status(&f, size, 100).unwrap();
        assert!(!st.data);

        // Through the std backend, buffered and O_DIRECT (an unaligned write near the end goes
        // through read-modify-write, which must not truncate the device).
        let sync = SyncFile::new(f, false);
        assert_eq!(sync.len().unwrap(), size);
        let mut buf = vec![0u8; 600];
        assert_eq!(sync.read(&mut buf, size - 500).unwrap(), 500);
        assert!(buf[..500] == data[(size - 500) as usize..]);
        assert!(buf[500..].iter().all(|&b| b == 0));
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev.0);
        let direct = match direct {
            Ok(d) => SyncFile::new(d, true),
            Err(e) => {
                eprintln!("note: O_DIRECT part of block_device_length skipped: {e}");
                return;
            }
        };
        assert_eq!(direct.len().unwrap(), size);
        direct.write_parts(&[b"hello"], size - 7).unwrap();
        assert_eq!(direct.len().unwrap(), size);
        let mut back = [0u8; 7];
        assert_eq!(direct.read(&mut back, size - 7).unwrap(), 7);
        let mut want = [0u8; 7];
        want[..5].copy_from_slice(b"hello");
        want[5..].copy_from_slice(&data[(size - 2) as usize..]);
        assert_eq!(back, want);
    }
}
