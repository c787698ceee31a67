//! I/O errors in the middle of requests, injected with `FaultBackend::fail_op`: EIO and ENOSPC at every
//! index of every kind of host operation a workload issues (data writes, COW, L2 and refcount writes,
//! zero ranges, hole punching, file growth, fdatasync, metadata and data reads).
//!
//! For each injection, checked:
//! - some request of the workload returns `Err` (except for hole punching, which the engine treats as
//!   advisory and only logs);
//! - every read during and after the workload returns, per 512-byte sector, either the last value written
//!   by a successful request or the value of a later failed request that covered it (never zeros or bytes
//!   of another place; sectors a failed request did not cover are untouched);
//! - later requests work: a write over the failed request's range and writes to fresh clusters read back;
//! - a failed fdatasync is sticky: every later flush fails, and so does close; otherwise flush and close
//!   succeed;
//! - our check and `qemu-img check` of the bytes as they stand (before close, metadata half written
//!   back; not with lazy refcounts, whose on-disk refcounts lag by design) and after a clean close (or,
//!   after a sticky failure, after a repairing open) find no corruption (leaks are allowed) and agree on
//!   the counts, and after close a fresh handle on those bytes reads exactly what the model allows.
//!
//! `injected_errors_with_concurrent_requests` does the same with 4 tasks on a seeded schedule, whose
//! requests share clusters (so in-flight allocations and dependency waits meet the failure): no request
//! may hang on a failed one, and the same model and checks hold.

mod common_fault;

use bytes::Bytes;
use common_fault::{
    backing_val, check_both, decode, make_backing, open_over, pattern, qemu_create, read_range, ro,
    runtime, rw, Rng, Val, SECTOR,
};
use qcow2_engine::Image;
use qcow2_io::{FaultBackend, InjectedError, OpKind};
use qcow2_testkit::{skip_without_qemu, temp_dir};

/// One image configuration.
struct Config {
    name: &'static str,
    opts: &'static str,
    cluster: u64,
    size: u64,
    /// Lazy refcounts: the on-disk refcounts may lag until a repairing open or a clean close, so the
    /// bytes are checked only after one of those.
    lazy: bool,
    /// Over a backing file (64 KiB clusters) whose sectors all carry data: COW reads from it.
    backing: bool,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "c64k",
        opts: "",
        cluster: 64 << 10,
        size: 2 << 20,
        lazy: false,
        backing: false,
    },
    Config {
        name: "c512-refcount1",
        opts: "cluster_size=512,refcount_bits=1",
        cluster: 512,
        size: 256 << 10,
        lazy: false,
        backing: false,
    },
    Config {
        name: "c64k-lazy",
        opts: "lazy_refcounts=on",
        cluster: 64 << 10,
        size: 2 << 20,
        lazy: true,
        backing: false,
    },
    Config {
        name: "c64k-backing",
        opts: "",
        cluster: 64 << 10,
        size: 2 << 20,
        lazy: false,
        backing: true,
    },
    Config {
        name: "c64k-extl2",
        opts: "extended_l2=on",
        cluster: 64 << 10,
        size: 2 << 20,
        lazy: false,
        backing: false,
    },
];

#[derive(Debug, Clone, Copy)]
enum Req {
    Write { id: u64, sector: u64, n: u64 },
    Zero { sector: u64, n: u64, unmap: bool },
    Discard { sector: u64, n: u64 },
    Read { sector: u64, n: u64 },
    Flush,
}

/// The sectors of the workload live in the first three quarters of the disk; the last quarter stays
/// untouched until the "later requests still work" step.
fn workload(cfg: &Config, seed: u64) -> Vec<Req> {
    let mut rng = Rng(seed);
    let work = cfg.size * 3 / 4 / SECTOR;
    let max_n = (2 * cfg.cluster / SECTOR).clamp(2, 128);
    let mut v = Vec::new();
    for i in 0..28u64 {
        let n = 1 + rng.below(max_n);
        let sector = rng.below(work - n);
        v.push(match rng.below(20) {
            0..=10 => Req::Write {
                id: i + 1,
                sector,
                n,
            },
            11 | 12 => Req::Zero {
                sector,
                n,
                unmap: rng.below(2) == 1,
            },
            13 | 14 => {
                // Whole clusters where the workload writes, so that clusters are freed (and punched by
                // a later flush).
                let per = cfg.cluster / SECTOR;
                let clusters = 1 + rng.below(2);
                let c = rng.below(work / per - clusters);
                Req::Discard {
                    sector: c * per,
                    n: clusters * per,
                }
            }
            15 | 16 => Req::Read { sector, n },
            _ => Req::Flush,
        });
    }
    v
}

