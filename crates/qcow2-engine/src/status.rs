//! Block status: what `qemu-img map --output=json` reports for a range of the virtual disk.
//!
//! Semantics follow QEMU's `bdrv_block_status` as used by `qemu-img map` (see `get_block_status` in
//! `qemu-img.c` and `qcow2_co_block_status`): the chain is walked from the top; the first layer that
//! has the range allocated (data or zero) answers, at its depth. A range unallocated in the whole chain
//! is reported at the depth of the last layer as not present, zero, no data. A range that a layer leaves
//! unallocated but that lies beyond the end of its (shorter) backing image is reported at that layer as
//! not present and zero. Data clusters of a qcow2 image detected as metadata-preallocated (QEMU's
//! `qcow2_detect_metadata_preallocation`) are checked against holes of the host file, which read as zero.

/// One extent of `qemu-img map --output=json`. Adjacent extents may be merged by the caller (QEMU merges
/// those with equal flags and depth, and contiguous offsets where present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the extent in bytes (at least 1, at most the `max_len` asked for).
    pub len: u64,
    /// Depth in the backing chain of the layer that answered (0 = the top image).
    pub depth: u32,
    /// Allocated in that layer (data or zero flag), i.e. it does not fall through to a backing file.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Has data in that layer.
    pub data: bool,
    /// Stored as a compressed cluster.
    pub compressed: bool,
    /// Host offset in the layer's data-holding file, where QEMU reports one.
    pub offset: Option<u64>,
}

use qcow2_io::Backend;

use crate::error::{Error, Result};
use crate::image::{Image, Layer};
use crate::mapping::Kind;

/// The block status of `[offset, offset + max_len)` of the chain topped by `top` (see [`BlockStatus`]).
pub(crate) async fn block_status<B: Backend>(
    top: &Image<B>,
    offset: u64,
    max_len: u64,
) -> Result<BlockStatus> {
    let size = top.virtual_size();
    if offset >= size || max_len == 0 {
        return Err(Error::OutOfRange {
            offset,
            len: max_len,
            size,
        });
    }
    let mut len = max_len.min(size - offset);
    let mut img = top;
    let mut depth = 0u32;
    loop {
        let layer = match &img.inner.layer {
            Layer::Raw(r) => {
                let st = r.status(offset, len).await?;
                return Ok(BlockStatus {
                    len: st.len.min(len),
                    depth,
                    present: true,
                    zero: !st.data,
                    data: st.data,
                    compressed: false,
                    offset: Some(offset),
                });
            }
            Layer::Qcow2(q) => q,
        };
        let extents = layer.map(offset, len).await?;
        // `map` covers at least one byte, so there is a first extent; an error rather than a panic.
        let e = extents.first().copied().ok_or_else(|| Error::Corrupt {
            path: img.filename().to_owned(),
            detail: format!("internal: empty lookup at offset {offset:#x}"),
        })?;
        len = e.len;
        let present =
            |zero: bool, data: bool, compressed: bool, off: Option<u64>, len: u64| BlockStatus {
                len,
                depth,
                present: true,
                zero,
                data,
                compressed,
                offset: off,
            };
        let host = match e.kind {
            Kind::Data { host } => {
                let mut zero = false;
                if layer.is_metadata_preallocated().await {
                    let (backend, name) = layer.data_backend();
                    let st = backend.host_status(host.0, len).await.map_err(Error::io(
                        name,
                        "query allocation",
                        host.0,
                    ))?;
                    if !st.data {
                        zero = true;
                    }
                    len = st.len.clamp(1, len);
                }
                return Ok(present(zero, true, false, Some(host.0), len));
            }
            Kind::Zero { host } => return Ok(present(true, false, false, host.map(|h| h.0), len)),
            Kind::Compressed { .. } => return Ok(present(false, true, true, None, len)),
            Kind::Unallocated { host } => host,
        };
        // Where no backing image answers, QEMU keeps the layer's offset (OFFSET_VALID) and adds ZERO.
        let beyond = |depth| BlockStatus {
            len,
            depth,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: host.map(|h| h.0),
        };
        match img.backing() {
            None => return Ok(beyond(depth)),
            Some(b) if offset >= b.virtual_size() => return Ok(beyond(depth)),
            Some(b) => {
                len = len.min(b.virtual_size() - offset);
                img = b;
                depth += 1;
            }
        }
    }
}
