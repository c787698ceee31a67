//! The io_uring backend, through tokio-uring.
//!
//! Reads, writes, vectored writes, `fdatasync` and `fallocate` are io_uring operations. The calls that
//! io_uring (as exposed by tokio-uring) has no opcode for — `fstat`, `ftruncate`, `lseek(SEEK_DATA)` —
//! go to a duplicate descriptor of the same open file: `fstat` inline (it does not block on I/O), the
//! others on Tokio's blocking pool.
//!
//! A [`UringBackend`] only works inside a tokio-uring runtime (`tokio_uring::start`, thread-per-core);
//! [`BackendOpen::open`] refuses to open one elsewhere, and its futures are not `Send`.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::RwLock;
use tokio_uring::buf::{BoundedBuf, IoBufMut};

use crate::aligned::{is_direct_ready, AlignedBuf, AlignedRange, DIRECT_ALIGN};
use crate::rmw::{self, DirectWrite};
use crate::std_file::{blocking, open_file};
use crate::sys::{self, check_range, len64};
use crate::{Backend, BackendOpen, HostStatus, OpenFlags};

/// Largest transfer submitted as one io_uring read (the kernel caps a single read below 2 GiB anyway).
const MAX_OP: usize = 1 << 30;

struct Inner {
    /// The io_uring side of the file.
    file: tokio_uring::fs::File,
    /// A duplicate descriptor of the same open file, for the calls without an io_uring opcode.
    std: Arc<File>,
    /// Opened with `O_DIRECT`: unaligned transfers are bounced.
    direct: bool,
    /// Serialises `O_DIRECT` read-modify-write of partial blocks (exclusive) against aligned writes
    /// (shared).
    rmw: RwLock<()>,
}

/// A file accessed through io_uring (tokio-uring). Cloning is cheap and shares the file.
///
/// Only usable inside a tokio-uring runtime: tokio-uring panics when an operation is submitted
/// elsewhere, which is why [`BackendOpen::open`] checks first (see [`crate::in_uring_runtime`]).
#[derive(Clone)]
pub struct UringBackend {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("file", &self.inner.std)
            .field("direct", &self.inner.direct)
            .finish()
    }
}

impl UringBackend {
    /// Wraps an open file (pass `direct: true` if it was opened with `O_DIRECT`). The caller must be
    /// inside a tokio-uring runtime when it later calls any [`Backend`] method.
    pub fn from_std(file: File, direct: bool) -> io::Result<UringBackend> {
        let dup = file.try_clone()?;
        Ok(UringBackend {
            inner: Rc::new(Inner {
                file: tokio_uring::fs::File::from_std(dup),
                std: Arc::new(file),
                direct,
                rmw: RwLock::new(()),
            }),
        })
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// Reads into `buf[range]` at `offset` until the range is full or the file ends. With `direct`,
    /// stops after a read that is not whole blocks (the end of the file). Retries `EINTR`.
    async fn read_into<T: IoBufMut>(
        &self,
        mut buf: T,
        range: Range<usize>,
        offset: u64,
        direct: bool,
    ) -> (io::Result<usize>, T) {
        let want = range.end - range.start;
        let mut done = 0usize;
        while done < want {
            // One operation moves at most MAX_OP bytes (the SQE length field is 32 bits).
            let stop = range.end.min(range.start + done + MAX_OP);
            let slice = buf.slice(range.start + done..stop);
            let (res, slice) = self.inner.file.read_at(slice, offset + len64(done)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    if direct && !n.is_multiple_of(DIRECT_ALIGN) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(done), buf)
    }

    /// Writes all of `buf` at `offset`.
    async fn write_all<T: BoundedBuf>(&self, buf: T, offset: u64) -> io::Result<()> {
        let (res, _buf) = self.inner.file.write_all_at(buf, offset).await;
        res
    }

    /// Writes the non-empty `bufs` back to back from `offset` with io_uring `writev`, looping on partial
    /// writes and splitting at `IOV_MAX` iovecs.
    async fn writev_all(&self, mut bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        while !bufs.is_empty() {
            let rest = if bufs.len() > sys::IOV_MAX {
                bufs.split_off(sys::IOV_MAX)
            } else {
                Vec::new()
            };
            let (res, batch) = self.inner.file.writev_at(bufs, pos).await;
            let mut n = match res {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("vectored write at offset {pos} wrote nothing"),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            };
            pos += len64(n);
            let mut left = Vec::with_capacity(batch.len() + rest.len());
            for b in batch {
                if n >= b.len() {
                    n -= b.len();
                } else {
                    left.push(Bytes::slice(&b, n..));
                    n = 0;
                }
            }
            left.extend(rest);
            bufs = left;
        }
        Ok(())
    }

    /// Writes the parts back to back from `offset`, bouncing through aligned memory under `O_DIRECT`.
    async fn write_parts(&self, parts: Vec<Bytes>, offset: u64) -> io::Result<()> {
        let total = rmw::total_len(&parts)?;
        check_range(offset, len64(total))?;
        let mut parts: Vec<Bytes> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Ok(());
        }
        if !self.inner.direct {
            return if parts.len() == 1 {
                // Just checked: exactly one element.
                let one = parts.pop().unwrap_or_default();
                self.write_all(one, offset).await
            } else {
                self.writev_all(parts, offset).await
            };
        }
        if let [one] = parts.as_slice() {
            if is_direct_ready(one.as_ptr(), one.len(), offset) {
                let _shared = self.inner.rmw.read().await;
                let one = parts.pop().unwrap_or_default();
                return self.write_all(one, offset).await;
            }
        }
        let plan = DirectWrite::plan(offset, total)?;
        let mut bounce = AlignedBuf::zeroed(plan.span())?;
        if plan.is_aligned() {
            rmw::copy_parts(bounce.as_mut_slice(), &parts);
            let _shared = self.inner.rmw.read().await;
            return self.write_all(bounce, plan.range.start).await;
        }
        let _exclusive = self.inner.rmw.write().await;
        let old = sys::host_len(&self.inner.std)?;
        for (part, at) in plan.reads() {
            let (res, b) = self.read_into(bounce, part, at, true).await;
            bounce = b;
            res?;
        }
        rmw::copy_parts(&mut bounce.as_mut_slice()[plan.data.clone()], &parts);
        let n = plan.write_len(old);
        self.write_all(bounce.slice(..n), plan.range.start).await?;
        // Trims what the aligned write added past the end (never a block device).
        plan.finish(&self.inner.std, old)
    }

    /// Writes `len` zero bytes at `offset` in bounded chunks (the emulation of `fallocate`).
    async fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunks = rmw::zero_chunks(offset, len)?;
        let zeros = Bytes::from(vec![0u8; rmw::zero_buf_len(len)]);
        for (pos, n) in chunks {
            // n <= ZERO_CHUNK and <= len, so it fits the zero buffer.
            self.write_parts(vec![Bytes::slice(&zeros, ..n)], pos)
                .await?;
        }
        Ok(())
    }
}