/// Per sector, the values a read may return.
struct Model {
    allowed: Vec<Vec<Val>>,
}

impl Model {
    fn new(sectors: u64) -> Model {
        Model {
            allowed: vec![vec![Val::Zero]; sectors as usize],
        }
    }

    /// Over the backing image of [`make_backing`].
    fn over_backing(sectors: u64) -> Model {
        Model {
            allowed: (0..sectors)
                .map(|s| vec![Val::Id(backing_val(s))])
                .collect(),
        }
    }

    /// A request that succeeded sets the value; one that failed adds it as a possibility.
    fn set(&mut self, sector: u64, n: u64, v: impl Fn(u64) -> Val, ok: bool) {
        for s in sector..sector + n {
            let a = &mut self.allowed[s as usize];
            if ok {
                *a = vec![v(s)];
            } else if !a.contains(&v(s)) {
                a.push(v(s));
            }
        }
    }

    fn verify(&self, first: u64, bytes: &[u8]) -> Result<(), String> {
        for (i, chunk) in bytes.chunks(SECTOR as usize).enumerate() {
            let s = first + i as u64;
            let got = decode(chunk, s);
            if !self.allowed[s as usize].contains(&got) {
                return Err(format!(
                    "sector {s} reads {got:?}, allowed {:?}",
                    self.allowed[s as usize]
                ));
            }
        }
        Ok(())
    }
}

/// The whole clusters of a discard request, as sectors.
fn discarded(cfg: &Config, sector: u64, n: u64) -> Option<(u64, u64)> {
    let per = cfg.cluster / SECTOR;
    let a = sector.div_ceil(per) * per;
    let b = (sector + n) / per * per;
    (a < b).then(|| (a, b - a))
}

/// What one injected run observed.
struct Outcome {
    fired: bool,
    /// The engine's name for the host operation of the first failed request (`"write L2 table"`, ...).
    first_op: Option<&'static str>,
}

