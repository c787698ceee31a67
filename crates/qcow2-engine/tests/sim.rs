//! Deterministic simulation of concurrent random workloads on the engine, compared with a model.
//!
//! Each seed picks an image configuration (`sim/workload.rs`: cluster sizes 512 B to 64 KiB, extended
//! L2, refcount widths 1/16/64, lazy refcounts, v2, qcow2 and raw backing files, a tiny L2 cache,
//! metadata preallocation, compressed clusters) and runs 10 to 40 requests in rounds on a
//! current-thread Tokio runtime. Within a round the requests (writes of every shape, cancelled
//! writes, zero writes with and without unmap, discards, reads, flushes, checks) run concurrently as
//! separate tasks, and every backend operation yields a seeded number of times before it takes
//! effect (`FaultBackend::with_schedule`), so a seed is one reproducible interleaving of the engine's
//! allocations, dependency waits and metadata I/O. After each round the whole disk is read and
//! checked against the model (`sim/model.rs`: any serial order of the round's requests is allowed),
//! and sometimes block status is checked, the open image is checked (`Image::check`) or it is
//! reopened from its bytes. After the last round the image is flushed and closed, reopened from its
//! bytes, compared again and checked by `Image::check` (no corruption, no leak); a sample of seeds is
//! also checked by `qemu-img check` and read by `qemu-img convert`.
//!
//! Atomicity: the model requires a serial order per atomic unit (a cluster, or a subcluster with
//! extended L2), not across the whole disk. A request that spans units is served in several host
//! operations (one per host-contiguous run), and two such requests overlapping in two units can
//! legitimately win one unit each, as on any block device (QEMU gives no more); the count of rounds
//! where that happened is printed.
//!
//! Knobs (environment): `SIM_SEEDS=N` (default 5200) seeds `F..F+N` with `SIM_FIRST_SEED=F`
//! (default 0), the configuration of seed `s` being `CONFIGS[s % CONFIGS.len()]`; `SIM_SEED=S` runs only seed `S` (printing its workload);
//! `SIM_CONFIG=NAME` runs only the seeds of that configuration (with `SIM_SEED`: that seed on that
//! configuration); `SIM_QEMU_EVERY=K` (default 50) runs `qemu-img check` and `convert` on every
//! K-th seed (0: never); `SIM_TRACE=1` prints every request's start and completion; `SIM_STRICT=1`
//! requires one serial order for the whole disk (to study cross-unit splits).
//!
//! Replay a failure: `SIM_SEED=1234 SIM_CONFIG=c4k cargo test -p qcow2-engine --test sim -- --nocapture`.

#[path = "sim/images.rs"]
mod images;
#[path = "sim/model.rs"]
mod model;
#[path = "sim/rng.rs"]
mod rng;
#[path = "sim/workload.rs"]
mod workload;

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use qcow2_engine::{Image, ImageFormat, OpenOptions, Repair};
use qcow2_testkit::{path_str, qemu_img_raw, run, skip_without_qemu};

use images::{prepared, Prepared};
use model::Patterns;
use qcow2_io::FaultBackend;
use rng::Rng;
use workload::{Config, Kind, Req, CONFIGS};

/// The backend under simulation: `FaultBackend::with_schedule` makes every operation yield a seeded
/// number of times before it takes effect.
pub(crate) type B = FaultBackend;

