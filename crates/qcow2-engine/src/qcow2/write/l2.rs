//! L2 tables and entries for writing: making the table covering a guest offset exclusively ours
//! (allocating it, or copying a shared one when its L1 entry lacks COPIED), reading and changing
//! entries in the cached slices, and marking the L1 table dirty.
//!
//! Spec: qcow2.txt, "Cluster mapping" (COPIED flag of L1 entries: refcount exactly 1). Ordering: a new
//! or copied L2 table is written to its new cluster at once, without a barrier; its L1 entry is changed
//! only in memory and written by the flush after the barrier that makes the table durable (see
//! `flush.rs`). The old shared table's refcount drops by deferred decrement.

use qcow2_format::l1::{L1Entry, L1E_COPIED};
use qcow2_io::Backend;

use super::super::entry::{cluster_entry, ClusterEntry};
use super::super::overlap::MetaKind;
use super::super::{Metadata, Qcow2Layer};
use crate::error::{Error, Result};

/// Entries of the L1 table per dirty-tracking chunk (4 KiB).
pub(crate) const L1_CHUNK_ENTRIES: usize = 512;

/// Where an L2 entry lives in the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryPos {
    /// Host offset of the cached slice.
    pub(crate) slice_off: u64,
    /// Byte offset of the entry in the slice.
    pub(crate) byte: usize,
    /// Index in the L2 table (for messages).
    pub(crate) l2_index: u64,
}

impl<B: Backend> Qcow2Layer<B> {
    /// The host offset of the L2 table covering `guest`, made writable: a missing table is allocated
    /// (zeroed) when `create`, a shared one (L1 entry without COPIED) is copied. `None` when the L1
    /// entry is unallocated and `create` is false.
    pub(crate) async fn l2_table_for_write(
        &self,
        meta: &mut Metadata,
        guest: u64,
        create: bool,
    ) -> Result<Option<u64>> {
        let cs = self.geom.cluster_size();
        let l1_index = guest / self.geom.l1_entry_coverage();
        let idx = usize::try_from(l1_index)
            .ok()
            .filter(|&i| i < meta.l1.len())
            .ok_or_else(|| {
                Error::corrupt(
                    &self.name,
                    format!(
                        "L1 index {l1_index} for guest offset {guest:#x} is beyond the L1 table"
                    ),
                )
            })?;
        let raw = meta.l1[idx];
        let l1e = L1Entry::decode(raw, self.geom).map_err(|e| {
            Error::corrupt(
                &self.name,
                format!("L1 table entry {l1_index} ({raw:#018x}): {e}"),
            )
        })?;
        match l1e.l2_offset {
            Some(off) if l1e.copied => {
                let off = off.0;
                if off < cs || off >= self.file_len() {
                    return Err(Error::corrupt(
                        &self.name,
                        format!(
                            "L1 table entry {l1_index} points to an L2 table at {off:#x}, outside \
                             the file's clusters (file length {:#x})",
                            self.file_len()
                        ),
                    ));
                }
                Ok(Some(off))
            }
            None if !create => Ok(None),
            old => {
                let w = meta.w.as_deref_mut().ok_or(Error::ReadOnly)?;
                let new = self.alloc_clusters(w, 1).await?;
                w.overlap.insert(new.offset, cs, MetaKind::ActiveL2);
                let content = match old {
                    // A shared table: copy it (its entries keep their flags; the data clusters are
                    // now referenced by both tables, which their refcounts already count).
                    Some(old) => {
                        let (res, buf) = self
                            .file
                            .read_at(crate::buf::io_buf(cs as usize), old.0)
                            .await;
                        res.map_err(Error::io(&self.name, "read L2 table", old.0))?;
                        // Cached slices of the old table stay valid: it is never written (it is
                        // shared), so none of them is dirty.
                        buf.freeze()
                    }
                    // Written even when the cluster is fresh (past the old end of the file, reading
                    // as zeros already): the L1 entry must never point past the end of the file, not
                    // even after a crash that keeps the L1 write but nothing else (the flush writes
                    // this table's cluster before the barrier that precedes the L1 entry).
                    None => bytes::Bytes::from(vec![0u8; cs as usize]),
                };
                self.guard_write(meta, new.offset, cs, Some((MetaKind::ActiveL2, new.offset)))
                    .await?;
                self.file
                    .write_at(content.clone(), new.offset)
                    .await
                    .map_err(Error::io(&self.name, "write L2 table", new.offset))?;
                // The cluster may have held an L2 table freed earlier whose slices are still cached:
                // make the cache agree with what is now on disk there.
                let mut at = new.offset;
                while at < new.offset + cs {
                    if let Some(slice) = meta.l2.get_mut(at) {
                        let range = (at - new.offset) as usize
                            ..(at - new.offset + self.slice_bytes) as usize;
                        slice.data.copy_from_slice(&content[range]);
                        slice.dirty = false;
                    }
                    at += self.slice_bytes;
                }
                let w = meta.w.as_deref_mut().ok_or(Error::ReadOnly)?;
                if let Some(old) = old {
                    w.refcounts.defer_decrement(old.0, cs);
                }
                meta.l1[idx] = new.offset | L1E_COPIED;
                w.l1_dirty.insert(idx / L1_CHUNK_ENTRIES);
                Ok(Some(new.offset))
            }
        }
    }