/// Runs the workload `wseed` with `fail_op(kind, nth, err)` (`inject`) armed and checks everything
/// listed in the module docs. `Err` describes a violation.
async fn one_run(
    cfg: &Config,
    (base, backing): (&[u8], Option<&[u8]>),
    dir: &std::path::Path,
    inject: (OpKind, u64, InjectedError),
    wseed: u64,
) -> Result<Outcome, String> {
    let (kind, nth, err) = inject;
    // Linux fdatasync semantics (a failure reported once), so that only the engine can make it sticky.
    let backend = FaultBackend::new(base.to_vec()).with_lossy_flush_failures();
    let img = open_over(backend.clone(), cfg.name, &rw(), backing)
        .await
        .map_err(|e| format!("open: {e}"))?;
    backend.fail_op(kind, nth, err);
    let sectors = cfg.size / SECTOR;
    let mut model = if backing.is_some() {
        Model::over_backing(sectors)
    } else {
        Model::new(sectors)
    };
    let mut failed: Vec<Req> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut first_op = None;
    for req in workload(cfg, wseed) {
        let res = match req {
            Req::Write { id, sector, n } => {
                let r = img
                    .write_bytes(sector * SECTOR, Bytes::from(pattern(id, sector, n)))
                    .await;
                model.set(sector, n, |_| Val::Id(id), r.is_ok());
                r
            }
            Req::Zero { sector, n, unmap } => {
                let r = img.write_zeroes(sector * SECTOR, n * SECTOR, unmap).await;
                model.set(sector, n, |_| Val::Zero, r.is_ok());
                r
            }
            Req::Discard { sector, n } => {
                let r = img.discard(sector * SECTOR, n * SECTOR).await;
                if let Some((a, m)) = discarded(cfg, sector, n) {
                    model.set(a, m, |_| Val::Zero, r.is_ok());
                }
                r
            }
            Req::Read { sector, n } => {
                let r = read_range(&img, sector * SECTOR, n * SECTOR).await;
                match r {
                    Ok(bytes) => {
                        model
                            .verify(sector, &bytes)
                            .map_err(|e| format!("read during the workload: {e}"))?;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Req::Flush => img.flush().await,
        };
        if std::env::var_os("IOERR_DEBUG").is_some() {
            eprintln!("{req:?} -> {res:?} (ops {:?})", backend.op_counts());
        }
        if let Err(e) = res {
            if let (None, qcow2_engine::Error::Io { op, .. }) = (first_op, &e) {
                first_op = Some(*op);
            }
            failed.push(req);
            errors.push(e.to_string());
        }
    }
    let fired = backend.armed_failures() == 0;
    backend.clear_failures();
    if !fired {
        if !failed.is_empty() {
            return Err(format!(
                "requests failed without an injected error: {failed:?}"
            ));
        }
        return Ok(Outcome { fired, first_op });
    }
    if failed.is_empty() && kind != OpKind::PunchHole {
        return Err("the injected error failed no request".into());
    }
    let sticky = backend.flush_failed();
    if sticky != (kind == OpKind::Flush) {
        return Err(format!("flush_failed={sticky} after a {kind:?} failure"));
    }

    // Everything reads as the model allows.
    let all = read_range(&img, 0, cfg.size)
        .await
        .map_err(|e| format!("read after the failure: {e}"))?;
    model
        .verify(0, &all)
        .map_err(|e| format!("after the workload: {e}"))?;

    // The bytes as they stand are consistent (metadata partly written back, as after a crash that keeps
    // every completed write).
    if !cfg.lazy {
        check_both(dir, "now.qcow2", &backend.contents())
            .await
            .map_err(|e| format!("before close: {e}"))?;
    }

    // Later requests work: over the first failed request's range, and on fresh clusters.
    let fresh = cfg.size * 3 / 4 / SECTOR;
    let mut again = vec![(1000, fresh, (cfg.size / SECTOR - fresh).min(64))];
    if let Some(
        Req::Write { sector, n, .. }
        | Req::Zero { sector, n, .. }
        | Req::Discard { sector, n }
        | Req::Read { sector, n },
    ) = failed.first().copied()
    {
        again.push((1001, sector, n));
    }
    for (id, sector, n) in again {
        img.write_bytes(sector * SECTOR, Bytes::from(pattern(id, sector, n)))
            .await
            .map_err(|e| format!("write after the failure: {e}"))?;
        model.set(sector, n, |_| Val::Id(id), true);
        let back = read_range(&img, sector * SECTOR, n * SECTOR)
            .await
            .map_err(|e| format!("read after the failure: {e}"))?;
        if back != pattern(id, sector, n) {
            return Err(format!(
                "write of {n} sectors at {sector} after the failure does not read back"
            ));
        }
    }

    // Flush and close: sticky after a failed fdatasync, fine otherwise.
    let flushes = [img.flush().await, img.flush().await];
    let close = img.close().await;
    if sticky {
        if flushes.iter().any(|r| r.is_ok()) || close.is_ok() {
            return Err("a flush or close succeeded after a failed fdatasync".into());
        }
        let mut bytes = backend.contents();
        if cfg.lazy {
            // The handle cannot close: repair the dirty image with a fresh read-write open.
            let again = FaultBackend::new(bytes);
            let img = open_over(again.clone(), cfg.name, &rw(), backing)
                .await
                .map_err(|e| format!("repairing open after the sticky failure: {e}"))?;
            img.close()
                .await
                .map_err(|e| format!("close after the repairing open: {e}"))?;
            bytes = again.contents();
        }
        check_both(dir, "sticky.qcow2", &bytes)
            .await
            .map_err(|e| format!("after the sticky failure: {e}"))?;
        return Ok(Outcome { fired, first_op });
    }
    for r in flushes.iter().chain([&close]) {
        r.as_ref()
            .map_err(|e| format!("flush/close after a {kind:?} failure: {e}"))?;
    }
    let bytes = backend.contents();
    check_both(dir, "closed.qcow2", &bytes)
        .await
        .map_err(|e| format!("after close: {e}"))?;
    let fresh_img = open_over(FaultBackend::new(bytes), "closed", &ro(), backing)
        .await
        .map_err(|e| format!("reopen after close: {e}"))?;
    let all = read_range(&fresh_img, 0, cfg.size)
        .await
        .map_err(|e| format!("read after reopen: {e}"))?;
    model
        .verify(0, &all)
        .map_err(|e| format!("after close and reopen: {e}"))?;
    Ok(Outcome { fired, first_op })
}

/// The workloads each configuration runs (every operation index of each is injected).
const WORKLOAD_SEEDS: [u64; 2] = [0x5eed, 7];

#[test]
fn injected_errors_fail_only_their_request() {
    skip_without_qemu!();
    let dir = temp_dir();
    let rt = runtime();
    let started = std::time::Instant::now();
    let mut injected = 0u64;
    let mut by_op: std::collections::BTreeMap<&str, u64> = Default::default();
    let kinds = [
        (
            OpKind::Write,
            &[InjectedError::Eio, InjectedError::Enospc][..],
        ),
        (
            OpKind::ZeroRange,
            &[InjectedError::Eio, InjectedError::Enospc],
        ),
        (OpKind::SetLen, &[InjectedError::Eio, InjectedError::Enospc]),
        (OpKind::PunchHole, &[InjectedError::Eio]),
        (OpKind::Flush, &[InjectedError::Eio, InjectedError::Enospc]),
        (OpKind::Read, &[InjectedError::Eio]),
    ];
    for cfg in CONFIGS {
        let backing = match cfg.backing {
            true => Some(rt.block_on(make_backing(dir.path(), cfg.size))),
            false => None,
        };
        let base = qemu_create(
            dir.path(),
            &format!("{}.qcow2", cfg.name),
            cfg.size,
            cfg.opts,
            cfg.backing.then_some("base.qcow2"),
        );
        for wseed in WORKLOAD_SEEDS {
            for &(kind, errs) in &kinds {
                for &err in errs {
                    // Every index of this kind of operation in the workload, until one is past its end.
                    let mut nth = 0;
                    loop {
                        let out = rt
                            .block_on(one_run(
                                cfg,
                                (&base, backing.as_deref()),
                                dir.path(),
                                (kind, nth, err),
                                wseed,
                            ))
                            .unwrap_or_else(|e| {
                                panic!(
                                    "config {} workload {wseed} fail_op({kind:?}, {nth}, {err:?}): {e}",
                                    cfg.name
                                )
                            });
                        if !out.fired {
                            break;
                        }
                        injected += 1;
                        *by_op
                            .entry(out.first_op.unwrap_or("(none failed)"))
                            .or_default() += 1;
                        nth += 1;
                    }
                }
            }
        }
    }
    println!(
        "io_errors: {injected} injected failures, 0 inconsistencies ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("io_errors: failed requests by the host operation that failed: {by_op:?}");
    for op in [
        "write L2 table",
        "write refcount block",
        "fdatasync",
        "write",
    ] {
        assert!(by_op.contains_key(op), "no injection hit {op:?}: {by_op:?}");
    }
    assert!(injected > 300, "too few injection points: {injected}");
}

/// A failed fdatasync poisons durability for the handle's lifetime: every later flush fails, with
/// writes in between or not, and close fails too; reads and writes keep working. Both with a sticky
/// backend and with Linux's semantics (the failure is reported once, later fdatasyncs succeed while
/// the failed one's writes are lost), where only the engine's own memory of the failure can refuse.
#[test]
fn failed_fdatasync_is_sticky() {
    skip_without_qemu!();
    let dir = temp_dir();
    let base = qemu_create(dir.path(), "s.qcow2", 1 << 20, "", None);
    for lossy in [false, true] {
        sticky_case(dir.path(), &base, lossy);
    }
}

fn sticky_case(dir: &std::path::Path, base: &[u8], lossy: bool) {
    runtime().block_on(async {
        let backend = FaultBackend::new(base.to_vec());
        let backend = if lossy {
            backend.with_lossy_flush_failures()
        } else {
            backend
        };
        let img = Image::open_backend(backend.clone(), "s", &rw())
            .await
            .unwrap();
        img.write_bytes(0, Bytes::from(pattern(1, 0, 8)))
            .await
            .unwrap();
        img.flush().await.unwrap();
        backend.fail_op(OpKind::Flush, 0, InjectedError::Eio);
        img.write_bytes(8 * SECTOR, Bytes::from(pattern(2, 8, 8)))
            .await
            .unwrap();
        assert!(img.flush().await.is_err(), "the injected fdatasync failure");
        for i in 0..5u64 {
            let s = 100 + i * 200;
            img.write_bytes(s * SECTOR, Bytes::from(pattern(3 + i, s, 4)))
                .await
                .unwrap();
            let back = read_range(&img, s * SECTOR, 4 * SECTOR).await.unwrap();
            assert_eq!(back, pattern(3 + i, s, 4));
            assert!(
                img.flush().await.is_err(),
                "flush {i} after the failure (lossy: {lossy})"
            );
        }
        assert!(
            img.close().await.is_err(),
            "close after the failure (lossy: {lossy})"
        );
        assert!(backend.flush_failed());
        check_both(dir, "s-now.qcow2", &backend.contents())
            .await
            .unwrap();
        // What the first, successful flush covered is durable.
        let durable = Image::open_backend(FaultBackend::new(backend.durable()), "d", &ro())
            .await
            .unwrap();
        let back = read_range(&durable, 0, 8 * SECTOR).await.unwrap();
        assert_eq!(back, pattern(1, 0, 8));
    });
}

/// Regression (found by the sweep above): when the L1 write of a flush fails, the flush fails, but a
/// later flush and close must still write the L1 entry (the engine once forgot the dirty chunk, and the
/// data was lost after reopen although flush and close returned Ok).
#[test]
fn failed_l1_write_in_flush_keeps_the_mapping() {
    skip_without_qemu!();
    let dir = temp_dir();
    let base = qemu_create(dir.path(), "l1.qcow2", 1 << 20, "", None);
    runtime().block_on(async {
        let mut hit = false;
        for nth in 0..16 {
            let backend = FaultBackend::new(base.clone());
            let img = Image::open_backend(backend.clone(), "l1", &rw())
                .await
                .unwrap();
            backend.fail_op(OpKind::Write, nth, InjectedError::Eio);
            if img
                .write_bytes(0, Bytes::from(pattern(1, 0, 8)))
                .await
                .is_err()
            {
                continue;
            }
            let Err(e) = img.flush().await else { continue };
            if !e.to_string().contains("write L1 table") {
                continue;
            }
            hit = true;
            img.write_bytes(8 * SECTOR, Bytes::from(pattern(2, 8, 8)))
                .await
                .unwrap();
            img.flush().await.unwrap();
            img.close().await.unwrap();
            let again = Image::open_backend(FaultBackend::new(backend.contents()), "l1", &ro())
                .await
                .unwrap();
            let back = read_range(&again, 0, 16 * SECTOR).await.unwrap();
            let mut want = pattern(1, 0, 8);
            want.extend(pattern(2, 8, 8));
            assert!(
                back == want,
                "flushed data lost after reopen (fail_op(Write, {nth}))"
            );
            break;
        }
        assert!(hit, "no injection hit the L1 write");
    });
}

/// One request of a concurrent task: a write or zero write of whole 4 KiB chunks the task owns.
#[derive(Debug, Clone, Copy)]
enum TaskReq {
    Write { id: u64, chunk: u64, n: u64 },
    Zero { chunk: u64, n: u64, unmap: bool },
    Flush,
}

/// Sectors per chunk; task `t` of `tasks` owns the chunks `c` with `c % tasks == t`, so its requests
/// share clusters (and in-flight allocations) with the other tasks' but never sectors.
const CHUNK: u64 = 8;

/// The concurrent workload: per task, requests over runs of its own chunks.
fn concurrent_workload(cfg: &Config, tasks: u64, seed: u64) -> Vec<Vec<TaskReq>> {
    let chunks = cfg.size * 3 / 4 / SECTOR / CHUNK;
    (0..tasks)
        .map(|t| {
            let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x9e37_79b9));
            (0..8u64)
                .map(|i| {
                    let chunk = t + tasks * rng.below(chunks / tasks - 4);
                    let n = 1 + rng.below(3);
                    match rng.below(10) {
                        0..=6 => TaskReq::Write {
                            id: t * 100 + i + 1,
                            chunk,
                            n,
                        },
                        7 => TaskReq::Zero {
                            chunk,
                            n,
                            unmap: rng.below(2) == 1,
                        },
                        _ => TaskReq::Flush,
                    }
                })
                .collect()
        })
        .collect()
}

/// Concurrent tasks with `fail_op(kind, nth, err)` armed, on a seeded schedule: the failure must fail
/// some request, wake every request waiting on it (no hang), and leave the image as the one-task run
/// does (model, checks, later writes, flush semantics). Returns whether the failure fired.
async fn one_concurrent_run(
    cfg: &Config,
    base: &[u8],
    dir: &std::path::Path,
    kind: OpKind,
    nth: u64,
    seed: u64,
) -> Result<bool, String> {
    const TASKS: u64 = 4;
    let backend = FaultBackend::new(base.to_vec())
        .with_schedule(seed, 4)
        .with_lossy_flush_failures();
    let img = Image::open_backend(backend.clone(), cfg.name, &rw())
        .await
        .map_err(|e| format!("open: {e}"))?;
    backend.fail_op(kind, nth, InjectedError::Eio);
    let model = std::sync::Arc::new(std::sync::Mutex::new(Model::new(cfg.size / SECTOR)));
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handles: Vec<_> = concurrent_workload(cfg, TASKS, seed)
        .into_iter()
        .map(|reqs| {
            let (img, model, failures) = (img.clone(), model.clone(), failures.clone());
            tokio::spawn(async move {
                for req in reqs {
                    let ok = match req {
                        TaskReq::Write { id, chunk, n } => {
                            // Runs of chunks stride over the other tasks' chunks: one write each.
                            let mut ok = true;
                            for c in 0..n {
                                let s = (chunk + c * TASKS) * CHUNK;
                                let r = img
                                    .write_bytes(s * SECTOR, Bytes::from(pattern(id, s, CHUNK)))
                                    .await;
                                model
                                    .lock()
                                    .unwrap()
                                    .set(s, CHUNK, |_| Val::Id(id), r.is_ok());
                                ok &= r.is_ok();
                            }
                            ok
                        }
                        TaskReq::Zero { chunk, n, unmap } => {
                            let mut ok = true;
                            for c in 0..n {
                                let s = (chunk + c * TASKS) * CHUNK;
                                let r = img.write_zeroes(s * SECTOR, CHUNK * SECTOR, unmap).await;
                                model
                                    .lock()
                                    .unwrap()
                                    .set(s, CHUNK, |_| Val::Zero, r.is_ok());
                                ok &= r.is_ok();
                            }
                            ok
                        }
                        TaskReq::Flush => img.flush().await.is_ok(),
                    };
                    if !ok {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let joined = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        for h in handles {
            h.await.expect("task");
        }
    })
    .await;
    if joined.is_err() {
        return Err("requests hang after the injected failure".into());
    }
    let fired = backend.armed_failures() == 0;
    backend.clear_failures();
    let failed = failures.load(std::sync::atomic::Ordering::Relaxed);
    if !fired {
        return if failed == 0 {
            Ok(false)
        } else {
            Err(format!(
                "{failed} requests failed without an injected error"
            ))
        };
    }
    if failed == 0 && kind != OpKind::PunchHole {
        return Err("the injected error failed no request".into());
    }
    let model = std::mem::replace(&mut *model.lock().unwrap(), Model::new(0));
    let all = read_range(&img, 0, cfg.size)
        .await
        .map_err(|e| format!("read after the failure: {e}"))?;
    model
        .verify(0, &all)
        .map_err(|e| format!("after the workload: {e}"))?;
    if !cfg.lazy {
        check_both(dir, "conc-now.qcow2", &backend.contents())
            .await
            .map_err(|e| format!("before close: {e}"))?;
    }
    let fresh = cfg.size * 3 / 4 / SECTOR;
    img.write_bytes(fresh * SECTOR, Bytes::from(pattern(999, fresh, 16)))
        .await
        .map_err(|e| format!("write after the failure: {e}"))?;
    let sticky = kind == OpKind::Flush;
    let close = img.close().await;
    if sticky != close.is_err() {
        return Err(format!("close after a {kind:?} failure: {close:?}"));
    }
    if !sticky {
        check_both(dir, "conc-closed.qcow2", &backend.contents())
            .await
            .map_err(|e| format!("after close: {e}"))?;
    }
    Ok(true)
}

#[test]
fn injected_errors_with_concurrent_requests() {
    skip_without_qemu!();
    let dir = temp_dir();
    let started = std::time::Instant::now();
    let mut injected = 0u64;
    for cfg in CONFIGS
        .iter()
        .filter(|c| c.name != "c512-refcount1" && !c.backing)
    {
        let base = qemu_create(
            dir.path(),
            &format!("conc-{}.qcow2", cfg.name),
            cfg.size,
            cfg.opts,
            None,
        );
        for seed in [1u64, 2] {
            for kind in [
                OpKind::Write,
                OpKind::ZeroRange,
                OpKind::Flush,
                OpKind::Read,
            ] {
                let mut nth = 0;
                // A fresh runtime per run, so that the schedule seed means the same interleaving.
                while runtime()
                    .block_on(one_concurrent_run(cfg, &base, dir.path(), kind, nth, seed))
                    .unwrap_or_else(|e| {
                        panic!(
                            "config {} seed {seed} fail_op({kind:?}, {nth}, Eio): {e}",
                            cfg.name
                        )
                    })
                {
                    injected += 1;
                    nth += 1;
                }
            }
        }
    }
    println!(
        "io_errors: {injected} injected failures under 4 concurrent tasks, 0 inconsistencies ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    assert!(injected > 100, "too few injection points: {injected}");
}
