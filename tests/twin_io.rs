//! The acceptance twin test of the write path: seeded random qemu-io scripts (hundreds of writes, zero
//! writes, discards, flushes, checked reads and groups of concurrent `aio_write`s) run through qemu-io and
//! through `qcow2 io` on twin images made by qemu-img; `qemu-img compare` must call them identical and
//! `qemu-img check` must find no error and no leak in ours (see `common/twin.rs`).
//!
//! One test per image configuration, so that a failure names it. `QCOW2_TWIN_SEEDS=N` runs N seeds per
//! configuration, `QCOW2_TWIN_SEED=S` one given seed (the failure message prints the seed and keeps the
//! script for replay).

mod common;

use common::twin::{run_twin, seeds, TwinConfig};

const MIB: u64 = 1024 * 1024;

fn run(cfg: TwinConfig) {
    for seed in seeds(cfg.name) {
        run_twin(&cfg, seed);
    }
}

fn cfg(name: &'static str, size: u64, create_opts: &'static str) -> TwinConfig {
    TwinConfig {
        name,
        size,
        create_opts,
        backing: false,
        io_flags: &[],
        commands: 300,
        aio_percent: 8,
        env: &[],
        granularity: 512,
        aio_max_pieces: 12,
        aio_max_clusters: 3,
        sessions: 1,
    }
}

#[test]
fn cluster_512() {
    run(TwinConfig {
        commands: 200,
        ..cfg("cluster_512", 32 * MIB, "cluster_size=512")
    });
}

#[test]
fn cluster_4k_io_uring() {
    run(TwinConfig {
        io_flags: &["-i", "io_uring"],
        ..cfg("cluster_4k", 64 * MIB, "cluster_size=4096")
    });
}

#[test]
fn cluster_64k_direct() {
    run(TwinConfig {
        io_flags: &["-t", "none", "-i", "io_uring"],
        ..cfg("cluster_64k", 256 * MIB, "cluster_size=65536")
    });
}

#[test]
fn cluster_2m() {
    run(cfg("cluster_2m", 256 * MIB, "cluster_size=2097152"));
}

#[test]
fn refcount_bits_1() {
    run(TwinConfig {
        sessions: 2,
        ..cfg("refcount_1", 128 * MIB, "refcount_bits=1")
    });
}

#[test]
fn refcount_bits_64_small_clusters() {
    run(cfg(
        "refcount_64",
        64 * MIB,
        "refcount_bits=64,cluster_size=4096",
    ));
}

#[test]
fn compat_v2() {
    run(cfg("compat_0_10", 128 * MIB, "compat=0.10"));
}

#[test]
fn lazy_refcounts() {
    run(TwinConfig {
        sessions: 3,
        ..cfg("lazy_refcounts", 128 * MIB, "lazy_refcounts=on")
    });
}

#[test]
fn extended_l2() {
    run(TwinConfig {
        io_flags: &["-i", "io_uring"],
        ..cfg("extended_l2", 128 * MIB, "extended_l2=on")
    });
}

#[test]
fn backing_file() {
    run(TwinConfig {
        backing: true,
        sessions: 3,
        ..cfg("backing", 128 * MIB, "cluster_size=65536")
    });
}

#[test]
fn extended_l2_over_backing() {
    run(TwinConfig {
        backing: true,
        ..cfg(
            "extended_l2_backing",
            128 * MIB,
            "extended_l2=on,cluster_size=32768",
        )
    });
}

#[test]
fn backing_v2_small_clusters() {
    run(TwinConfig {
        backing: true,
        ..cfg("backing_v2", 64 * MIB, "compat=0.10,cluster_size=4096")
    });
}

#[test]
fn aio_groups() {
    run(TwinConfig {
        aio_percent: 60,
        commands: 400,
        ..cfg("aio", 64 * MIB, "cluster_size=65536")
    });
}

#[test]
fn aio_groups_extended_l2_io_uring() {
    run(TwinConfig {
        aio_percent: 60,
        commands: 400,
        io_flags: &["-i", "io_uring"],
        ..cfg(
            "aio_extended_l2",
            64 * MIB,
            "extended_l2=on,cluster_size=65536",
        )
    });
}

#[test]
fn aio_groups_small_clusters_backing() {
    run(TwinConfig {
        aio_percent: 60,
        commands: 400,
        backing: true,
        ..cfg("aio_backing", 32 * MIB, "cluster_size=4096")
    });
}

#[test]
fn tiny_l2_cache() {
    // One 4 KiB slice of L2 cache: every other request evicts a (often dirty) slice.
    run(TwinConfig {
        env: &[("QCOW2_L2_CACHE_SIZE", "4k")],
        aio_percent: 30,
        ..cfg("tiny_l2_cache", 128 * MIB, "cluster_size=4096")
    });
}

#[test]
fn aio_wide_groups() {
    // Up to 64 requests in flight over up to 16 fresh clusters (4 KiB clusters: many writers per
    // cluster, allocations racing for the same L2 slice and refcount block).
    run(TwinConfig {
        aio_percent: 70,
        commands: 400,
        aio_max_pieces: 64,
        aio_max_clusters: 16,
        ..cfg("aio_wide", 64 * MIB, "cluster_size=4096")
    });
}

#[test]
fn byte_granular_requests() {
    // Offsets and lengths at any byte (qemu-io allows them; the engine takes any range), with O_DIRECT
    // so that every unaligned piece goes through the engine's bounce buffers.
    run(TwinConfig {
        granularity: 1,
        io_flags: &["-t", "none", "-i", "io_uring"],
        aio_percent: 20,
        ..cfg("bytes", 16 * MIB, "cluster_size=4096")
    });
}

#[test]
fn byte_granular_extended_l2_over_backing() {
    run(TwinConfig {
        granularity: 1,
        backing: true,
        io_flags: &["-t", "none"],
        aio_percent: 20,
        ..cfg(
            "bytes_extl2_backing",
            16 * MIB,
            "extended_l2=on,cluster_size=65536",
        )
    });
}
