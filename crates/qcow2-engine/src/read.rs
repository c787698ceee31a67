//! The read path.
//!
//! A request is served depth by depth. At each depth, every pending piece is looked up in that layer
//! ([`Qcow2Layer::map`]); data extents become host reads (consecutive host-contiguous extents are joined
//! into one I/O, up to [`BATCH_BYTES`]), zero extents are filled in place, compressed clusters are read and
//! decompressed once per request whatever the number of pieces needed from them, and
//! unallocated extents become the pending pieces of the next depth (or are filled with zeros at the
//! bottom, and beyond the end of a shorter backing image). The chain walk is a loop, not an async
//! recursion, so the future stays `Send` for `Send` backends.
//!
//! Locking: the lookup takes the layer's metadata mutex briefly (and reads a missing L2 slice under
//! it); every data read runs without it, and the data reads of one batch run concurrently.

use bytes::BytesMut;
use futures::future::try_join_all;
use qcow2_format::compressed::decompress;
use qcow2_format::types::{GuestOffset, HostOffset};
use qcow2_io::Backend;

use crate::error::{Error, Result};
use crate::image::{Image, Layer};
use crate::mapping::Kind;
use crate::qcow2::Qcow2Layer;
use crate::raw::RawLayer;

/// Bounce memory collected before the pending host reads are issued (bounds the memory of a large
/// request): data bytes, plus cluster size and compressed length per compressed cluster. Each lookup
/// covers at most this many bytes and no single data I/O is longer.
const BATCH_BYTES: usize = 32 * 1024 * 1024;

/// A piece of the request still to serve, from the layer at the current depth.
struct Pending {
    guest: GuestOffset,
    /// Position in the caller's buffer.
    start: usize,
    len: usize,
}

/// A host read into the caller's buffer.
struct DataIo {
    host: HostOffset,
    start: usize,
    len: usize,
}

/// A compressed cluster to read and decompress once, with the parts of it the request needs.
struct CompIo {
    desc: qcow2_format::compressed::CompressedDescriptor,
    /// `(offset in the cluster, position in the caller's buffer, length)` of each needed part.
    pieces: Vec<(usize, usize, usize)>,
}

