//! Helpers of the check tests (`check_cli`, `check_damage`, `kill`): the qcow2 layout of an image read
//! straight from its bytes (header, L1 and L2 tables, refcount table and blocks) so that tests can damage
//! exactly one entry, and the counters of `qemu-img check --output=json` / `qcow2 check --output=json`.
#![allow(dead_code)]

use std::path::Path;

use serde_json::Value;

use crate::common::{self, Out, Work};

/// Where an image's tables are, as read from its header.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Cluster size in bytes.
    pub cs: u64,
    /// Extended L2 entries (16 bytes, with the sub-cluster bitmap).
    pub extended: bool,
    /// Offset of the active L1 table.
    pub l1_offset: u64,
    /// The active L1 table's raw entries.
    pub l1: Vec<u64>,
    /// Offset of the refcount table.
    pub rt_offset: u64,
    /// The refcount table's raw entries (cluster count from the header).
    pub rt: Vec<u64>,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
}

/// Mask of the host offset in L1 and L2 entries (bits 9-55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The COPIED flag (bit 63) of L1 and L2 entries.
pub const COPIED: u64 = 1 << 63;

fn be32(d: &[u8], o: u64) -> u32 {
    let o = o as usize;
    u32::from_be_bytes(d[o..o + 4].try_into().expect("4 bytes"))
}

fn be64(d: &[u8], o: u64) -> u64 {
    let o = o as usize;
    u64::from_be_bytes(d[o..o + 8].try_into().expect("8 bytes"))
}

impl Layout {
    /// Reads the layout of the qcow2 image at `path`.
    pub fn read(path: &Path) -> Layout {
        let d = std::fs::read(path).expect("read image");
        let version = be32(&d, 4);
        let cs = 1u64 << be32(&d, 20);
        let l1_size = be32(&d, 36) as u64;
        let l1_offset = be64(&d, 40);
        let rt_offset = be64(&d, 48);
        let rt_clusters = be32(&d, 56) as u64;
        let (incompat, refcount_order) = if version >= 3 {
            (be64(&d, 72), be32(&d, 96))
        } else {
            (0, 4)
        };
        let l1 = (0..l1_size).map(|i| be64(&d, l1_offset + 8 * i)).collect();
        let rt = (0..rt_clusters * cs / 8)
            .map(|i| be64(&d, rt_offset + 8 * i))
            .collect();
        Layout {
            cs,
            extended: incompat & (1 << 4) != 0,
            l1_offset,
            l1,
            rt_offset,
            rt,
            refcount_order,
        }
    }

    /// Bytes of one L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Guest clusters covered by one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cs / self.l2_entry_bytes()
    }

    /// File offset of the L2 entry of guest cluster `guest_cluster` (its L2 table must exist).
    pub fn l2_entry_offset(&self, guest_cluster: u64) -> u64 {
        let l1 = self.l1[(guest_cluster / self.l2_entries()) as usize];
        let table = l1 & OFFSET_MASK;
        assert!(table != 0, "no L2 table for guest cluster {guest_cluster}");
        table + (guest_cluster % self.l2_entries()) * self.l2_entry_bytes()
    }

    /// File offset of L1 entry `index`.
    pub fn l1_entry_offset(&self, index: u64) -> u64 {
        self.l1_offset + 8 * index
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Where the refcount of host cluster `cluster` lives: (file offset of its first byte, bit index in
    /// that byte for widths below 8). Panics when its refcount block does not exist.
    fn refcount_slot(&self, cluster: u64) -> (u64, u32) {
        let bits = self.refcount_bits();
        let per_block = self.cs * 8 / bits;
        let block = self.rt[(cluster / per_block) as usize] & OFFSET_MASK;
        assert!(block != 0, "no refcount block for cluster {cluster}");
        let bit_index = (cluster % per_block) * bits;
        (block + bit_index / 8, (bit_index % 8) as u32)
    }

    /// Reads the refcount of host cluster `cluster` from the file. Widths below 8 bits are packed from
    /// the least significant bit of each byte; wider ones are big-endian.
    pub fn refcount(&self, path: &Path, cluster: u64) -> u64 {
        let (byte, bit) = self.refcount_slot(cluster);
        let bits = self.refcount_bits();
        let d = std::fs::read(path).expect("read image");
        if bits < 8 {
            ((d[byte as usize] >> bit) as u64) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            d[byte as usize..byte as usize + n]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | *b as u64)
        }
    }

    /// Writes the refcount of host cluster `cluster` in the file.
    pub fn set_refcount(&self, path: &Path, cluster: u64, value: u64) {
        let (byte, bit) = self.refcount_slot(cluster);
        let bits = self.refcount_bits();
        if bits < 8 {
            assert!(
                value < (1 << bits),
                "refcount {value} does not fit {bits} bits"
            );
            let d = std::fs::read(path).expect("read image");
            let mask = (((1u16 << bits) - 1) as u8) << bit;
            let old = d[byte as usize];
            let new = (old & !mask) | (((value as u8) << bit) & mask);
            common::patch(path, byte, &[new]);
        } else {
            let n = (bits / 8) as usize;
            let bytes = value.to_be_bytes();
            common::patch(path, byte, &bytes[8 - n..]);
        }
    }
}

/// The counters of a check's JSON output (missing keys read as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// `corruptions`.
    pub corruptions: u64,
    /// `leaks`.
    pub leaks: u64,
    /// `check-errors`.
    pub check_errors: u64,
    /// `corruptions-fixed`.
    pub corruptions_fixed: u64,
    /// `leaks-fixed`.
    pub leaks_fixed: u64,
    /// The exit code (-1 if none).
    pub exit: i32,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} corruptions {} leaks {} check-errors {} fixed {}/{}",
            self.exit,
            self.corruptions,
            self.leaks,
            self.check_errors,
            self.corruptions_fixed,
            self.leaks_fixed
        )
    }
}

/// The exit code of a finished command (-1 when killed).
pub fn exit_code(o: &Out) -> i32 {
    o.status.and_then(|s| s.code()).unwrap_or(-1)
}

/// Parses the counters of `check --output=json` output. An output that is not JSON (the check failed
/// before printing) gives all-zero counters with the exit code.
pub fn counts(o: &Out) -> Counts {
    let exit = exit_code(o);
    let Ok(v) = serde_json::from_slice::<Value>(&o.stdout) else {
        return Counts {
            exit,
            ..Counts::default()
        };
    };
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    Counts {
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        check_errors: n("check-errors"),
        corruptions_fixed: n("corruptions-fixed"),
        leaks_fixed: n("leaks-fixed"),
        exit,
    }
}

/// `qemu-img check [extra...] --output=json IMG`.
pub fn qemu_check(w: &Work, img: &str, extra: &[&str]) -> Out {
    let mut args = vec!["check", "--output=json"];
    args.extend_from_slice(extra);
    args.push(img);
    w.qemu_img_try(&args, common::ORACLE_TIMEOUT)
}

/// `qcow2 check [extra...] --output=json IMG`.
pub fn our_check(w: &Work, img: &str, extra: &[&str]) -> Out {
    let mut args = vec!["check", "--output=json"];
    args.extend_from_slice(extra);
    args.push(img);
    w.qcow2_try(&args, &[], common::ORACLE_TIMEOUT)
}

/// Copies a file of the work directory.
pub fn copy(w: &Work, from: &str, to: &str) {
    std::fs::copy(w.p(from), w.p(to)).unwrap_or_else(|e| panic!("copy {from} -> {to}: {e}"));
}
