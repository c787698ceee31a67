//! Raw images: guest offset = file offset.
//!
//! As in QEMU, the virtual size is the file size rounded up to a multiple of 512 bytes; the bytes between
//! the real end of the file and that size read as zeros. Block status comes from the host file's
//! data/hole layout (`SEEK_DATA`/`SEEK_HOLE`, like QEMU's file-posix driver): data is reported as data
//! with `offset = guest offset`, holes as zero; the rounded-up tail past the real end of file is reported
//! as zero, as `qemu-img map` does.

use qcow2_io::Backend;

use crate::error::{Error, Result};

/// Rounds `len` up to a multiple of 512, saturating just below `u64::MAX`.
pub(crate) fn round_up_512(len: u64) -> u64 {
    match len.checked_add(511) {
        Some(v) => v & !511,
        None => !511,
    }
}

/// A raw image file.
pub(crate) struct RawLayer<B> {
    pub(crate) name: String,
    pub(crate) file: B,
    /// The real length of the file at open.
    pub(crate) file_len: u64,
    /// `file_len` rounded up to 512.
    pub(crate) virtual_size: u64,
}

/// The status of a run of a raw image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawStatus {
    pub(crate) len: u64,
    pub(crate) data: bool,
}

impl<B: Backend> RawLayer<B> {
    /// Wraps an opened file.
    pub(crate) async fn open(file: B, name: String) -> Result<Self> {
        let file_len = file
            .len()
            .await
            .map_err(Error::io(&name, "get length", 0))?;
        Ok(RawLayer {
            virtual_size: round_up_512(file_len),
            name,
            file,
            file_len,
        })
    }

    /// Reads `buf.len()` bytes at `offset` (within the virtual size; bytes past the real end of file are
    /// zeros).
    pub(crate) async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let bounce = self.read_owned(offset, buf.len()).await?;
        buf.copy_from_slice(&bounce[..buf.len()]);
        crate::buf::give(bounce);
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a pooled buffer (zeros past the real end of file); give it
    /// back with [`crate::buf::give`] after use.
    pub(crate) async fn read_owned(&self, offset: u64, len: usize) -> Result<bytes::BytesMut> {
        let (res, data) = self.file.read_at(crate::buf::take(len), offset).await;
        if let Err(e) = res {
            crate::buf::give(data);
            return Err(Error::io(&self.name, "read", offset)(e));
        }
        Ok(data)
    }

    /// Data/hole status of the run starting at `offset`, at most `max_len` bytes (`max_len > 0`,
    /// `offset` below the virtual size).
    pub(crate) async fn status(&self, offset: u64, max_len: u64) -> Result<RawStatus> {
        if offset >= self.file_len {
            // The rounded-up tail past the real end of file reads as zeros (QEMU reports it as a hole).
            return Ok(RawStatus {
                len: max_len.min(self.virtual_size.saturating_sub(offset)).max(1),
                data: false,
            });
        }
        let in_file = max_len.min(self.file_len - offset);
        let st = self
            .file
            .host_status(offset, in_file)
            .await
            .map_err(Error::io(&self.name, "query allocation", offset))?;
        Ok(RawStatus {
            len: st.len.clamp(1, in_file),
            data: st.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::round_up_512;

    #[test]
    fn rounding() {
        assert_eq!(round_up_512(0), 0);
        assert_eq!(round_up_512(1), 512);
        assert_eq!(round_up_512(512), 512);
        assert_eq!(round_up_512(1000), 1024);
        assert_eq!(round_up_512(u64::MAX), !511);
    }
}
