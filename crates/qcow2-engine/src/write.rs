//! The write path at the image level: range checks, raw images, and the split of zero writes and
//! discards into whole clusters (metadata operations) and partial ones (explicit zeros or nothing),
//! as QEMU's block layer splits them by the driver's alignment.
//!
//! The qcow2 work is in `qcow2::write`; see its module docs and docs/ARCHITECTURE.md.

use bytes::Bytes;
use qcow2_format::header::Version;
use qcow2_io::Backend;

use crate::error::{Error, Result};
use crate::image::{Image, Layer};
use crate::qcow2::write::ZeroOp;

/// Checks that `[offset, offset + len)` lies within the virtual disk.
fn check_range<B: Backend>(img: &Image<B>, offset: u64, len: u64) -> Result<()> {
    let size = img.virtual_size();
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::OutOfRange { offset, len, size });
    }
    Ok(())
}

/// Fails for a read-only handle.
fn check_writable<B: Backend>(img: &Image<B>) -> Result<()> {
    if img.is_read_only() {
        return Err(Error::ReadOnly);
    }
    Ok(())
}

pub(crate) async fn write<B: Backend>(img: &Image<B>, offset: u64, data: Bytes) -> Result<()> {
    check_writable(img)?;
    check_range(img, offset, data.len() as u64)?;
    if data.is_empty() {
        return Ok(());
    }
    match &img.inner.layer {
        Layer::Raw(r) => r
            .file
            .write_at(data, offset)
            .await
            .map_err(Error::io(&r.name, "write", offset)),
        Layer::Qcow2(q) => {
            let res = q.write_data(img, offset, data).await;
            q.corruption_marks(res).await
        }
    }
}

/// Writes explicit zeros over `[offset, offset + len)`, in bounded pieces.
async fn write_zero_bytes<B: Backend>(img: &Image<B>, offset: u64, len: u64) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = Bytes::from(vec![0u8; PIECE.min(len) as usize]);
    let mut pos = offset;
    while pos < offset + len {
        let n = PIECE.min(offset + len - pos);
        write(img, pos, zeros.slice(..n as usize)).await?;
        pos += n;
    }
    Ok(())
}

/// The whole clusters of `[offset, end)`: the cluster-aligned middle, extended to the end of the disk
/// when the request reaches it (QEMU treats the partial last cluster as whole then).
fn whole_clusters(offset: u64, end: u64, cs: u64, size: u64) -> Option<(u64, u64)> {
    let start = offset.div_ceil(cs) * cs;
    let stop = if end == size { end } else { end - end % cs };
    (start < stop).then_some((start, stop))
}

pub(crate) async fn write_zeroes<B: Backend>(
    img: &Image<B>,
    offset: u64,
    len: u64,
    unmap: bool,
) -> Result<()> {
    check_writable(img)?;
    check_range(img, offset, len)?;
    if len == 0 {
        return Ok(());
    }
    let q = match &img.inner.layer {
        Layer::Raw(r) => {
            return r.file.zero_range(offset, len).await.map_err(Error::io(
                &r.name,
                "write zeroes",
                offset,
            ));
        }
        Layer::Qcow2(q) => q,
    };
    let has_backing = img.backing().is_some();
    let v2 = q.header.version() == Version::V2;
    if v2 && has_backing {
        // No zero flag, and deallocating would expose the backing file: write real zeros.
        return write_zero_bytes(img, offset, len).await;
    }
    let end = offset + len;
    let cs = q.geom.cluster_size();
    let Some((start, stop)) = whole_clusters(offset, end, cs, img.virtual_size()) else {
        return write_zero_bytes(img, offset, len).await;
    };
    if start > offset {
        write_zero_bytes(img, offset, start - offset).await?;
    }
    let op = if v2 {
        // v2 without a backing file: deallocated clusters read as zeros.
        ZeroOp::Discard
    } else {
        ZeroOp::Zero { unmap }
    };
    let res = q.zero_clusters(start, stop - start, op, has_backing).await;
    q.corruption_marks(res).await?;
    if let Some(d) = q.data_file.as_ref().filter(|_| q.header.data_file_raw()) {
        // Keep a raw data file a valid image of the guest.
        d.file
            .zero_range(start, stop - start)
            .await
            .map_err(Error::io(&d.name, "write zeroes", start))?;
    }
    if end > stop {
        write_zero_bytes(img, stop, end - stop).await?;
    }
    Ok(())
}

pub(crate) async fn discard<B: Backend>(img: &Image<B>, offset: u64, len: u64) -> Result<()> {
    check_writable(img)?;
    check_range(img, offset, len)?;
    if len == 0 {
        return Ok(());
    }
    let q = match &img.inner.layer {
        Layer::Raw(r) => {
            return r
                .file
                .punch_hole(offset, len)
                .await
                .map_err(Error::io(&r.name, "discard", offset));
        }
        Layer::Qcow2(q) => q,
    };
    let has_backing = img.backing().is_some();
    if q.header.version() == Version::V2 && has_backing {
        // QEMU 10 leaves v2 images with a backing file alone on discard.
        return Ok(());
    }
    let cs = q.geom.cluster_size();
    let Some((start, stop)) = whole_clusters(offset, offset + len, cs, img.virtual_size()) else {
        return Ok(());
    };
    let res = q
        .zero_clusters(start, stop - start, ZeroOp::Discard, has_backing)
        .await;
    q.corruption_marks(res).await
}

pub(crate) async fn flush<B: Backend>(img: &Image<B>) -> Result<()> {
    check_writable(img)?;
    match &img.inner.layer {
        Layer::Raw(r) => r
            .file
            .flush()
            .await
            .map_err(Error::io(&r.name, "fdatasync", 0)),
        Layer::Qcow2(q) => {
            let res = q.flush().await;
            q.corruption_marks(res).await
        }
    }
}

pub(crate) async fn close<B: Backend>(img: &Image<B>) -> Result<()> {
    if img.is_read_only() {
        return Ok(());
    }
    match &img.inner.layer {
        Layer::Raw(r) => r
            .file
            .flush()
            .await
            .map_err(Error::io(&r.name, "fdatasync", 0)),
        Layer::Qcow2(q) => {
            let res = q.close().await;
            q.corruption_marks(res).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::whole_clusters;

    #[test]
    fn whole_cluster_ranges() {
        assert_eq!(whole_clusters(0, 65536, 65536, 1 << 20), Some((0, 65536)));
        assert_eq!(whole_clusters(512, 65536, 65536, 1 << 20), None);
        assert_eq!(
            whole_clusters(512, 200_000, 65536, 1 << 20),
            Some((65536, 196608))
        );
        // The partial last cluster counts as whole when the request reaches the end.
        assert_eq!(
            whole_clusters(65536, 100_352, 65536, 100_352),
            Some((65536, 100_352))
        );
    }
}