    /// The position of the entry of the guest cluster holding `guest` in table `table`.
    pub(crate) fn entry_pos(&self, table: u64, guest: u64) -> EntryPos {
        let esize = self.geom.l2_entry_size();
        let l2_index = (guest % self.geom.l1_entry_coverage()) / self.geom.cluster_size();
        let byte_in_table = l2_index * esize;
        let slice_off = table + byte_in_table - byte_in_table % self.slice_bytes;
        EntryPos {
            slice_off,
            byte: (byte_in_table % self.slice_bytes) as usize,
            l2_index,
        }
    }

    /// Decodes the entry of the guest cluster holding `guest` from table `table` (loading the slice),
    /// validated as for reads. Returns it with the raw bitmap word (0 without extended L2).
    pub(crate) async fn entry_for_write(
        &self,
        meta: &mut Metadata,
        table: u64,
        guest: u64,
    ) -> Result<ClusterEntry> {
        let pos = self.entry_pos(table, guest);
        self.ensure_slice(meta, pos.slice_off).await?;
        let slice = meta
            .l2
            .peek(pos.slice_off)
            .map(|s| &s.data)
            .ok_or_else(|| Error::corrupt(&self.name, "internal: L2 slice not cached"))?;
        let index = pos.byte / self.geom.l2_entry_size() as usize;
        let where_ = || format!("L2 table at {table:#x}, index {}", pos.l2_index);
        let entry = cluster_entry(
            &self.name,
            slice,
            index,
            self.geom,
            self.data_file.is_some(),
            &where_,
        )?;
        let cs = self.geom.cluster_size();
        self.check_entry(&entry, guest - guest % cs, &where_)?;
        Ok(entry)
    }

    /// Sets the raw entry (and, with extended L2, the bitmap word) of the guest cluster holding
    /// `guest` in table `table`, marking the slice dirty.
    pub(crate) async fn set_entry(
        &self,
        meta: &mut Metadata,
        table: u64,
        guest: u64,
        raw: u64,
        bitmap: u64,
    ) -> Result<()> {
        let pos = self.entry_pos(table, guest);
        self.ensure_slice(meta, pos.slice_off).await?;
        let slice = meta
            .l2
            .get_mut(pos.slice_off)
            .ok_or_else(|| Error::corrupt(&self.name, "internal: L2 slice not cached"))?;
        slice.data[pos.byte..pos.byte + 8].copy_from_slice(&raw.to_be_bytes());
        if self.geom.extended_l2 {
            slice.data[pos.byte + 8..pos.byte + 16].copy_from_slice(&bitmap.to_be_bytes());
        }
        slice.dirty = true;
        Ok(())
    }
}
