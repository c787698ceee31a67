//! The internal snapshot table (spec: `docs/interop/qcow2.txt`, "Snapshots").
//!
//! Each entry, starting at a multiple of 8 bytes from the table start: a 40-byte fixed part,
//! `extra_data_size` bytes of extra data (known fields: 64-bit VM state size, virtual disk size,
//! instruction count; anything after them is kept verbatim), the ID string and the name (no
//! terminators). QEMU's limits apply: at most 65536 snapshots, at most 1024 bytes of extra data
//! per entry, a table of at most 64 MiB.

use crate::bytes::{align8, be16, be32, be64, slice};
use crate::error::{FormatError, Result};

/// QEMU's maximum number of snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// QEMU's maximum extra data per snapshot table entry.
pub const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// QEMU's maximum snapshot table size in bytes (64 MiB).
pub const MAX_SNAPSHOTS_SIZE: u64 = 64 << 20;
/// Size of the fixed part of a snapshot table entry.
pub const SNAPSHOT_HEADER_SIZE: u64 = 40;
/// Size of the extra data fields this implementation knows.
pub const KNOWN_EXTRA_SIZE: u64 = 24;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Number of entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name (invalid UTF-8 is replaced lossily).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (the 64-bit extra field when present, else the 32-bit field).
    pub vm_state_size: u64,
    /// Instruction count (extra data >= 24 bytes and not all ones).
    pub icount: Option<u64>,
    /// Virtual disk size at creation (extra data >= 16 bytes); `None` means the image size.
    pub disk_size: Option<u64>,
    /// Extra data beyond the known 24 bytes, kept verbatim.
    pub extra_unknown: Vec<u8>,
}

/// Parses `nb_snapshots` entries from the start of `bytes` (the table read from
/// `snapshots_offset`). Returns the snapshots and the table length in bytes (up to the end of
/// the last entry's name).
///
/// Errors: more than 65536 snapshots; extra data over 1024 bytes; a table beyond 64 MiB
/// ([`FormatError::SnapshotTableTooBig`]); an entry beyond `bytes`
/// ([`FormatError::Truncated`]). Reading `min(64 MiB, file length - snapshots_offset)` bytes is
/// always enough.
pub fn parse_snapshot_table(bytes: &[u8], nb_snapshots: u32) -> Result<(Vec<Snapshot>, usize)> {
    let nb = u64::from(nb_snapshots);
    if nb > MAX_SNAPSHOTS {
        return Err(FormatError::TooManySnapshots { count: nb });
    }
    let mut out = Vec::with_capacity((nb_snapshots as usize).min(bytes.len() / 40));
    let mut off: usize = 0;
    for i in 0..nb {
        let too_big = |end: usize| -> Result<()> {
            if end as u64 > MAX_SNAPSHOTS_SIZE {
                return Err(FormatError::SnapshotTableTooBig {
                    size: end as u64,
                    max: MAX_SNAPSHOTS_SIZE,
                });
            }
            Ok(())
        };
        // Entry sizes are bounded (40 + 1024 + 2 * 65535) and off <= 64 MiB, so no overflow.
        off = align8(off).unwrap_or(usize::MAX);
        too_big(off.saturating_add(SNAPSHOT_HEADER_SIZE as usize))?;
        let h = slice(
            bytes,
            off,
            SNAPSHOT_HEADER_SIZE as usize,
            "snapshot table entry",
        )?;
        let l1_table_offset = be64(h, 0, "snapshot table entry")?;
        let l1_size = be32(h, 8, "snapshot table entry")?;
        let id_size = be16(h, 12, "snapshot table entry")? as usize;
        let name_size = be16(h, 14, "snapshot table entry")? as usize;
        let date_sec = be32(h, 16, "snapshot table entry")?;
        let date_nsec = be32(h, 20, "snapshot table entry")?;
        let vm_clock_nsec = be64(h, 24, "snapshot table entry")?;
        let vm_state_size32 = be32(h, 32, "snapshot table entry")?;
        let extra_size = u64::from(be32(h, 36, "snapshot table entry")?);
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(FormatError::SnapshotExtraDataTooLarge {
                index: i,
                size: extra_size,
            });
        }
        let extra_size = extra_size as usize;
        off += SNAPSHOT_HEADER_SIZE as usize;
        let end = off + extra_size + id_size + name_size;
        too_big(end)?;
        let extra = slice(bytes, off, extra_size, "snapshot extra data")?;
        let known = extra_size.min(KNOWN_EXTRA_SIZE as usize);
        let field = |at: usize| -> Result<Option<u64>> {
            if known >= at + 8 {
                Ok(Some(be64(extra, at, "snapshot extra data")?))
            } else {
                Ok(None)
            }
        };
        let vm_state_size = field(0)?.unwrap_or(u64::from(vm_state_size32));
        let disk_size = field(8)?;
        let icount = field(16)?.filter(|&v| v != u64::MAX);
        let extra_unknown = extra.get(known..).unwrap_or(&[]).to_vec();
        off += extra_size;
        let id = slice(bytes, off, id_size, "snapshot ID")?;
        off += id_size;
        let name = slice(bytes, off, name_size, "snapshot name")?;
        off += name_size;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            icount,
            disk_size,
            extra_unknown,
        });
    }
    Ok((out, off))
}

