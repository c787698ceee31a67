//! Guest-to-host mapping of a run of the virtual disk in one qcow2 layer.
//!
//! A lookup ([`crate::qcow2::Qcow2Layer::map`]) turns a guest range into [`Extent`]s, each a run of
//! (sub)clusters of the same [`Kind`]; runs of data are host-contiguous, so that the read path issues one
//! host I/O per extent. Extents never cross an L2 slice boundary (one lookup = one slice under the
//! metadata lock), but the read path joins host-contiguous data extents of consecutive slices again.
//!
//! Spec: qcow2.txt, "Cluster mapping" and "Extended L2 Entries" (subcluster allocation/zero bitmaps).

use qcow2_format::compressed::CompressedDescriptor;
use qcow2_format::types::{GuestOffset, HostOffset};

/// What a run of guest bytes maps to in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Data stored uncompressed at `host` (in the data file if the image has one, else in the image
    /// file). `host` is the host offset of the run's first byte.
    Data { host: HostOffset },
    /// Reads as zeros in this layer. `host` is the host offset of the first byte where the zero cluster
    /// kept its allocation (QEMU's ZERO_ALLOC), reported by block status.
    Zero { host: Option<HostOffset> },
    /// Not allocated in this layer: read from the backing image, or zeros without one. `host` where the
    /// cluster has a host cluster although this subcluster is unallocated (extended L2; QEMU's
    /// UNALLOCATED_ALLOC), which block status reports when no backing image answers.
    Unallocated { host: Option<HostOffset> },
    /// Part of one compressed cluster: the rest of the cluster within the looked-up range, as one
    /// extent even with extended L2 (a compressed cluster has no subclusters). Extents of this kind are
    /// never joined, so one never spans two clusters; the read path still groups pieces sharing a
    /// descriptor (pieces of a backing compressed cluster under an extended-L2 overlay).
    Compressed { desc: CompressedDescriptor },
}

/// A run of guest bytes of one [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    /// Guest offset of the first byte.
    pub(crate) guest: GuestOffset,
    /// Length in bytes (> 0).
    pub(crate) len: u64,
    /// What the run maps to.
    pub(crate) kind: Kind,
}

impl Extent {
    /// Guest offset one past the last byte. Extents are built from in-range guest offsets, so this
    /// cannot overflow (the virtual size is bounded far below `u64::MAX` by the format crate).
    pub(crate) fn end(&self) -> u64 {
        self.guest.0 + self.len
    }
}

/// Whether `next`, starting right where `prev` ends, can be joined to `prev`.
fn joinable(prev: &Extent, next: &Extent) -> bool {
    if prev.end() != next.guest.0 {
        return false;
    }
    match (prev.kind, next.kind) {
        (Kind::Data { host: a }, Kind::Data { host: b }) => a.0.checked_add(prev.len) == Some(b.0),
        (Kind::Zero { host: a }, Kind::Zero { host: b })
        | (Kind::Unallocated { host: a }, Kind::Unallocated { host: b }) => match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.0.checked_add(prev.len) == Some(b.0),
            _ => false,
        },
        _ => false,
    }
}

/// Appends `next` to `out`, joining it with the last extent where possible.
pub(crate) fn push_extent(out: &mut Vec<Extent>, next: Extent) {
    if next.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if joinable(last, &next) {
            last.len += next.len;
            return;
        }
    }
    out.push(next);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_contiguous_data_only() {
        let mut v = Vec::new();
        push_extent(
            &mut v,
            Extent {
                guest: GuestOffset(0),
                len: 512,
                kind: Kind::Data {
                    host: HostOffset(4096),
                },
            },
        );
        push_extent(
            &mut v,
            Extent {
                guest: GuestOffset(512),
                len: 512,
                kind: Kind::Data {
                    host: HostOffset(4608),
                },
            },
        );
        push_extent(
            &mut v,
            Extent {
                guest: GuestOffset(1024),
                len: 512,
                kind: Kind::Data {
                    host: HostOffset(8192),
                },
            },
        );
        push_extent(
            &mut v,
            Extent {
                guest: GuestOffset(1536),
                len: 512,
                kind: Kind::Unallocated { host: None },
            },
        );
        push_extent(
            &mut v,
            Extent {
                guest: GuestOffset(2048),
                len: 512,
                kind: Kind::Unallocated { host: None },
            },
        );
        push_extent(
            &mut v,
            Extent {
                guest: GuestOffset(2560),
                len: 512,
                kind: Kind::Zero { host: None },
            },
        );
        push_extent(
            &mut v,
            Extent {
                guest: GuestOffset(3072),
                len: 0,
                kind: Kind::Zero { host: None },
            },
        );
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].len, 1024);
        assert_eq!(v[2].len, 1024);
    }
}
