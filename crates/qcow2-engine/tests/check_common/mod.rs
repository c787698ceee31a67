//! Shared by the check tests: the layout of a qcow2 file for damaging it, and `qemu-img check` as the
//! oracle.

#![allow(dead_code)]

use std::path::Path;

use qcow2_engine::{check_file, CheckReport, Repair};
use qcow2_io::StdFileBackend;
use qcow2_testkit::run;

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// The parts of a qcow2 file a damage needs.
pub struct Layout {
    pub cs: u64,
    pub l2_entry_size: u64,
    pub refcount_bits: u32,
    pub reftable: u64,
    pub l1: u64,
}

impl Layout {
    pub fn of(b: &[u8]) -> Layout {
        let ext = be32(b, 4) >= 3 && be64(b, 72) & (1 << 4) != 0;
        let refcount_order = if be32(b, 4) >= 3 { be32(b, 96) } else { 4 };
        Layout {
            cs: 1 << be32(b, 20),
            l2_entry_size: if ext { 16 } else { 8 },
            refcount_bits: 1 << refcount_order,
            reftable: be64(b, 48),
            l1: be64(b, 40),
        }
    }

    /// File offset of the L2 entry of guest cluster `g` (its L2 table must exist).
    pub fn l2_entry(&self, b: &[u8], g: u64) -> usize {
        let per = self.cs / self.l2_entry_size;
        let l2 = be64(b, (self.l1 + 8 * (g / per)) as usize) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l2, 0, "guest cluster {g} has no L2 table");
        (l2 + (g % per) * self.l2_entry_size) as usize
    }

    /// Sets the stored refcount of host cluster `c` (its block must exist).
    pub fn set_refcount(&self, b: &mut [u8], c: u64, v: u64) {
        let base = b.to_vec();
        self.set_refcount_at(&base, b, c, v);
    }

    /// As [`Layout::set_refcount`], finding the block in `base` (an undamaged copy of `b`).
    pub fn set_refcount_at(&self, base: &[u8], b: &mut [u8], c: u64, v: u64) {
        let epb = self.cs * 8 / u64::from(self.refcount_bits);
        let block = be64(base, (self.reftable + 8 * (c / epb)) as usize) as usize;
        assert_ne!(block, 0);
        let i = c % epb;
        let bits = u64::from(self.refcount_bits);
        let bit = i * bits;
        if bits >= 8 {
            let n = (bits / 8) as usize;
            let at = block + (bit / 8) as usize;
            let bytes = v.to_be_bytes();
            b[at..at + n].copy_from_slice(&bytes[8 - n..]);
        } else {
            let at = block + (bit / 8) as usize;
            let shift = bit % 8;
            let mask = ((1u16 << bits) - 1) as u8;
            b[at] = (b[at] & !(mask << shift)) | (((v as u8) & mask) << shift);
        }
    }
}

/// `qemu-img check --output=json` (and `-r` when given): exit code, JSON, stderr lines.
pub fn qemu_check(
    dir: &Path,
    img: &str,
    repair: Option<&str>,
) -> (i32, serde_json::Value, Vec<String>) {
    let mut args = vec!["check", "--output=json"];
    if let Some(r) = repair {
        args.extend(["-r", r]);
    }
    args.push(img);
    let out = run(dir, "qemu-img", &args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    // qemu-img's own closing lines ("qemu-img: Check failed") are the CLI's, not the check's.
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("qemu-img: "))
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), json, stderr)
}

pub fn field(j: &serde_json::Value, k: &str) -> u64 {
    j.get(k).and_then(|v| v.as_u64()).unwrap_or(0)
}

pub async fn ours(path: &Path, repair: Repair) -> CheckReport {
    check_file::<StdFileBackend>(path, None, repair)
        .await
        .unwrap_or_else(|e| panic!("check {}: {e}", path.display()))
}

/// Compares every counter and every stderr line of a read-only check.
pub fn assert_same(
    what: &str,
    r: &CheckReport,
    code: i32,
    j: &serde_json::Value,
    stderr: &[String],
) {
    let mine = [
        ("check-errors", r.check_errors),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("image-end-offset", r.image_end_offset),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in mine {
        assert_eq!(
            v,
            field(j, k),
            "{what}: {k}\nqemu: {j}\nours: {r:?}\nqemu stderr: {stderr:?}"
        );
    }
    assert_eq!(
        r.exit_code(),
        code,
        "{what}: exit code\nqemu: {j}\nours: {r:?}"
    );
    assert_eq!(r.messages, stderr, "{what}: stderr lines");
}
