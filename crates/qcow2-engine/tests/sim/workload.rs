//! Image configurations and random workloads.

use crate::model::{Mutation, MAX_ID};
use crate::rng::Rng;

/// The backing file of a configuration.
#[derive(Debug, Clone, Copy)]
pub enum Backing {
    /// A qcow2 backing image of `size` bytes and this cluster size.
    Qcow2 { size: u64, cluster: u64 },
    /// A raw backing file of `size` bytes (may be shorter than the overlay).
    Raw { size: u64 },
}

/// One image configuration of the simulation.
#[derive(Debug)]
pub struct Config {
    pub name: &'static str,
    pub cluster: u64,
    /// Virtual size of the overlay.
    pub size: u64,
    /// `-o` options of `qemu-img create` besides `cluster_size`.
    pub opts: &'static str,
    pub backing: Option<Backing>,
    /// `OpenOptions::l2_cache_bytes` (small ones force evictions of dirty slices).
    pub l2_cache: Option<u64>,
    /// The overlay starts with data in compressed clusters (made by `qemu-img convert -c`).
    pub compressed: bool,
}

impl Config {
    pub fn v2(&self) -> bool {
        self.opts.contains("compat=0.10")
    }

    pub fn extended_l2(&self) -> bool {
        self.opts.contains("extended_l2=on")
    }

    /// Subcluster size (the cluster size without extended L2).
    pub fn subcluster(&self) -> u64 {
        if self.extended_l2() {
            self.cluster / 32
        } else {
            self.cluster
        }
    }

    pub fn create_opts(&self) -> String {
        if self.opts.is_empty() {
            format!("cluster_size={}", self.cluster)
        } else {
            format!("cluster_size={},{}", self.cluster, self.opts)
        }
    }
}

const K: u64 = 1024;

pub static CONFIGS: &[Config] = &[
    Config {
        name: "c512",
        cluster: 512,
        size: 128 * K,
        opts: "",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c512-tinycache",
        cluster: 512,
        size: 128 * K,
        opts: "",
        backing: None,
        l2_cache: Some(1024),
        compressed: false,
    },
    Config {
        name: "c4k",
        cluster: 4 * K,
        size: 256 * K,
        opts: "",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c64k",
        cluster: 64 * K,
        size: 512 * K,
        opts: "",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-backing-oddsize",
        cluster: 4 * K,
        size: 256 * K + 1536,
        opts: "",
        backing: Some(Backing::Qcow2 {
            size: 256 * K + 1536,
            cluster: 64 * K,
        }),
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c512-rawbacking-short",
        cluster: 512,
        size: 128 * K,
        opts: "",
        backing: Some(Backing::Raw { size: 96 * K + 512 }),
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c64k-extl2-backing",
        cluster: 64 * K,
        size: 512 * K,
        opts: "extended_l2=on",
        backing: Some(Backing::Qcow2 {
            size: 512 * K,
            cluster: 4 * K,
        }),
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c16k-extl2",
        cluster: 16 * K,
        size: 256 * K,
        opts: "extended_l2=on",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-rc1",
        cluster: 4 * K,
        size: 256 * K,
        opts: "refcount_bits=1",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-lazy",
        cluster: 4 * K,
        size: 256 * K,
        opts: "lazy_refcounts=on",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-v2",
        cluster: 4 * K,
        size: 256 * K,
        opts: "compat=0.10",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-v2-backing",
        cluster: 4 * K,
        size: 256 * K,
        opts: "compat=0.10",
        backing: Some(Backing::Qcow2 {
            size: 256 * K,
            cluster: 4 * K,
        }),
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c32k-extl2-rc1-lazy-backing",
        cluster: 32 * K,
        size: 512 * K,
        opts: "extended_l2=on,refcount_bits=1,lazy_refcounts=on",
        backing: Some(Backing::Qcow2 {
            size: 512 * K,
            cluster: 64 * K,
        }),
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c512-v2",
        cluster: 512,
        size: 128 * K,
        opts: "compat=0.10",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-rc64",
        cluster: 4 * K,
        size: 256 * K,
        opts: "refcount_bits=64",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-prealloc-metadata",
        cluster: 4 * K,
        size: 256 * K,
        opts: "preallocation=metadata",
        backing: None,
        l2_cache: None,
        compressed: false,
    },
    Config {
        name: "c4k-compressed",
        cluster: 4 * K,
        size: 256 * K,
        opts: "",
        backing: None,
        l2_cache: None,
        compressed: true,
    },
    Config {
        name: "c64k-extl2-compressed",
        cluster: 64 * K,
        size: 512 * K,
        opts: "extended_l2=on",
        backing: None,
        l2_cache: None,
        compressed: true,
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write,
    /// A write whose future is dropped after it was polled this many times (cancellation).
    CancelledWrite {
        polls: u32,
    },
    Zero {
        unmap: bool,
    },
    Discard,
    /// `owned`: through `Image::read_owned` instead of `Image::read`.
    Read {
        owned: bool,
    },
    Flush,
    /// `Image::check(Repair::None)` of the open image, concurrent with the other requests.
    Check,
}

/// One request of a round.
#[derive(Debug, Clone)]
pub struct Req {
    pub id: u8,
    pub kind: Kind,
    pub off: u64,
    pub len: u64,
    /// Yields before the request is issued (varies the start order).
    pub start_delay: u32,
}

impl std::fmt::Display for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            Kind::Write => "write",
            Kind::CancelledWrite { .. } => "cancelled-write",
            Kind::Zero { unmap: false } => "zero",
            Kind::Zero { unmap: true } => "zero-unmap",
            Kind::Discard => "discard",
            Kind::Read { owned: false } => "read",
            Kind::Read { owned: true } => "read-owned",
            Kind::Flush => "flush",
            Kind::Check => "check",
        };
        if matches!(self.kind, Kind::Flush | Kind::Check) {
            write!(f, "#{} {what}", self.id)
        } else {
            write!(
                f,
                "#{} {what} {}+{} (=[{}, {}))",
                self.id,
                self.off,
                self.len,
                self.off,
                self.off + self.len
            )
        }
    }
}