/// Failures that reproduce a known engine bug, reported in /tmp/qcow2-plan/requests-sim.md (the lead
/// owns the engine): `(part of the config name, parts of the failure message)`, all of which must
/// match. A matching failure is counted and listed as known, not as a failure; remove the entries
/// once the bug is fixed.
const KNOWN_BUGS: &[(&str, &[&str])] = &[
    // None open. Fixed on main: BUG 1/1b/1c (fresh L2 tables left unwritten: v2 zero writes,
    // checks/flushes concurrent with the first write into a new table, cancelled writes), and the
    // lazy-refcounts leak after a crash following a flush (observation 2).
];

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// What a seed's run produced, for the determinism check and the figures.
#[derive(Debug, PartialEq, Eq, Clone, Default)]
struct Trace {
    /// FNV-1a over the completion order of every round and the final image bytes.
    hash: u64,
    requests: u64,
    rounds: u64,
    contested: u64,
    cross_unit_cycles: u64,
    /// Read-write reopens in the middle of the run.
    reopens: u64,
    /// `Image::check` runs (after rounds on the open image, and of the final image).
    checks: u64,
    /// Leaks those checks of the open image reported (deferred releases).
    open_leaks: u64,
    /// Leaks of final images of runs with a cancelled write (allowed).
    crash_leaks: u64,
    /// Block-status extents whose host bytes were compared with the guest data.
    host_extents: u64,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

fn open_opts(cfg: &Config, read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        format: Some(ImageFormat::Qcow2),
        l2_cache_bytes: cfg.l2_cache,
        ..OpenOptions::default()
    }
}

async fn open_base(p: &Prepared, sched: Option<(u64, u32)>) -> Result<Option<Image<B>>, String> {
    let Some((bytes, fmt, name)) = &p.base else {
        return Ok(None);
    };
    let mut be = B::new(bytes.clone());
    if let Some((seed, delay)) = sched {
        be = be.with_schedule(seed, delay);
    }
    let opts = OpenOptions {
        format: Some(*fmt),
        ..OpenOptions::default()
    };
    Image::open_backend(be, name, &opts)
        .await
        .map(Some)
        .map_err(|e| format!("opening the backing image: {e}"))
}

async fn open_top(
    p: &Prepared,
    be: B,
    base: Option<Image<B>>,
    read_only: bool,
) -> Result<Image<B>, String> {
    let opts = open_opts(p.cfg, read_only);
    match base {
        Some(b) => Image::open_backend_with_backing(be, "top.qcow2", &opts, b).await,
        None => Image::open_backend(be, "top.qcow2", &opts).await,
    }
    .map_err(|e| format!("opening the image: {e}"))
}

async fn read_all(img: &Image<B>, size: u64) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; size as usize];
    img.read(0, &mut v)
        .await
        .map_err(|e| format!("reading the whole disk: {e}"))?;
    Ok(v)
}

/// `SIM_TRACE=1`: print every request's start and completion.
fn trace_requests() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SIM_TRACE").is_some())
}