/// Serialises a snapshot table as QEMU writes it: every entry with the 24 bytes of known extra
/// data (a missing `disk_size` is written as `default_disk_size`, a missing `icount` as all
/// ones) followed by `extra_unknown`, entries aligned to 8 bytes. The 32-bit VM state size field
/// holds `vm_state_size` when it fits, else 0, as QEMU writes it.
///
/// Errors when a limit would be exceeded (count, extra data, ID/name longer than 65535 bytes,
/// table over 64 MiB).
pub fn serialize_snapshot_table(snapshots: &[Snapshot], default_disk_size: u64) -> Result<Vec<u8>> {
    let err = |detail: String| FormatError::Serialize {
        what: "snapshot table",
        detail,
    };
    if snapshots.len() as u64 > MAX_SNAPSHOTS {
        return Err(err(format!("{} snapshots (max 65536)", snapshots.len())));
    }
    let mut v = Vec::new();
    for (i, s) in snapshots.iter().enumerate() {
        let extra_size = KNOWN_EXTRA_SIZE as usize + s.extra_unknown.len();
        if extra_size as u64 > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(err(format!(
                "entry {i}: {extra_size} bytes of extra data (max 1024)"
            )));
        }
        let id_len =
            u16::try_from(s.id.len()).map_err(|_| err(format!("entry {i}: ID too long")))?;
        let name_len =
            u16::try_from(s.name.len()).map_err(|_| err(format!("entry {i}: name too long")))?;
        v.resize(
            align8(v.len()).ok_or_else(|| err("size overflow".into()))?,
            0,
        );
        v.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        v.extend_from_slice(&s.l1_size.to_be_bytes());
        v.extend_from_slice(&id_len.to_be_bytes());
        v.extend_from_slice(&name_len.to_be_bytes());
        v.extend_from_slice(&s.date_sec.to_be_bytes());
        v.extend_from_slice(&s.date_nsec.to_be_bytes());
        v.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        // As QEMU: 0 when the size does not fit 32 bits (older readers then see a disk-only
        // snapshot rather than a truncated VM state); the full value is in the extra data.
        let vm32 = u32::try_from(s.vm_state_size).unwrap_or(0);
        v.extend_from_slice(&vm32.to_be_bytes());
        v.extend_from_slice(&(extra_size as u32).to_be_bytes());
        v.extend_from_slice(&s.vm_state_size.to_be_bytes());
        v.extend_from_slice(&s.disk_size.unwrap_or(default_disk_size).to_be_bytes());
        v.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        v.extend_from_slice(&s.extra_unknown);
        v.extend_from_slice(s.id.as_bytes());
        v.extend_from_slice(s.name.as_bytes());
        if v.len() as u64 > MAX_SNAPSHOTS_SIZE {
            return Err(err(format!("table exceeds {MAX_SNAPSHOTS_SIZE} bytes")));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(i: u32) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x10000 * u64::from(i + 1),
            l1_size: 16,
            id: format!("{}", i + 1),
            name: format!("snap-{i}"),
            date_sec: 1_700_000_000 + i,
            date_nsec: 5,
            vm_clock_nsec: 77,
            vm_state_size: 0x1_0000_0001,
            icount: if i.is_multiple_of(2) {
                None
            } else {
                Some(12345)
            },
            disk_size: Some(1 << 30),
            extra_unknown: if i == 2 { vec![9; 13] } else { vec![] },
        }
    }

    #[test]
    fn roundtrip() {
        let snaps: Vec<_> = (0..4).map(snap).collect();
        let b = serialize_snapshot_table(&snaps, 0).unwrap();
        let (p, len) = parse_snapshot_table(&b, 4).unwrap();
        assert_eq!(p, snaps);
        assert_eq!(len, b.len());
        assert!(matches!(
            parse_snapshot_table(&b[..b.len() - 1], 4),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn short_extra_data() {
        // A v2-style entry without extra data: 32-bit VM state size, no disk size / icount.
        let mut b = vec![0u8; 40];
        b[8..12].copy_from_slice(&4u32.to_be_bytes());
        b[12..14].copy_from_slice(&1u16.to_be_bytes());
        b[32..36].copy_from_slice(&1234u32.to_be_bytes());
        b.push(b'1');
        let (p, len) = parse_snapshot_table(&b, 1).unwrap();
        assert_eq!(len, 41);
        assert_eq!(p[0].vm_state_size, 1234);
        assert_eq!(p[0].disk_size, None);
        assert_eq!(p[0].icount, None);
        assert_eq!(p[0].id, "1");
    }

    #[test]
    fn limits() {
        assert!(matches!(
            parse_snapshot_table(&[], 65537),
            Err(FormatError::TooManySnapshots { count: 65537 })
        ));
        let mut b = vec![0u8; 40];
        b[36..40].copy_from_slice(&1025u32.to_be_bytes());
        assert!(matches!(
            parse_snapshot_table(&b, 1),
            Err(FormatError::SnapshotExtraDataTooLarge {
                index: 0,
                size: 1025
            })
        ));
        let mut s = snap(0);
        s.extra_unknown = vec![0; 1001];
        assert!(serialize_snapshot_table(&[s], 0).is_err());
        assert_eq!(parse_snapshot_table(&[], 0).unwrap(), (vec![], 0));
    }
}
