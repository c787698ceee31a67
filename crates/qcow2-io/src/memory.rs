//! An in-memory backend: a growable byte vector behind a mutex, for tests and fuzzing.
//!
//! Every call completes immediately. The vector grows on writes past its end, but never beyond a
//! configurable maximum (default [`DEFAULT_MAX_SIZE`]), so that an offset taken from a hostile image
//! cannot make the process allocate without bound; such writes fail with an error instead.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

use crate::sys::len64;
use crate::{Backend, HostStatus};

/// Host status of a file held in memory (`size` bytes, all data: memory has no holes).
pub(crate) fn vec_host_status(size: u64, offset: u64, max_len: u64) -> HostStatus {
    if offset < size {
        HostStatus {
            data: true,
            len: (size - offset).min(max_len),
        }
    } else {
        HostStatus {
            data: false,
            len: max_len,
        }
    }
}

/// Default largest size a [`MemoryBackend`] grows to (4 GiB).
pub const DEFAULT_MAX_SIZE: u64 = 4 << 30;

/// A byte vector used as a file. Cloning shares the contents.
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    data: Arc<Mutex<Vec<u8>>>,
    max_size: u64,
}

impl Default for MemoryBackend {
    fn default() -> MemoryBackend {
        MemoryBackend::new()
    }
}

impl MemoryBackend {
    /// An empty backend with the default maximum size.
    pub fn new() -> MemoryBackend {
        MemoryBackend::from_vec(Vec::new())
    }

    /// A backend holding `data` (which may be larger than the maximum size; it just cannot grow).
    pub fn from_vec(data: Vec<u8>) -> MemoryBackend {
        MemoryBackend {
            data: Arc::new(Mutex::new(data)),
            max_size: DEFAULT_MAX_SIZE,
        }
    }

    /// Sets the largest size writes, `zero_range` and `set_len` may grow the contents to.
    pub fn with_max_size(mut self, max_size: u64) -> MemoryBackend {
        self.max_size = max_size;
        self
    }

    /// The largest size the contents may grow to.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // The vector is always left consistent (no panics while it is borrowed mutably), so a poisoned
        // lock's contents are still valid.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The end of `[offset, offset + len)`, or an error if it overflows.
    fn end_of(offset: u64, len: u64) -> io::Result<u64> {
        offset.checked_add(len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("byte range at offset {offset} of length {len} overflows"),
            )
        })
    }

    /// Grows `data` with zeros to at least `end` bytes, respecting the maximum size.
    fn grow_to(&self, data: &mut Vec<u8>, end: u64) -> io::Result<()> {
        if end <= len64(data.len()) {
            return Ok(());
        }
        if end > self.max_size {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "memory backend cannot grow to {end} bytes (maximum size {})",
                    self.max_size
                ),
            ));
        }
        let new_len = usize::try_from(end).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{end} bytes do not fit in memory"),
            )
        })?;
        data.try_reserve(new_len - data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot grow memory backend to {end} bytes"),
            )
        })?;
        data.resize(new_len, 0);
        Ok(())
    }

    /// Index range in `data` for `len` bytes at `offset`, both known to lie within it.
    fn span(offset: u64, len: usize) -> std::ops::Range<usize> {
        // Callers have checked `offset + len <= data.len()`, so offset fits usize.
        let start = offset as usize;
        start..start + len
    }
}

impl Backend for MemoryBackend {
    async fn read_at(&self, mut buf: BytesMut, offset: u64) -> (io::Result<usize>, BytesMut) {
        if let Err(e) = MemoryBackend::end_of(offset, len64(buf.len())) {
            return (Err(e), buf);
        }
        let data = self.lock();
        let have = len64(data.len()).saturating_sub(offset);
        // `have` < data.len() so it fits usize.
        let n = (have.min(len64(buf.len()))) as usize;
        if n > 0 {
            buf[..n].copy_from_slice(&data[MemoryBackend::span(offset, n)]);
        }
        buf[n..].fill(0);
        (Ok(n), buf)
    }

    async fn write_at(&self, buf: Bytes, offset: u64) -> io::Result<()> {
        self.writev_at(vec![buf], offset).await
    }

    async fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        let total = bufs
            .iter()
            .try_fold(0u64, |acc, b| acc.checked_add(len64(b.len())))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffers too large"))?;
        let end = MemoryBackend::end_of(offset, total)?;
        if total == 0 {
            return Ok(());
        }
        let mut data = self.lock();
        self.grow_to(&mut data, end)?;
        let mut pos = offset;
        for b in &bufs {
            data[MemoryBackend::span(pos, b.len())].copy_from_slice(b);
            pos += len64(b.len());
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = MemoryBackend::end_of(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut data = self.lock();
        let old_len = len64(data.len());
        self.grow_to(&mut data, end)?;
        // Bytes that grew are zero already; clear the ones that existed.
        let stop = end.min(old_len);
        if offset < stop {
            // Both within the vector.
            data[offset as usize..stop as usize].fill(0);
        }
        Ok(())
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = MemoryBackend::end_of(offset, len)?;
        let mut data = self.lock();
        let stop = end.min(len64(data.len()));
        if offset < stop {
            // Both within the vector.
            data[offset as usize..stop as usize].fill(0);
        }
        Ok(())
    }

    async fn len(&self) -> io::Result<u64> {
        Ok(len64(self.lock().len()))
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        let mut data = self.lock();
        if len <= len64(data.len()) {
            // Smaller than the current length, so it fits usize.
            data.truncate(len as usize);
            Ok(())
        } else {
            self.grow_to(&mut data, len)
        }
    }

    async fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        Ok(vec_host_status(len64(self.lock().len()), offset, max_len))
    }

    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(Some(len64(self.lock().len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test runtime")
            .block_on(f)
    }

    #[test]
    fn huge_offsets_never_panic_or_allocate() {
        block_on(async {
            let m = MemoryBackend::new().with_max_size(1 << 20);
            let (r, _) = m.read_at(BytesMut::zeroed(16), u64::MAX - 3).await;
            assert!(r.is_err());
            let (r, b) = m.read_at(BytesMut::zeroed(16), u64::MAX - 100).await;
            assert_eq!(r.unwrap(), 0);
            assert!(b.iter().all(|&x| x == 0));
            assert!(m
                .write_at(Bytes::from_static(b"x"), u64::MAX)
                .await
                .is_err());
            assert!(m.write_at(Bytes::from_static(b"x"), 1 << 40).await.is_err());
            assert!(m.zero_range(1 << 40, 1).await.is_err());
            assert!(m.zero_range(u64::MAX, 2).await.is_err());
            assert!(m.set_len(1 << 40).await.is_err());
            m.punch_hole(1 << 40, 1 << 40).await.unwrap();
            assert!(m.punch_hole(u64::MAX, 2).await.is_err());
            assert_eq!(m.len().await.unwrap(), 0);
            m.write_at(Bytes::from_static(b"ok"), (1 << 20) - 2)
                .await
                .unwrap();
            assert_eq!(m.len().await.unwrap(), 1 << 20);
        });
    }

    #[test]
    fn clones_share_contents() {
        block_on(async {
            let a = MemoryBackend::from_vec(vec![1, 2, 3]);
            let b = a.clone();
            b.write_at(Bytes::from_static(&[9]), 1).await.unwrap();
            assert_eq!(a.contents(), vec![1, 9, 3]);
        });
    }
}
