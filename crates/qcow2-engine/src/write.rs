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
use crate::qcow2::write::{SubZero, ZeroOp};

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
    // The block layer's split by the driver's zero alignment (the subcluster size): an unaligned head
    // and tail, each within one subcluster, and an aligned middle (which may end at the disk's end).
    let align = q.geom.subcluster_size();
    let size = img.virtual_size();
    let end = offset + len;
    let mut pos = offset;
    if !pos.is_multiple_of(align) {
        let frag_end = end.min(pos - pos % align + align);
        zero_fragment(img, q, pos, frag_end, unmap).await?;
        pos = frag_end;
    }
    let mid_end = if end == size { end } else { end - end % align };
    if mid_end > pos {
        zero_aligned(img, q, pos, mid_end, unmap).await?;
        pos = mid_end;
    }
    if pos < end {
        zero_fragment(img, q, pos, end, unmap).await?;
    }
    Ok(())
}

/// Whether the backing chain of `img` reads as zeros over `[offset, end)` (true without one).
async fn backing_reads_zero<B: Backend>(img: &Image<B>, offset: u64, end: u64) -> Result<bool> {
    let Some(b) = img.backing() else {
        return Ok(true);
    };
    // Past the end of a shorter backing image the overlay reads zeros.
    let end = end.min(b.virtual_size());
    let mut pos = offset;
    while pos < end {
        let st = b.block_status(pos, end - pos).await?;
        if !st.zero {
            return Ok(false);
        }
        pos += st.len;
    }
    Ok(true)
}

/// An unaligned zero write within one (sub)cluster, as QEMU's `qcow2_co_pwrite_zeroes`: when the rest
/// of the (sub)cluster already reads as zeros and it is unallocated or zero, the whole (sub)cluster
/// becomes zero; otherwise zeros are written.
async fn zero_fragment<B: Backend>(
    img: &Image<B>,
    q: &crate::qcow2::Qcow2Layer<B>,
    a: u64,
    b: u64,
    unmap: bool,
) -> Result<()> {
    let align = q.geom.subcluster_size();
    let size = img.virtual_size();
    let sc_start = a - a % align;
    let sc_end = (sc_start + align).min(size);
    let rest_after = if b == size { b } else { sc_end };
    let backing_zero = backing_reads_zero(img, sc_start, a).await?
        && backing_reads_zero(img, b, rest_after).await?;
    let how = SubZero::IfUnallocated {
        backing_zero,
        unmap,
    };
    zero_sub_or_write(img, q, (sc_start, sc_end - sc_start), how, (a, b)).await
}

/// Zeroes `meta = (offset, len)` of one cluster in metadata as `how` says (keeping a raw data file in
/// step), or writes zeros over `[a, b)` where that does not apply, as QEMU's block layer falls back on
/// `-ENOTSUP`.
async fn zero_sub_or_write<B: Backend>(
    img: &Image<B>,
    q: &crate::qcow2::Qcow2Layer<B>,
    meta: (u64, u64),
    how: SubZero,
    (a, b): (u64, u64),
) -> Result<()> {
    let done = match q.zero_subclusters(meta.0, meta.1, how).await {
        Ok(done) => done,
        Err(e) => return q.corruption_marks(Err(e)).await,
    };
    if done {
        raw_data_file_zero(q, meta.0, meta.1).await
    } else {
        write_zero_bytes(img, a, b - a).await
    }
}

/// A subcluster-aligned zero write `[a, b)` (`b` aligned or the disk's end), as QEMU's
/// `qcow2_subcluster_zeroize`: whole clusters become zero clusters, partial ones (extended L2) get
/// their subclusters' zero bits; v2 without a backing file deallocates instead.
async fn zero_aligned<B: Backend>(
    img: &Image<B>,
    q: &crate::qcow2::Qcow2Layer<B>,
    a: u64,
    b: u64,
    unmap: bool,
) -> Result<()> {
    let has_backing = img.backing().is_some();
    let op = if q.header.version() == Version::V2 {
        // v2 without a backing file: deallocated clusters read as zeros.
        ZeroOp::Discard
    } else {
        ZeroOp::Zero { unmap }
    };
    let cs = q.geom.cluster_size();
    let size = img.virtual_size();
    let mut pos = a;
    if !pos.is_multiple_of(cs) {
        let h = b.min(pos - pos % cs + cs);
        zero_sub_or_write(img, q, (pos, h - pos), SubZero::Range, (pos, h)).await?;
        pos = h;
    }
    let m = if b == size { b } else { b - b % cs };
    if m > pos {
        let res = q.zero_clusters(pos, m - pos, op, has_backing).await;
        q.corruption_marks(res).await?;
        raw_data_file_zero(q, pos, m - pos).await?;
        pos = m;
    }
    if pos < b {
        zero_sub_or_write(img, q, (pos, b - pos), SubZero::Range, (pos, b)).await?;
    }
    Ok(())
}

/// Keeps a raw external data file a valid image of the guest after `[a, a + len)` became zero in
/// metadata only.
async fn raw_data_file_zero<B: Backend>(
    q: &crate::qcow2::Qcow2Layer<B>,
    a: u64,
    len: u64,
) -> Result<()> {
    if let Some(d) = q.data_file.as_ref().filter(|_| q.header.data_file_raw()) {
        d.file
            .zero_range(a, len)
            .await
            .map_err(Error::io(&d.name, "write zeroes", a))?;
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
    q.corruption_marks(res).await?;
    if let Some(d) = q.data_file.as_ref().filter(|_| q.header.data_file_raw()) {
        // Keep a raw data file a valid image of the guest: the discarded clusters read as zeros now
        // (QEMU passes the discard down to the data file).
        d.file
            .punch_hole(start, stop - start)
            .await
            .map_err(Error::io(&d.name, "discard", start))?;
    }
    Ok(())
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
        // A raw image has no metadata: closing it cleanly is flushing it.
        Layer::Raw(_) => flush(img).await,
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
