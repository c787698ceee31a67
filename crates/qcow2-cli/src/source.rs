//! What the commands need from an opened image, as a trait so that the command logic (compare, convert,
//! bench) can be tested on in-memory images. Block status is the engine's [`qcow2_engine::BlockStatus`].

use std::future::Future;

use bytes::Bytes;

use crate::error::CliError;

/// One block-status answer: the same meaning as one `qemu-img map --output=json` extent (the engine's
/// type; in-memory test images build it directly).
pub use qcow2_engine::BlockStatus as Extent;

/// A readable image.
pub trait BlockSource {
    /// The image's name, for messages.
    fn name(&self) -> &str;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Status of the range starting at `offset`, at most `max_len` bytes long.
    fn block_status(
        &self,
        offset: u64,
        max_len: u64,
    ) -> impl Future<Output = Result<Extent, CliError>>;
    /// Reads `buf.len()` bytes at `offset` (within the virtual size).
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = Result<(), CliError>>;
}

/// A writable output file (for convert).
pub trait BlockSink {
    /// Writes all of `data` at `offset`.
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = Result<(), CliError>>;
    /// Makes `len` bytes at `offset` read as zeros (deallocating them where possible).
    fn zero(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), CliError>>;
    /// Sets the output's length.
    fn set_len(&self, len: u64) -> impl Future<Output = Result<(), CliError>>;
    /// Makes the written data durable.
    fn flush(&self) -> impl Future<Output = Result<(), CliError>>;
}

#[cfg(test)]
pub mod mem {
    //! In-memory sources and sinks for unit tests.
    use super::*;
    use std::cell::RefCell;

    /// An image with explicit extents (data bytes plus a status per range).
    pub struct MemImage {
        /// Name.
        pub name: String,
        /// Contents.
        pub data: Vec<u8>,
        /// `(start, extent)` pairs covering the image in order.
        pub extents: Vec<(u64, Extent)>,
    }

    /// An extent at depth 0, not compressed, holding data exactly when `present`.
    fn extent(len: u64, present: bool, zero: bool, offset: Option<u64>) -> Extent {
        Extent {
            len,
            depth: 0,
            present,
            zero,
            data: present,
            compressed: false,
            offset,
        }
    }

    impl MemImage {
        /// All data, one extent.
        pub fn dense(name: &str, data: Vec<u8>) -> Self {
            let len = data.len() as u64;
            MemImage {
                name: name.into(),
                data,
                extents: vec![(0, extent(len, true, false, Some(0)))],
            }
        }

        /// Status from the contents: 512-byte blocks that are all zero are unallocated.
        pub fn sparse(name: &str, data: Vec<u8>) -> Self {
            let mut extents: Vec<(u64, Extent)> = Vec::new();
            for (i, block) in data.chunks(512).enumerate() {
                let zero = block.iter().all(|&b| b == 0);
                // Unallocated (zero) or allocated data.
                let ext = extent(block.len() as u64, !zero, zero, None);
                extents.push(((i * 512) as u64, ext));
            }
            MemImage {
                name: name.into(),
                data,
                extents,
            }
        }
    }

    impl BlockSource for MemImage {
        fn name(&self) -> &str {
            &self.name
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        async fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent, CliError> {
            for (start, ext) in &self.extents {
                if offset >= *start && offset < start + ext.len {
                    let skip = offset - start;
                    let mut e = *ext;
                    e.len = (ext.len - skip).min(max_len);
                    e.offset = ext.offset.map(|o| o + skip);
                    return Ok(e);
                }
            }
            Err(CliError::other(format!("status beyond end: {offset}")))
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CliError> {
            let start = offset as usize;
            let src = self
                .data
                .get(start..start + buf.len())
                .ok_or_else(|| CliError::other(format!("read beyond end: {offset}")))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// A sink recording writes into a byte vector.
    #[derive(Default)]
    pub struct MemSink {
        /// Contents.
        pub data: RefCell<Vec<u8>>,
        /// Every write as `(offset, len)`.
        pub writes: RefCell<Vec<(u64, usize)>>,
    }

    impl BlockSink for MemSink {
        async fn zero(&self, offset: u64, len: u64) -> Result<(), CliError> {
            let mut d = self.data.borrow_mut();
            let end = (offset + len) as usize;
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].fill(0);
            Ok(())
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<(), CliError> {
            let mut d = self.data.borrow_mut();
            let end = offset as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(&data);
            self.writes.borrow_mut().push((offset, data.len()));
            Ok(())
        }
        async fn set_len(&self, len: u64) -> Result<(), CliError> {
            self.data.borrow_mut().resize(len as usize, 0);
            Ok(())
        }
        async fn flush(&self) -> Result<(), CliError> {
            Ok(())
        }
    }
}