fn describe_round(round: &[Req]) -> String {
    round
        .iter()
        .map(|r| format!("    {r} (start delay {})", r.start_delay))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs one round's requests concurrently; returns the data of its reads and the completion order.
async fn exec_round(
    img: &Image<B>,
    round: &[Req],
) -> Result<(Vec<Option<Vec<u8>>>, Vec<u8>), String> {
    let pats = Patterns::get();
    let order = Rc::new(RefCell::new(Vec::new()));
    let mut handles = Vec::new();
    for r in round {
        let img = img.clone();
        let order = Rc::clone(&order);
        let r = r.clone();
        let data = matches!(r.kind, Kind::Write | Kind::CancelledWrite { .. })
            .then(|| Bytes::from(pats.fill(r.id, r.off, r.len as usize)));
        handles.push(tokio::task::spawn_local(async move {
            for _ in 0..r.start_delay {
                tokio::task::yield_now().await;
            }
            if trace_requests() {
                eprintln!("    start {r}");
            }
            let res = match r.kind {
                Kind::Write => img
                    .write_bytes(r.off, data.unwrap_or_default())
                    .await
                    .map(|()| None),
                Kind::CancelledWrite { polls } => {
                    // Poll the write `polls` times (yielding in between), then drop it.
                    let fut = img.write_bytes(r.off, data.unwrap_or_default());
                    let mut fut = std::pin::pin!(fut);
                    let mut res = Ok(None);
                    for _ in 0..polls {
                        if let std::task::Poll::Ready(x) = futures::poll!(fut.as_mut()) {
                            res = x.map(|()| None);
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    res
                }
                Kind::Zero { unmap } => img.write_zeroes(r.off, r.len, unmap).await.map(|()| None),
                Kind::Discard => img.discard(r.off, r.len).await.map(|()| None),
                Kind::Flush => img.flush().await.map(|()| None),
                Kind::Read { owned: false } => {
                    let mut buf = vec![0u8; r.len as usize];
                    img.read(r.off, &mut buf).await.map(|()| Some(buf))
                }
                Kind::Read { owned: true } => {
                    let mut buf = BytesMut::with_capacity(r.len as usize);
                    buf.resize(r.len as usize, 0xa5);
                    img.read_owned(r.off, buf).await.map(|b| Some(b.to_vec()))
                }
                Kind::Check => match img.check(Repair::None).await {
                    // Concurrent with the round's requests: allocations not linked yet and
                    // deferred releases are leaks; anything else is wrong.
                    Ok(rep) if rep.corruptions + rep.check_errors != 0 => {
                        Err(qcow2_engine::Error::Corrupt {
                            path: "top.qcow2".into(),
                            detail: format!(
                                "Image::check during the round: {} corruptions, {} check errors: {}",
                                rep.corruptions,
                                rep.check_errors,
                                rep.messages.join("; ")
                            ),
                        })
                    }
                    other => other.map(|_| None),
                },
            };
            if trace_requests() {
                eprintln!("    done #{}: {:?}", r.id, res.as_ref().map(|_| ()));
            }
            order.borrow_mut().push(r.id);
            res
        }));
    }
    let mut reads = Vec::new();
    let mut first_err = None;
    for (h, r) in handles.into_iter().zip(round) {
        match h.await {
            Ok(Ok(v)) => reads.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(format!("request {r} failed: {e}"));
                reads.push(None);
            }
            Err(e) => {
                first_err.get_or_insert(format!("request {r} panicked: {e}"));
                reads.push(None);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let order = order.borrow().clone();
    Ok((reads, order))
}

/// Walks `Image::block_status` over the whole disk of a quiescent image: extents that report zeros
/// must read as zeros, and data the top image holds at a host offset must be the guest data there.
/// Returns how many extents were compared with the host bytes.
async fn check_block_status(img: &Image<B>, be: &B, state: &[u8]) -> Result<u64, String> {
    let size = state.len() as u64;
    let mut compared = 0;
    let host = be.contents();
    let mut off = 0;
    while off < size {
        let st = img
            .block_status(off, size - off)
            .await
            .map_err(|e| format!("block_status({off}): {e}"))?;
        if st.len == 0 || st.len > size - off {
            return Err(format!("block_status({off}) returned length {}", st.len));
        }
        let guest = &state[off as usize..(off + st.len) as usize];
        if st.zero && guest.iter().any(|&b| b != 0) {
            return Err(format!(
                "[{off}, {}) reported as zeros ({st:?}) holds {}",
                off + st.len,
                model::describe(Patterns::get(), off, guest)
            ));
        }
        if let (0, true, false, false, Some(h)) =
            (st.depth, st.data, st.zero, st.compressed, st.offset)
        {
            let mut on_host = vec![0u8; st.len as usize];
            let h = h as usize;
            if h < host.len() {
                let n = (host.len() - h).min(on_host.len());
                on_host[..n].copy_from_slice(&host[h..h + n]);
            }
            compared += 1;
            if on_host != guest {
                let at = on_host
                    .iter()
                    .zip(guest)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "[{off}, {}) mapped to host {h:#x} ({st:?}): the host bytes differ from the \
                     guest data at +{at}",
                    off + st.len
                ));
            }
        }
        off += st.len;
    }
    Ok(compared)
}

struct SeedRun {
    trace: Trace,
    /// The final image bytes (for the qemu-img checks).
    image: Vec<u8>,
    /// The final disk contents (model).
    disk: Vec<u8>,
    /// The run cancelled a write (its allocated, never linked clusters leak): leaks are allowed.
    leaks_allowed: bool,
}

async fn seed_body(p: &Prepared, seed: u64, verbose: bool) -> Result<SeedRun, String> {
    let cfg = p.cfg;
    let pats = Patterns::get();
    let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xD1CE);
    let max_delay = [1, 2, 3, 4, 6, 8][rng.below(6) as usize];
    let rounds = workload::generate(&mut rng, cfg);
    if verbose {
        eprintln!("seed {seed} on {}: max delay {max_delay}", cfg.name);
        for (i, r) in rounds.iter().enumerate() {
            eprintln!("  round {i}:\n{}", describe_round(r));
        }
    }
    let lazy = cfg.opts.contains("lazy_refcounts=on");
    let mut leaks_allowed = false;
    let mut be = B::new(p.top.clone()).with_schedule(seed, max_delay);
    let base = open_base(p, Some((seed ^ 0xBA5E, max_delay))).await?;
    let mut img = open_top(p, be.clone(), base, false).await?;
    let mut state = read_all(&img, cfg.size).await?;
    if state != p.initial {
        let at = state
            .iter()
            .zip(&p.initial)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!(
            "the fresh image does not read as its backing data: first difference at byte {at}"
        ));
    }
    let mut trace = Trace {
        hash: 0xcbf2_9ce4_8422_2325,
        ..Trace::default()
    };
    // SIM_STRICT=1: require one serial order for the whole disk (to study cross-unit cycles).
    let unit = if std::env::var_os("SIM_STRICT").is_some() {
        cfg.size
    } else {
        cfg.subcluster()
    };
    for (ri, round) in rounds.iter().enumerate() {
        let ctx = |e: String| {
            format!(
                "round {ri}: {e}\n  the round's requests:\n{}",
                describe_round(round)
            )
        };
        let (reads, order) = exec_round(&img, round).await.map_err(ctx)?;
        fnv(&mut trace.hash, &order);
        let obs = read_all(&img, cfg.size).await.map_err(ctx)?;
        // A cancelled allocating write leaks the clusters it allocated and never linked.
        leaks_allowed |= round
            .iter()
            .any(|r| matches!(r.kind, Kind::CancelledWrite { .. }));
        let muts: Vec<_> = round
            .iter()
            .filter_map(|r| workload::mutation(r, cfg))
            .collect();
        let stats = model::check_state(pats, &state, &obs, &muts, unit)
            .map_err(|e| ctx(format!("after the round: {e}")))?;
        for (r, data) in round.iter().zip(&reads) {
            if let Some(data) = data {
                model::check_read(pats, &state, r.off, data, &muts)
                    .map_err(|e| ctx(format!("read {r}: {e}")))?;
            }
        }
        trace.requests += round.len() as u64;
        trace.rounds += 1;
        trace.contested += stats.contested;
        trace.cross_unit_cycles += u64::from(stats.cross_unit_cycle);
        state = obs;
        if rng.chance(1, 2) {
            trace.host_extents += check_block_status(&img, &be, &state)
                .await
                .map_err(|e| ctx(format!("block status after the round: {e}")))?;
        }
        if rng.chance(1, 3) {
            // Our check of the open image between rounds (it writes the metadata back first): no
            // corruption. Leaks are allowed here: releases can still be deferred.
            let report = img
                .check(Repair::None)
                .await
                .map_err(|e| ctx(format!("Image::check of the open image: {e}")))?;
            if report.corruptions + report.check_errors != 0 {
                return Err(ctx(format!(
                    "Image::check of the open image: {} corruptions, {} leaks, {} check errors:\n  {}",
                    report.corruptions,
                    report.leaks,
                    report.check_errors,
                    report.messages.join("\n  ")
                )));
            }
            trace.checks += 1;
            trace.open_leaks += report.leaks;
            if verbose {
                eprintln!("  after round {ri}: Image::check of the open image: {report:?}");
            }
        }
        if ri + 1 < rounds.len() && rng.chance(1, 5) {
            // Reopen read-write from the bytes: after a clean close, or (lazy refcounts) after a
            // flush without close, so that the open rebuilds the refcounts of the dirty image.
            // Dropping the handle without close is a crash after a flush. With lazy refcounts the
            // image is dirty whenever its refcount blocks lag (also after releases only), so the
            // reopen rebuilds them: no leak is allowed for it.
            let abandon = lazy && rng.chance(1, 2);
            if abandon {
                img.flush().await.map_err(|e| ctx(format!("flush: {e}")))?;
            } else {
                img.close().await.map_err(|e| ctx(format!("close: {e}")))?;
            }
            drop(img);
            trace.reopens += 1;
            if verbose {
                eprintln!(
                    "  after round {ri}: reopen ({})",
                    if abandon { "dirty" } else { "after close" }
                );
            }
            let bytes = be.contents();
            be = B::new(bytes).with_schedule(seed ^ ((ri as u64 + 1) << 32), max_delay);
            let base = open_base(
                p,
                Some((seed ^ 0xBA5E ^ ((ri as u64 + 1) << 40), max_delay)),
            )
            .await?;
            img = open_top(p, be.clone(), base, false).await.map_err(|e| {
                ctx(format!(
                    "reopen ({}): {e}",
                    if abandon { "dirty" } else { "after close" }
                ))
            })?;
            let again = read_all(&img, cfg.size)
                .await
                .map_err(|e| ctx(format!("after reopening: {e}")))?;
            if again != state {
                let at = again
                    .iter()
                    .zip(&state)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(ctx(format!(
                    "after reopening ({}) the disk differs at byte {at}",
                    if abandon { "dirty" } else { "after close" }
                )));
            }
        }
    }
    img.flush().await.map_err(|e| format!("final flush: {e}"))?;
    img.close().await.map_err(|e| format!("close: {e}"))?;
    drop(img);
    let image = be.contents();
    fnv(&mut trace.hash, &image);
    if verbose {
        // Keep the final image (and its backing file) for inspection with qemu-img.
        let keep = std::env::temp_dir().join(format!("sim-{}-{seed}", cfg.name));
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::write(keep.join("top.qcow2"), &image);
        if let Some((bytes, _, name)) = &p.base {
            let _ = std::fs::write(keep.join(name), bytes);
        }
        eprintln!("final image kept in {}", keep.display());
    }

    // Reopen the closed image from its bytes: the metadata written back must describe the same disk.
    let base = open_base(p, None).await?;
    let re = open_top(p, B::new(image.clone()), base, true)
        .await
        .map_err(|e| format!("after close: {e}"))?;
    let disk = read_all(&re, cfg.size).await?;
    if disk != state {
        let at = disk
            .iter()
            .zip(&state)
            .position(|(a, b)| a != b)
            .unwrap_or(0) as u64;
        let a = at / 512 * 512;
        let b = (a + 512).min(cfg.size);
        return Err(format!(
            "after close and reopen the disk differs from before close at byte {at}: \
             [{a}, {b}) holds {}, before close {}",
            model::describe(pats, a, &disk[a as usize..b as usize]),
            model::describe(pats, a, &state[a as usize..b as usize])
        ));
    }
    // Our check of the closed image, on every seed: nothing wrong, nothing leaked.
    let report = re
        .check(Repair::None)
        .await
        .map_err(|e| format!("Image::check of the final image: {e}"))?;
    let leaks = if leaks_allowed { 0 } else { report.leaks };
    trace.crash_leaks += report.leaks - leaks;
    if report.corruptions + leaks + report.check_errors != 0 {
        return Err(format!(
            "Image::check of the final image: {} corruptions, {} leaks, {} check errors:\n  {}",
            report.corruptions,
            report.leaks,
            report.check_errors,
            report.messages.join("\n  ")
        ));
    }
    trace.checks += 1;
    Ok(SeedRun {
        trace,
        image,
        disk,
        leaks_allowed,
    })
}

/// Runs one seed to the end: Ok with its trace, or Err with the first discrepancy.
fn run_seed(p: &Prepared, seed: u64, verbose: bool) -> Result<SeedRun, String> {
    let rt = rt();
    let local = tokio::task::LocalSet::new();
    let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(local.run_until(async {
            tokio::time::timeout(Duration::from_secs(60), seed_body(p, seed, verbose)).await
        }))
    }));
    match res {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err("hang: the seed did not finish within 60 s (deadlock?)".into()),
        Err(panic) => Err(format!(
            "panic: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

/// `qemu-img check` (no corruption, no leak) and `qemu-img convert` (same disk as our read) of the
/// final image of a seed.
fn qemu_checks(p: &Prepared, seed: u64, run_: &SeedRun) -> Result<(), String> {
    let d = p.dir.path();
    let name = format!("final-{seed}.qcow2");
    let path: PathBuf = d.join(&name);
    std::fs::write(&path, &run_.image).map_err(|e| format!("writing {name}: {e}"))?;
    let out = run(
        d,
        "qemu-img",
        &["check", "-f", "qcow2", "--output=json", &name],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Exit 3 is "leaks only", which a run with a cancelled write may have; the counts decide.
    let res = if !(out.status.success() || run_.leaks_allowed && out.status.code() == Some(3)) {
        Err(format!(
            "qemu-img check of the final image failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    } else {
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("qemu-img check JSON: {e}"))?;
        let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        let leaks = if run_.leaks_allowed { 0 } else { n("leaks") };
        if n("corruptions") + leaks + n("check-errors") != 0 {
            Err(format!("qemu-img check of the final image: {text}"))
        } else {
            let raw = qemu_img_raw(d, path_str(&path), Some("qcow2"));
            if raw != run_.disk {
                let at = raw.iter().zip(&run_.disk).position(|(a, b)| a != b);
                Err(format!(
                    "qemu-img convert reads the final image differently (first difference at \
                     {at:?}, lengths {} and {})",
                    raw.len(),
                    run_.disk.len()
                ))
            } else {
                Ok(())
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    res
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn config_index(name: &str) -> usize {
    CONFIGS
        .iter()
        .position(|c| c.name == name)
        .unwrap_or_else(|| {
            panic!(
                "SIM_CONFIG={name}: no such configuration (have: {})",
                CONFIGS
                    .iter()
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

#[test]
fn simulation() {
    skip_without_qemu!();
    let only_config = std::env::var("SIM_CONFIG").ok().map(|n| config_index(&n));
    let only_seed = env_u64("SIM_SEED");
    let seeds = env_u64("SIM_SEEDS").unwrap_or(5200);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(0);
    let qemu_every = env_u64("SIM_QEMU_EVERY").unwrap_or(50);
    let list: Vec<(usize, u64)> = match (only_seed, only_config) {
        (Some(s), Some(c)) => vec![(c, s)],
        (Some(s), None) => vec![(s as usize % CONFIGS.len(), s)],
        (None, c) => (first..first + seeds)
            .map(|s| (s as usize % CONFIGS.len(), s))
            .filter(|&(i, _)| c.is_none_or(|c| c == i))
            .collect(),
    };
    let verbose = only_seed.is_some();
    let start = Instant::now();
    let mut failures = Vec::new();
    let (mut ran, mut excluded, mut qemu_checked) = (0u64, 0u64, 0u64);
    let mut total = Trace::default();
    let mut per_config = vec![0u64; CONFIGS.len()];
    for (ci, seed) in list {
        let p = prepared(ci);
        ran += 1;
        per_config[ci] += 1;
        let res = run_seed(p, seed, verbose).and_then(|r| {
            if verbose || (qemu_every > 0 && seed % qemu_every == 0) {
                qemu_checked += 1;
                qemu_checks(p, seed, &r)?;
            }
            Ok(r)
        });
        match res {
            Ok(r) => {
                total.requests += r.trace.requests;
                total.rounds += r.trace.rounds;
                total.contested += r.trace.contested;
                total.cross_unit_cycles += r.trace.cross_unit_cycles;
                total.reopens += r.trace.reopens;
                total.checks += r.trace.checks;
                total.open_leaks += r.trace.open_leaks;
                total.crash_leaks += r.trace.crash_leaks;
                total.host_extents += r.trace.host_extents;
            }
            Err(e)
                if only_seed.is_none()
                    && KNOWN_BUGS.iter().any(|(c, sig)| {
                        p.cfg.name.contains(c) && sig.iter().all(|x| e.contains(x))
                    }) =>
            {
                eprintln!(
                    "sim: known bug (see requests-sim.md): config {} seed {seed}",
                    p.cfg.name
                );
                excluded += 1;
            }
            Err(e) => {
                eprintln!(
                    "sim FAILED: config {} seed {seed}: {e}\n  replay: SIM_SEED={seed} SIM_CONFIG={} \
                     cargo test -p qcow2-engine --test sim -- --nocapture",
                    p.cfg.name, p.cfg.name
                );
                failures.push((p.cfg.name, seed));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sim: {ran} seeds, {} failures ({excluded} known-bug failures), {} requests in {} \
         rounds, {} contested pieces, {} rounds with a cross-unit order cycle, {} reopens, \
         {} Image::check runs ({} leaks on open images, {} after cancelled writes), {} block-status extents compared with the host, {qemu_checked} checked by qemu-img, \
         {secs:.1} s",
        failures.len(),
        total.requests,
        total.rounds,
        total.contested,
        total.cross_unit_cycles,
        total.reopens,
        total.checks,
        total.open_leaks,
        total.crash_leaks,
        total.host_extents
    );
    for (i, c) in CONFIGS.iter().enumerate() {
        if per_config[i] > 0 {
            println!("  {}: {} seeds", c.name, per_config[i]);
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed: {failures:?}",
        failures.len()
    );
    if only_seed.is_none() && only_config.is_none() && env_u64("SIM_SEEDS").is_none() {
        assert!(ran >= 5000, "only {ran} seeds ran");
    }
}

/// The same seed replays exactly: same completion order in every round, same final image bytes.
/// Different seeds explore different interleavings.
#[test]
fn replay_is_deterministic() {
    skip_without_qemu!();
    let mut hashes = Vec::new();
    for seed in [3u64, 17, 40, 1001] {
        let ci = seed as usize % CONFIGS.len();
        let p = prepared(ci);
        let a = run_seed(p, seed, false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let b = run_seed(p, seed, false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(
            a.trace, b.trace,
            "seed {seed} on {} replayed differently",
            p.cfg.name
        );
        assert_eq!(a.image, b.image, "seed {seed}: final image bytes differ");
        hashes.push(a.trace.hash);
    }
    // One workload under different schedules: the completion orders must not all be the same.
    let p = prepared(2);
    let traces: Vec<u64> = (0..6u64)
        .map(|k| run_seed_with_schedule(p, 2, k).unwrap_or_else(|e| panic!("schedule {k}: {e}")))
        .collect();
    assert!(
        traces.iter().any(|&t| t != traces[0]),
        "six schedules of one workload gave one interleaving: the schedule has no effect"
    );
    println!("sim determinism: 4 seeds replayed identically, {hashes:x?}");
}

/// The completion-order hash of seed `seed`'s workload run under schedule seed `sched`.
fn run_seed_with_schedule(p: &Prepared, seed: u64, sched: u64) -> Result<u64, String> {
    let rt = rt();
    let local = tokio::task::LocalSet::new();
    rt.block_on(local.run_until(async {
        let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xD1CE);
        let _ = rng.below(6);
        let rounds = workload::generate(&mut rng, p.cfg);
        let be = B::new(p.top.clone()).with_schedule(sched.wrapping_mul(7919) + 1, 4);
        let img = open_top(p, be, None, false).await?;
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for round in &rounds {
            let (_, order) = exec_round(&img, round).await?;
            fnv(&mut h, &order);
        }
        Ok(h)
    }))
}
