//! Reading the internal snapshot table at open, as QEMU's `qcow2_read_snapshots` does, so that an image
//! whose table QEMU refuses is refused here too, and so that `info` can list the snapshots.
//!
//! Spec: qcow2.txt, "Snapshots". The table is parsed by the format crate (QEMU's limits: at most 65536
//! entries, 1024 bytes of extra data each, 64 MiB in total). It is read in growing chunks (64 KiB, then
//! x8) so that a small table costs one small read and memory stays bounded by the 64 MiB limit. A table
//! that runs past the end of the file is corruption (QEMU would read zeros there; refusing is the
//! project's decision, as for L2 tables and data clusters past EOF).

use qcow2_format::error::FormatError;
use qcow2_format::image_header::ImageHeader;
use qcow2_format::snapshot::{parse_snapshot_table, Snapshot, MAX_SNAPSHOTS_SIZE};
use qcow2_io::Backend;

use crate::error::{Error, Result};

/// First read size for the snapshot table.
const FIRST_CHUNK: u64 = 64 * 1024;

/// Reads and parses the snapshot table of `header` (empty when there are no snapshots).
pub(crate) async fn read_snapshots<B: Backend>(
    file: &B,
    path: &str,
    header: &ImageHeader,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    Ok(read_snapshot_table(file, path, header, file_len).await?.0)
}

/// As [`read_snapshots`], also returning the table's length in bytes (for the overlap map).
pub(crate) async fn read_snapshot_table<B: Backend>(
    file: &B,
    path: &str,
    header: &ImageHeader,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let h = &header.header;
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let offset = h.snapshots_offset;
    // A table running past the end of the file is a corrupt header (the lead's decision; QEMU's block
    // layer would read zeros there). The format crate's 64 MiB limit bounds what is read.
    let cap = MAX_SNAPSHOTS_SIZE.min(file_len.saturating_sub(offset));
    let mut size = FIRST_CHUNK.min(cap);
    loop {
        // `size` <= 64 MiB.
        let (res, buf) = file
            .read_at(crate::buf::io_buf(size as usize), offset)
            .await;
        res.map_err(Error::io(path, "read snapshot table", offset))?;
        match parse_snapshot_table(&buf, h.nb_snapshots) {
            Ok((snapshots, len)) => return Ok((snapshots, len as u64)),
            Err(FormatError::Truncated { .. }) if size < cap => size = cap.min(size * 8),
            Err(e @ FormatError::Truncated { .. }) => {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "the snapshot table at {offset:#x} ({} snapshots) runs past the end of the \
                         file (length {file_len:#x}): {e}",
                        h.nb_snapshots
                    ),
                ))
            }
            Err(e) => return Err(Error::format(path)(e)),
        }
    }
}