/// Reads `buf.len()` bytes at `offset` from the chain topped by `top`.
///
/// Works depth by depth: all pieces that fall through to the same backing image are served together,
/// so their host reads run concurrently too.
pub(crate) async fn read<B: Backend>(top: &Image<B>, offset: u64, buf: &mut [u8]) -> Result<()> {
    let size = top.virtual_size();
    let len = buf.len() as u64;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::OutOfRange { offset, len, size });
    }
    if buf.is_empty() {
        return Ok(());
    }
    let layers = top.chain();
    let mut pending = vec![Pending {
        guest: GuestOffset(offset),
        start: 0,
        len: buf.len(),
    }];
    let mut depth = 0;
    while !pending.is_empty() {
        let img = layers[depth];
        let layer_size = img.virtual_size();
        // Beyond the end of a (shorter) backing image: zeros.
        let mut items = Vec::with_capacity(pending.len());
        for p in pending.drain(..) {
            let avail = if p.guest.0 >= layer_size {
                0
            } else {
                (layer_size - p.guest.0).min(p.len as u64) as usize
            };
            buf[p.start + avail..p.start + p.len].fill(0);
            if avail > 0 {
                items.push(Pending { len: avail, ..p });
            }
        }
        let has_next = depth + 1 < layers.len();
        let mut next = Vec::new();
        match &img.inner.layer {
            Layer::Raw(r) => read_raw(r, &items, buf).await?,
            Layer::Qcow2(q) => read_qcow2(q, &items, buf, has_next, &mut next).await?,
        }
        pending = next;
        depth += 1;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` from the chain topped by `top` into `buf` and hands it back.
///
/// The fast path, for the common request that lies in one run of the disk: walking down the chain while
/// the whole request is unallocated, the first layer that has it all as host-contiguous data (or any
/// raw layer) gets `buf` itself for its one host read, so nothing is copied (and with `O_DIRECT` an
/// aligned `buf` goes straight to the kernel); all zeros are filled in place. Anything else (a request
/// split between kinds, compressed data, a shorter backing image) goes through [`read`] from the layer
/// where the walk stopped, which costs a second lookup of the first slice there.
pub(crate) async fn read_owned<B: Backend>(
    top: &Image<B>,
    offset: u64,
    mut buf: BytesMut,
) -> Result<BytesMut> {
    let size = top.virtual_size();
    let len = buf.len() as u64;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::OutOfRange { offset, len, size });
    }
    if buf.is_empty() {
        return Ok(buf);
    }
    let mut img = top;
    let from = loop {
        // Checked above for the top; a shorter backing image goes the general way, from the top (which
        // fills the part beyond its end with zeros).
        if offset + len > img.virtual_size() {
            break top;
        }
        match &img.inner.layer {
            Layer::Raw(r) => {
                // Past the real end of the file the backend zero-fills, as `RawLayer::read` reads.
                let (res, buf) = r.file.read_at(buf, offset).await;
                res.map_err(Error::io(&r.name, "read", offset))?;
                return Ok(buf);
            }
            Layer::Qcow2(q) => {
                let (extents, _busy) = q.map_for_read(offset, len).await?;
                let [e] = extents.as_slice() else { break img };
                if e.len != len {
                    break img;
                }
                match e.kind {
                    Kind::Data { host } => {
                        let (backend, name) = q.data_backend();
                        let (res, buf) = backend.read_at(buf, host.0).await;
                        res.map_err(Error::io(name, "read data", host.0))?;
                        return Ok(buf);
                    }
                    Kind::Zero { .. } => {
                        buf.fill(0);
                        return Ok(buf);
                    }
                    Kind::Unallocated { .. } => match img.backing() {
                        Some(next) => img = next,
                        None => {
                            buf.fill(0);
                            return Ok(buf);
                        }
                    },
                    Kind::Compressed { .. } => break img,
                }
            }
        }
    };
    // The layers above `from` leave the whole request unallocated, so reading from `from` is the same.
    read(from, offset, &mut buf).await?;
    Ok(buf)
}

/// Reads the pieces `items` from the raw layer `r`, concurrently.
async fn read_raw<B: Backend>(r: &RawLayer<B>, items: &[Pending], buf: &mut [u8]) -> Result<()> {
    if let [p] = items {
        return r.read(p.guest.0, &mut buf[p.start..p.start + p.len]).await;
    }
    let reads = items.iter().map(|p| r.read_owned(p.guest.0, p.len));
    let results = try_join_all(reads).await?;
    for (p, data) in items.iter().zip(results) {
        buf[p.start..p.start + p.len].copy_from_slice(&data[..p.len]);
        crate::buf::give(data);
    }
    Ok(())
}

/// Serves the pieces `items` from the qcow2 layer `q`, queueing unallocated parts in `next` (or filling
/// them with zeros when there is no backing image).
async fn read_qcow2<B: Backend>(
    q: &Qcow2Layer<B>,
    items: &[Pending],
    buf: &mut [u8],
    has_next: bool,
    next: &mut Vec<Pending>,
) -> Result<()> {
    let mut data: Vec<DataIo> = Vec::new();
    let mut comp: Vec<CompIo> = Vec::new();
    // Bounce memory the queued reads will take: data bytes, plus cluster size and input length per
    // compressed cluster.
    let mut batch_bytes = 0usize;
    let cs = q.geom.cluster_size();
    // Busy marks of the host clusters read (read-write layers), held until the reads are done.
    let mut busy = Vec::new();
    for p in items {
        let end = p.guest.0 + p.len as u64;
        let mut pos = p.guest.0;
        while pos < end {
            let (extents, guards) = q
                .map_for_read(pos, (end - pos).min(BATCH_BYTES as u64))
                .await?;
            busy.extend(guards);
            for e in extents {
                let start = p.start + (e.guest.0 - p.guest.0) as usize;
                let len = e.len as usize;
                match e.kind {
                    Kind::Data { host } => {
                        batch_bytes += len;
                        match data.last_mut() {
                            Some(last)
                                if last.host.0 + last.len as u64 == host.0
                                    && last.start + last.len == start
                                    && last.len + len <= BATCH_BYTES =>
                            {
                                last.len += len;
                            }
                            _ => data.push(DataIo { host, start, len }),
                        }
                    }
                    Kind::Zero { .. } => buf[start..start + len].fill(0),
                    Kind::Unallocated { .. } => {
                        if has_next {
                            next.push(Pending {
                                guest: e.guest,
                                start,
                                len,
                            });
                        } else {
                            buf[start..start + len].fill(0);
                        }
                    }
                    Kind::Compressed { desc } => {
                        let piece = ((e.guest.0 % cs) as usize, start, len);
                        match comp.last_mut() {
                            Some(last) if last.desc == desc => last.pieces.push(piece),
                            _ => {
                                // Counted before validation; an invalid descriptor fails when read.
                                batch_bytes += cs as usize + desc.host_range().1 as usize;
                                comp.push(CompIo {
                                    desc,
                                    pieces: vec![piece],
                                });
                            }
                        }
                    }
                }
                pos = e.end();
            }
            if batch_bytes >= BATCH_BYTES {
                // The last compressed cluster may go on in the next lookup (or the next piece): keep
                // it queued so that it is still read once.
                let keep = comp.pop();
                read_data(q, std::mem::take(&mut data), buf).await?;
                read_compressed(q, std::mem::take(&mut comp), buf).await?;
                busy.clear();
                batch_bytes = 0;
                if let Some(k) = keep {
                    batch_bytes = cs as usize + k.desc.host_range().1 as usize;
                    comp.push(k);
                }
            }
        }
    }
    read_data(q, data, buf).await?;
    read_compressed(q, comp, buf).await?;
    drop(busy);
    Ok(())
}

/// Issues the host reads of `ios` concurrently and copies the data into `buf`.
async fn read_data<B: Backend>(q: &Qcow2Layer<B>, ios: Vec<DataIo>, buf: &mut [u8]) -> Result<()> {
    if ios.is_empty() {
        return Ok(());
    }
    let (backend, name) = q.data_backend();
    let reads = ios.iter().map(|io| async move {
        let (res, data) = backend.read_at(crate::buf::take(io.len), io.host.0).await;
        if let Err(e) = res {
            crate::buf::give(data);
            return Err(Error::io(name, "read data", io.host.0)(e));
        }
        Ok::<_, Error>(data)
    });
    let results = try_join_all(reads).await?;
    for (io, data) in ios.iter().zip(results) {
        buf[io.start..io.start + io.len].copy_from_slice(&data[..io.len]);
        crate::buf::give(data);
    }
    Ok(())
}

/// Reads and decompresses the compressed clusters of `ios` concurrently and copies the requested parts
/// into `buf`.
async fn read_compressed<B: Backend>(
    q: &Qcow2Layer<B>,
    ios: Vec<CompIo>,
    buf: &mut [u8],
) -> Result<()> {
    if ios.is_empty() {
        return Ok(());
    }
    let cs = q.geom.cluster_size() as usize;
    let ctype = q.header.compression_type();
    let name = &q.name;
    let reads = ios.iter().map(|io| async move {
        // Validated (bounded length) before the input buffer is allocated.
        let (off, len) = q.compressed_range(&io.desc)?;
        let (res, input) = q.file.read_at(crate::buf::take(len as usize), off).await;
        if let Err(e) = res {
            crate::buf::give(input);
            return Err(Error::io(name, "read compressed cluster", off)(e));
        }
        // `decompress` fills all of `out` or fails, so a pooled (non-zeroed) buffer is fine.
        let mut out = crate::buf::take(cs);
        let res = decompress(ctype, &input, &mut out);
        crate::buf::give(input);
        if let Err(e) = res {
            crate::buf::give(out);
            return Err(Error::corrupt(
                name,
                format!("compressed cluster at host offset {off:#x}: {e}"),
            ));
        }
        Ok::<_, Error>(out)
    });
    let results = try_join_all(reads).await?;
    for (io, cluster) in ios.iter().zip(results) {
        for &(in_cluster, start, len) in &io.pieces {
            buf[start..start + len].copy_from_slice(&cluster[in_cluster..in_cluster + len]);
        }
        crate::buf::give(cluster);
    }
    Ok(())
}