/// The rounds of one seed: 10 to 40 requests in rounds of 2 to 12.
pub fn generate(rng: &mut Rng, cfg: &Config) -> Vec<Vec<Req>> {
    let total = rng.range(10, 40);
    let mut rounds = Vec::new();
    let mut next_id: u8 = 1;
    let mut left = total;
    while left > 0 {
        let n = rng.range(2, 12).min(left);
        left -= n;
        let c = cfg.cluster;
        let csz = cfg.size.div_ceil(c);
        // A hot window of a few clusters that many requests of the round aim at.
        let win_len = (3 * c).min(cfg.size);
        let win = rng.below(csz) * c;
        let win = win.min(cfg.size - win_len);
        let mut round = Vec::new();
        for _ in 0..n {
            let id = next_id;
            next_id += 1;
            debug_assert!(id <= MAX_ID);
            let kind = match rng.below(100) {
                0..=44 => Kind::Write,
                45..=47 => Kind::CancelledWrite {
                    polls: rng.range(1, 12) as u32,
                },
                48..=62 => Kind::Zero {
                    unmap: rng.chance(1, 2),
                },
                63..=76 => Kind::Discard,
                77..=92 => Kind::Read {
                    owned: rng.chance(1, 2),
                },
                93..=97 => Kind::Flush,
                _ => Kind::Check,
            };
            let (mut off, mut len) = shape(rng, cfg);
            if rng.chance(1, 2) {
                // Aim at the hot window, keeping the alignment of the shape.
                let align = align_of(off, len);
                let within = rng.below(win_len) / align * align;
                off = win + within;
            }
            off = off.min(cfg.size - 1);
            len = len.clamp(1, cfg.size - off);
            if matches!(kind, Kind::Flush | Kind::Check) {
                (off, len) = (0, 0);
            }
            round.push(Req {
                id,
                kind,
                off,
                len,
                start_delay: rng.below(4) as u32,
            });
        }
        rounds.push(round);
    }
    rounds
}

fn align_of(off: u64, len: u64) -> u64 {
    let a = 1u64 << (off | len).trailing_zeros().min(16);
    a.max(1)
}

/// A random request shape: cluster-aligned, subcluster-aligned, sector-aligned or unaligned.
fn shape(rng: &mut Rng, cfg: &Config) -> (u64, u64) {
    let c = cfg.cluster;
    let sc = cfg.subcluster();
    let size = cfg.size;
    match rng.below(4) {
        0 => {
            let off = rng.below(size.div_ceil(c)) * c;
            (off, rng.range(1, 3) * c)
        }
        1 => {
            let off = rng.below(size.div_ceil(sc)) * sc;
            (off, rng.range(1, 2 * c / sc + 1) * sc)
        }
        2 => {
            let off = rng.below(size / 512) * 512;
            (off, rng.range(1, 2 * c / 512 + 2) * 512)
        }
        _ => (rng.below(size), rng.range(1, 2 * c + 100)),
    }
}

/// What a request does to the disk in the model (None for reads and flushes).
///
/// QEMU's semantics: a write zeroes request reads as zeros afterwards whatever the version and
/// backing (v3: zero clusters; v2 without backing: deallocation; v2 with backing: written zeros). A
/// discard acts on whole clusters only (a partial cluster is ignored, also with extended L2, except
/// the last partial cluster of the disk when the request reaches the end); on v3 and on v2 without
/// a backing file a discarded cluster reads as zeros; on v2 with a backing file discard does
/// nothing.
pub fn mutation(req: &Req, cfg: &Config) -> Option<Mutation> {
    let (a, b) = (req.off, req.off + req.len);
    match req.kind {
        Kind::Write => Some(Mutation {
            id: req.id,
            ranges: vec![(a, b)],
            zero: false,
            optional: false,
        }),
        Kind::CancelledWrite { .. } => Some(Mutation {
            id: req.id,
            ranges: vec![(a, b)],
            zero: false,
            optional: true,
        }),
        Kind::Zero { .. } => Some(Mutation {
            id: req.id,
            ranges: vec![(a, b)],
            zero: true,
            optional: false,
        }),
        Kind::Discard => {
            if cfg.v2() && cfg.backing.is_some() {
                return None;
            }
            let c = cfg.cluster;
            let start = a.div_ceil(c) * c;
            let end = if b == cfg.size { b } else { b / c * c };
            if start >= end {
                return None;
            }
            Some(Mutation {
                id: req.id,
                ranges: vec![(start, end)],
                zero: true,
                optional: false,
            })
        }
        Kind::Read { .. } | Kind::Flush | Kind::Check => None,
    }
}