impl Backend for UringBackend {
    async fn read_at(&self, mut buf: BytesMut, offset: u64) -> (io::Result<usize>, BytesMut) {
        let len = buf.len();
        if let Err(e) = check_range(offset, len64(len)) {
            return (Err(e), buf);
        }
        if len == 0 {
            return (Ok(0), buf);
        }
        let direct = self.inner.direct;
        let n = if !direct || is_direct_ready(buf.as_ptr(), len, offset) {
            let (res, b) = self.read_into(buf, 0..len, offset, direct).await;
            buf = b;
            match res {
                Ok(n) => n,
                Err(e) => return (Err(e), buf),
            }
        } else {
            let range = match AlignedRange::cover(offset, len) {
                Ok(r) => r,
                Err(e) => return (Err(e), buf),
            };
            let bounce = match AlignedBuf::zeroed(range.len()) {
                Ok(b) => b,
                Err(e) => return (Err(e), buf),
            };
            let span = range.len();
            let (res, bounce) = self.read_into(bounce, 0..span, range.start, true).await;
            let got = match res {
                Ok(n) => n,
                Err(e) => return (Err(e), buf),
            };
            // `offset - range.start` < DIRECT_ALIGN.
            let skip = (offset - range.start) as usize;
            let avail = got.saturating_sub(skip).min(len);
            buf[..avail].copy_from_slice(&bounce.as_slice()[skip..skip + avail]);
            avail
        };
        buf[n..].fill(0);
        (Ok(n), buf)
    }

    async fn write_at(&self, buf: Bytes, offset: u64) -> io::Result<()> {
        self.write_parts(vec![buf], offset).await
    }

    async fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        self.write_parts(bufs, offset).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.inner.file.sync_data().await
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self
            .inner
            .file
            .fallocate(offset, len, sys::MODE_ZERO_RANGE)
            .await
        {
            Err(e) if sys::is_unsupported(&e) => self.write_zeros(offset, len).await,
            other => other,
        }
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self
            .inner
            .file
            .fallocate(offset, len, sys::MODE_PUNCH_HOLE)
            .await
        {
            Err(e) if sys::is_unsupported(&e) => {
                match rmw::punch_range(offset, end, sys::file_len(&self.inner.std)?) {
                    Some((at, len)) => self.write_zeros(at, len).await,
                    None => Ok(()),
                }
            }
            other => other,
        }
    }

    async fn len(&self) -> io::Result<u64> {
        sys::file_len(&self.inner.std)
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        check_range(len, 0)?;
        let file = Arc::clone(&self.inner.std);
        blocking(move || sys::set_len(&file, len)).await?
    }

    async fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        check_range(offset, 0)?;
        let file = Arc::clone(&self.inner.std);
        blocking(move || sys::host_status(&file, offset, max_len)).await?
    }

    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        sys::allocated_size(&self.inner.std)
    }
}

impl BackendOpen for UringBackend {
    /// Opens `path`; fails with [`io::ErrorKind::Unsupported`] outside a tokio-uring runtime.
    async fn open(path: &Path, flags: OpenFlags) -> io::Result<UringBackend> {
        if !crate::local::in_uring_runtime() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the io_uring backend needs a tokio-uring runtime (tokio_uring::start)",
            ));
        }
        let owned = path.to_path_buf();
        let file = blocking(move || open_file(&owned, flags)).await??;
        UringBackend::from_std(file, flags.direct)
    }
}
