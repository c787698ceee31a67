//! Concurrent allocating writes (issue 3, acceptance "Concurrency").
//!
//! Proves that many tasks writing into the same fresh clusters at once, released together by a barrier,
//! all land and that the engine allocates exactly one host cluster per guest cluster: 128 writes of 4 KiB
//! with distinct data into 8 fresh 64 KiB clusters of an image qemu-img made (16 writers per cluster),
//! on the multi-threaded Tokio runtime with the std-file backend and on the current-thread tokio-uring
//! runtime with the io_uring backend. After `close()` the content read back by our engine and by
//! `qemu-img convert -O raw` equals the model; `qemu-img map` shows exactly the 8 guest clusters as data,
//! each one whole 64 KiB extent at its own host offset; `qemu-img check` is clean, counts 8 allocated
//! clusters and the file grew by at most the 8 data clusters and one L2 table.
//!
//! Variants: half of every cluster written over a backing file, over clusters shared with an internal
//! snapshot and over compressed clusters (the other half must be copied from the old content by whichever
//! request allocates, without clobbering what the others wrote; the snapshot must still read as before),
//! and extended
//! L2 (32 sub-clusters of 2 KiB: every 4 KiB writer allocates two sub-clusters of a shared cluster).
//!
//! A second shape stresses metadata allocation under concurrency: 1024 writers of 8 KiB at once into an
//! image with 512-byte clusters, each into its own L2 table's range, so that L2 tables, refcount blocks
//! and a larger refcount table (the first one covers 8 MiB of host file) are all allocated while writes
//! are in flight; content and a clean check with the exact allocated-cluster count prove it. A third
//! makes writers overlap (whole-cluster and 4 KiB writes into the same bytes): every sector must hold
//! one covering request's data, never zeros or stale COW data, with one host cluster per guest cluster.
//! A fourth races discards against in-place writes of the same clusters while fresh clusters are
//! allocated: a freed host cluster must not receive a late in-place write after being reused. A fifth
//! keeps readers reading the never-written half of clusters being copied-on-write (from a backing file,
//! a snapshot, compressed data) while the writers run: they must always see the old content.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::write::{
    assert_check_clean, assert_same, check_count, data_bytes, multi_thread_runtime, qemu_raw,
    read_all, run_uring, rw_options, uring_or_skip, Model, KIB, MIB,
};
use common::Work;
use qcow2::engine::Image;
use qcow2::io::{Backend, StdFileBackend, UringBackend};
use serde_json::Value;
use tokio::sync::Barrier;

const CLUSTER: u64 = 64 * KIB;
const SIZE: u64 = 2 * MIB;
/// The guest clusters written: not adjacent, so that each is its own extent in `qemu-img map`.
const GUEST_CLUSTERS: [u64; 8] = [1, 3, 6, 9, 12, 17, 22, 30];
const WRITE: u64 = 4 * KIB;
const SLOTS: u64 = CLUSTER / WRITE;

/// One way to set up the image and choose the writes.
struct Scenario {
    /// `-o` options of the image.
    options: &'static str,
    /// What the 8 clusters hold before the writes.
    base: Base,
    /// Write only the even 4 KiB slots of each cluster (the odd ones keep the backing data).
    even_slots_only: bool,
}

/// The state of the image before the concurrent writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Base {
    /// Fresh: nothing allocated.
    Empty,
    /// Nothing allocated, over a raw backing file with non-zero data everywhere.
    Backing,
    /// The 8 clusters hold data shared with an internal snapshot (COPIED clear in L1 and L2).
    Snapshot,
    /// The 8 clusters are compressed (`qemu-img convert -c`).
    Compressed,
}

/// One writer: `data` at guest `offset`.
struct Job {
    offset: u64,
    data: Bytes,
}

/// The writes of `s`, interleaved so that consecutive tasks hit different clusters and the slots of one
/// cluster are not started in address order.
fn jobs(s: &Scenario) -> Vec<Job> {
    let mut v = Vec::new();
    for i in 0..(GUEST_CLUSTERS.len() as u64 * SLOTS) {
        let c = GUEST_CLUSTERS[(i % 8) as usize];
        let slot = ((i / 8) * 7 + i % 8) % SLOTS;
        if s.even_slots_only && slot % 2 == 1 {
            continue;
        }
        let offset = c * CLUSTER + slot * WRITE;
        v.push(Job {
            offset,
            data: Bytes::from(data_bytes(1000 + i, WRITE as usize)),
        });
    }
    v
}

/// Creates `img.qcow2` (and the backing file) and returns the model of its initial content.
fn setup(w: &Work, s: &Scenario) -> Model {
    let size = SIZE.to_string();
    let mut initial = vec![0u8; SIZE as usize];
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", s.options];
    if s.base == Base::Backing {
        initial = data_bytes(7, SIZE as usize);
        w.write_file("base.raw", &initial);
        args.extend(["-b", "base.raw", "-F", "raw"]);
    }
    let target = if s.base == Base::Compressed {
        "src.qcow2"
    } else {
        "img.qcow2"
    };
    args.extend([target, &size]);
    w.qemu_img(&args);
    if matches!(s.base, Base::Snapshot | Base::Compressed) {
        let cmds: Vec<String> = GUEST_CLUSTERS
            .iter()
            .enumerate()
            .map(|(k, c)| format!("write -P {} {} {CLUSTER}", 0x40 + k, c * CLUSTER))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        w.qemu_io(&["-f", "qcow2"], target, &cmds);
        for (k, c) in GUEST_CLUSTERS.iter().enumerate() {
            let o = (c * CLUSTER) as usize;
            initial[o..o + CLUSTER as usize].fill(0x40 + k as u8);
        }
    }
    match s.base {
        Base::Snapshot => {
            w.qemu_img(&["snapshot", "-c", "snap1", "img.qcow2"]);
        }
        Base::Compressed => {
            w.qemu_img(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                s.options,
                "src.qcow2",
                "img.qcow2",
            ]);
            let map = common::parse_json(&w.qemu_img(&["map", "--output=json", "img.qcow2"]));
            let compressed = map
                .as_array()
                .expect("map is an array")
                .iter()
                .filter(|e| e["compressed"] == true)
                .count();
            assert_eq!(
                compressed, 8,
                "setup: expected 8 compressed clusters: {map}"
            );
        }
        Base::Empty | Base::Backing => {}
    }
    Model::new(initial, CLUSTER)
}

/// One write task: waits for all the others, then writes (half of them through the slice API, half
/// through the owned-buffer API).
async fn write_job<B: Backend>(
    img: Image<B>,
    barrier: Arc<Barrier>,
    index: usize,
    offset: u64,
    data: Bytes,
) -> Result<(), String> {
    barrier.wait().await;
    let len = data.len();
    let r = if index.is_multiple_of(2) {
        img.write_bytes(offset, data).await
    } else {
        img.write(offset, &data).await
    };
    r.map_err(|e| format!("write of {len} bytes at {offset}: {e}"))
}

/// After the writes: what our engine reads, before and after `close()`.
struct Outcome {
    before_close: Vec<u8>,
    after_close: Vec<u8>,
}

/// The tasks of one run, as the runtime's join handles.
type Tasks = Vec<tokio::task::JoinHandle<Result<(), String>>>;

/// Reads the whole disk, closes, reads again.
async fn finish<B: Backend>(img: &Image<B>) -> Outcome {
    let before_close = read_all(img).await;
    img.close().await.expect("close");
    let after_close = read_all(img).await;
    Outcome {
        before_close,
        after_close,
    }
}

/// Awaits the tasks; panics listing the failed requests.
async fn join(tasks: Tasks) {
    let mut errors = Vec::new();
    for h in tasks {
        if let Err(e) = h.await.expect("task panicked") {
            errors.push(e);
        }
    }
    assert!(errors.is_empty(), "requests failed: {errors:#?}");
}

/// Opens `img.qcow2` read-write with the std backend on the multi-threaded runtime, runs the tasks
/// `spawn` starts (with `tokio::spawn`), then [`finish`]es.
fn std_run(w: &Work, spawn: impl FnOnce(Image<StdFileBackend>) -> Tasks) -> Outcome {
    let path = w.p("img.qcow2");
    multi_thread_runtime().block_on(async move {
        let img = Image::<StdFileBackend>::open(&path, &rw_options())
            .await
            .expect("open read-write");
        join(spawn(img.clone())).await;
        finish(&img).await
    })
}

/// As [`std_run`] with the io_uring backend on the current-thread tokio-uring runtime (tasks started
/// with `spawn_local`).
fn uring_run(w: &Work, spawn: impl FnOnce(Image<UringBackend>) -> Tasks) -> Outcome {
    let path = w.p("img.qcow2");
    run_uring(async move {
        let img = Image::<UringBackend>::open(&path, &rw_options())
            .await
            .expect("open read-write with io_uring");
        join(spawn(img.clone())).await;
        finish(&img).await
    })
}

/// The write tasks of `jobs`, started by `spawn` (the runtime's spawn function).
macro_rules! write_tasks {
    ($img:expr, $jobs:expr, $spawn:path) => {{
        let barrier = Arc::new(Barrier::new($jobs.len()));
        $jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                $spawn(write_job(
                    $img.clone(),
                    Arc::clone(&barrier),
                    i,
                    j.offset,
                    j.data.clone(),
                ))
            })
            .collect::<Tasks>()
    }};
}

/// Runs the jobs on the multi-threaded runtime with the std backend, one spawned task each.
fn run_std(w: &Work, jobs: &[Job]) -> Outcome {
    std_run(w, |img| write_tasks!(img, jobs, tokio::spawn))
}

/// Runs the jobs on the current-thread tokio-uring runtime with the io_uring backend.
fn run_on_uring(w: &Work, jobs: &[Job]) -> Outcome {
    uring_run(w, |img| write_tasks!(img, jobs, tokio::task::spawn_local))
}

/// The data extents of this image (depth 0) in `qemu-img map --output=json`.
fn top_data_extents(w: &Work) -> Vec<Value> {
    let o = w.qemu_img(&["map", "--output=json", "img.qcow2"]);
    let v = common::parse_json(&o);
    v.as_array()
        .expect("map output is an array")
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .cloned()
        .collect()
}

/// Runs scenario `s` with `runner` and checks everything the acceptance item asks.
fn scenario(s: Scenario, runner: fn(&Work, &[Job]) -> Outcome) {
    let w = Work::new();
    let mut model = setup(&w, &s);
    let initial = model.data.clone();
    let end_before = check_count(&assert_check_clean(&w, "img.qcow2"), "image-end-offset");
    assert!(end_before > 0, "qemu-img check reports no image-end-offset");
    let jobs = jobs(&s);
    for j in &jobs {
        model.write(j.offset, &j.data);
    }

    let out = runner(&w, &jobs);
    assert_same(&out.before_close, &model.data, "our read before close");
    assert_same(&out.after_close, &model.data, "our read after close");
    assert_same(
        &qemu_raw(&w, "img.qcow2"),
        &model.data,
        "qemu-img convert -O raw",
    );

    // Exactly one host cluster per guest cluster: 8 whole-cluster data extents at distinct host offsets.
    let extents = top_data_extents(&w);
    let starts: Vec<u64> = extents.iter().filter_map(|e| e["start"].as_u64()).collect();
    let want: Vec<u64> = GUEST_CLUSTERS.iter().map(|c| c * CLUSTER).collect();
    assert_eq!(
        starts, want,
        "guest clusters holding data in this image: {extents:#?}"
    );
    let mut hosts = Vec::new();
    for e in &extents {
        assert_eq!(e["length"], CLUSTER, "extent is not one whole cluster: {e}");
        let off = e["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("data extent without a host offset: {e}"));
        assert_eq!(off % CLUSTER, 0, "host offset not cluster-aligned: {e}");
        hosts.push(off);
    }
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(
        hosts.len(),
        GUEST_CLUSTERS.len(),
        "guest clusters share host clusters: {extents:#?}"
    );

    let check = assert_check_clean(&w, "img.qcow2");
    assert_eq!(
        check_count(&check, "allocated-clusters"),
        GUEST_CLUSTERS.len() as u64,
        "allocated clusters: {check}"
    );
    let end_after = check_count(&check, "image-end-offset");
    assert!(
        end_after <= end_before + (GUEST_CLUSTERS.len() as u64 + 1) * CLUSTER,
        "the file grew from {end_before:#x} to {end_after:#x}: more than 8 data clusters and one L2 \
         table were allocated (check: {check})"
    );

    if s.base == Base::Snapshot {
        // The snapshot still holds the content from before the writes.
        std::fs::copy(w.p("img.qcow2"), w.p("reverted.qcow2")).expect("copy");
        w.qemu_img(&["snapshot", "-a", "snap1", "reverted.qcow2"]);
        assert_same(
            &qemu_raw(&w, "reverted.qcow2"),
            &initial,
            "snapshot snap1 after the concurrent writes",
        );
    }
}

fn plain() -> Scenario {
    Scenario {
        options: "cluster_size=64k",
        base: Base::Empty,
        even_slots_only: false,
    }
}

fn extended_l2() -> Scenario {
    Scenario {
        options: "cluster_size=64k,extended_l2=on",
        base: Base::Empty,
        even_slots_only: false,
    }
}

#[test]
fn concurrent_writes_fresh_clusters_std_multi_thread() {
    scenario(plain(), run_std);
}

#[test]
fn concurrent_writes_fresh_clusters_uring_current_thread() {
    if uring_or_skip("concurrent_writes_fresh_clusters_uring_current_thread") {
        scenario(plain(), run_on_uring);
    }
}

#[test]
fn concurrent_partial_writes_over_backing_std_multi_thread() {
    scenario(half_over(Base::Backing), run_std);
}

#[test]
fn concurrent_partial_writes_over_backing_uring_current_thread() {
    if uring_or_skip("concurrent_partial_writes_over_backing_uring_current_thread") {
        scenario(half_over(Base::Backing), run_on_uring);
    }
}

#[test]
fn concurrent_writes_extended_l2_std_multi_thread() {
    scenario(extended_l2(), run_std);
}

#[test]
fn concurrent_writes_extended_l2_uring_current_thread() {
    if uring_or_skip("concurrent_writes_extended_l2_uring_current_thread") {
        scenario(extended_l2(), run_on_uring);
    }
}

/// 1024 writers of 8 KiB, one per 64 KiB of a 64 MiB disk with 512-byte clusters (an L2 table maps
/// 32 KiB there, a refcount block 128 KiB of host file, the first refcount table 8 MiB).
fn metadata_growth(runner: fn(&Work, &[Job]) -> Outcome) {
    const SMALL_SIZE: u64 = 64 * MIB;
    const WRITERS: u64 = 1024;
    const LEN: u64 = 8 * KIB;
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "img.qcow2",
        &SMALL_SIZE.to_string(),
    ]);
    let mut model = Model::new(vec![0u8; SMALL_SIZE as usize], 512);
    let stride = SMALL_SIZE / WRITERS;
    let jobs: Vec<Job> = (0..WRITERS)
        .map(|i| {
            // Interleave the order so neighbouring ranges are not issued together; vary the offset
            // inside the stride so writes are not all aligned to the L2 ranges.
            let slot = (i * 389) % WRITERS;
            let offset = slot * stride + (i % 7) * 4 * KIB;
            Job {
                offset,
                data: Bytes::from(data_bytes(50_000 + i, LEN as usize)),
            }
        })
        .collect();
    for j in &jobs {
        model.write(j.offset, &j.data);
    }
    let out = runner(&w, &jobs);
    assert_same(&out.before_close, &model.data, "our read before close");
    assert_same(&out.after_close, &model.data, "our read after close");
    assert_same(
        &qemu_raw(&w, "img.qcow2"),
        &model.data,
        "qemu-img convert -O raw",
    );
    let check = assert_check_clean(&w, "img.qcow2");
    // Each 8 KiB write at a 4 KiB-aligned offset covers exactly 16 clusters of 512 bytes.
    assert_eq!(
        check_count(&check, "allocated-clusters"),
        WRITERS * LEN / 512,
        "allocated clusters: {check}"
    );
}

#[test]
fn concurrent_allocations_grow_metadata_std_multi_thread() {
    metadata_growth(run_std);
}

#[test]
fn concurrent_allocations_grow_metadata_uring_current_thread() {
    if uring_or_skip("concurrent_allocations_grow_metadata_uring_current_thread") {
        metadata_growth(run_on_uring);
    }
}

fn half_over(base: Base) -> Scenario {
    Scenario {
        options: "cluster_size=64k",
        base,
        even_slots_only: true,
    }
}

#[test]
fn concurrent_partial_writes_into_snapshot_clusters_std_multi_thread() {
    scenario(half_over(Base::Snapshot), run_std);
}

#[test]
fn concurrent_partial_writes_into_snapshot_clusters_uring_current_thread() {
    if uring_or_skip("concurrent_partial_writes_into_snapshot_clusters_uring_current_thread") {
        scenario(half_over(Base::Snapshot), run_on_uring);
    }
}

#[test]
fn concurrent_partial_writes_into_compressed_clusters_std_multi_thread() {
    scenario(half_over(Base::Compressed), run_std);
}

#[test]
fn concurrent_partial_writes_into_compressed_clusters_uring_current_thread() {
    if uring_or_skip("concurrent_partial_writes_into_compressed_clusters_uring_current_thread") {
        scenario(half_over(Base::Compressed), run_on_uring);
    }
}

/// Overlapping writers: in each of the 8 fresh clusters, 8 tasks write the whole cluster and 8 write
/// one 4 KiB slot, all at once. Whatever the order, every 512-byte sector must end up holding the data
/// of one of the requests that covered it (never zeros, never a mix of a COW and a write), the content
/// must be the same through our reads before and after close and through qemu-img, and still exactly one
/// host cluster per guest cluster is allocated.
fn overlapping(runner: fn(&Work, &[Job]) -> Outcome) {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        "img.qcow2",
        &SIZE.to_string(),
    ]);
    let mut jobs = Vec::new();
    for i in 0..128u64 {
        let c = GUEST_CLUSTERS[(i % 8) as usize];
        let (offset, len) = if (i / 8) % 2 == 0 {
            (c * CLUSTER, CLUSTER)
        } else {
            (c * CLUSTER + ((i * 5) % SLOTS) * WRITE, WRITE)
        };
        jobs.push(Job {
            offset,
            data: Bytes::from(data_bytes(9000 + i, len as usize)),
        });
    }
    let out = runner(&w, &jobs);
    assert_same(
        &out.after_close,
        &out.before_close,
        "our read after close vs before",
    );
    assert_same(
        &qemu_raw(&w, "img.qcow2"),
        &out.after_close,
        "qemu-img convert -O raw vs our read",
    );
    let got = &out.after_close;
    for &c in &GUEST_CLUSTERS {
        for sector in 0..CLUSTER / 512 {
            let at = c * CLUSTER + sector * 512;
            let s = &got[at as usize..(at + 512) as usize];
            let from_some_writer = jobs.iter().any(|j| {
                j.offset <= at
                    && at + 512 <= j.offset + j.data.len() as u64
                    && j.data[(at - j.offset) as usize..(at - j.offset + 512) as usize] == *s
            });
            assert!(
                from_some_writer,
                "sector at guest offset {at:#x} holds data no request wrote there (first bytes {:02x?})",
                &s[..8]
            );
        }
    }
    let check = assert_check_clean(&w, "img.qcow2");
    assert_eq!(
        check_count(&check, "allocated-clusters"),
        GUEST_CLUSTERS.len() as u64,
        "allocated clusters: {check}"
    );
    let extents = top_data_extents(&w);
    let mut hosts: Vec<u64> = extents
        .iter()
        .filter_map(|e| e["offset"].as_u64())
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(
        hosts.len(),
        GUEST_CLUSTERS.len(),
        "host clusters: {extents:#?}"
    );
}

#[test]
fn overlapping_concurrent_writes_std_multi_thread() {
    overlapping(run_std);
}

#[test]
fn overlapping_concurrent_writes_uring_current_thread() {
    if uring_or_skip("overlapping_concurrent_writes_uring_current_thread") {
        overlapping(run_on_uring);
    }
}

/// Discards racing in-place writes while other requests allocate: a host cluster freed by a discard must
/// not be reused while a fast-path write into it is still running (DESIGN.md: QEMU still has this race),
/// or that late write lands in another guest cluster's new data. Clusters 0..16 hold data; at once, each
/// is rewritten whole (fast path) and discarded, and 16 fresh clusters are written whole. Afterwards every
/// fresh cluster holds exactly its data, every raced cluster reads either all zeros (discard last) or
/// all the rewrite's data, and the image is clean. Repeated on fresh images to give the race chances.
fn discard_race(discard_runner: fn(&Work, &[Race]) -> Outcome) {
    for round in 0..6u64 {
        let w = Work::new();
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "img.qcow2",
            &(4 * MIB).to_string(),
        ]);
        w.qemu_io(&["-f", "qcow2"], "img.qcow2", &["write -P 0x5e 0 1M"]);
        let mut races = Vec::new();
        for k in 0..16u64 {
            races.push(Race::Write(Job {
                offset: k * CLUSTER,
                data: Bytes::from(data_bytes(round * 1000 + k, CLUSTER as usize)),
            }));
            races.push(Race::Discard(k * CLUSTER));
            races.push(Race::Write(Job {
                offset: (32 + k) * CLUSTER,
                data: Bytes::from(data_bytes(round * 1000 + 500 + k, CLUSTER as usize)),
            }));
        }
        let out = discard_runner(&w, &races);
        assert_same(
            &qemu_raw(&w, "img.qcow2"),
            &out.after_close,
            "qemu-img convert -O raw vs our read",
        );
        assert_same(
            &out.after_close,
            &out.before_close,
            "our read after close vs before",
        );
        let got = &out.after_close;
        for r in &races {
            let Race::Write(j) = r else { continue };
            let c = &got[j.offset as usize..(j.offset + CLUSTER) as usize];
            if j.offset >= 32 * CLUSTER {
                assert!(
                    c == &j.data[..],
                    "round {round}: fresh cluster at {:#x} does not hold its data: {:?}",
                    j.offset,
                    common::write::first_diff(c, &j.data)
                );
            } else {
                assert!(
                    c == &j.data[..] || c.iter().all(|&b| b == 0),
                    "round {round}: raced cluster at {:#x} is neither zeros nor the rewrite",
                    j.offset
                );
            }
        }
        assert_check_clean(&w, "img.qcow2");
    }
}

/// A request of the discard race.
enum Race {
    Write(Job),
    Discard(u64),
}

/// One race task: waits for all, then writes or discards one cluster.
async fn race_job<B: Backend>(
    img: Image<B>,
    barrier: Arc<Barrier>,
    offset: u64,
    data: Option<Bytes>,
) -> Result<(), String> {
    barrier.wait().await;
    match data {
        Some(d) => img
            .write_bytes(offset, d)
            .await
            .map_err(|e| format!("write at {offset}: {e}")),
        None => img
            .discard(offset, CLUSTER)
            .await
            .map_err(|e| format!("discard at {offset}: {e}")),
    }
}

fn race_args(r: &Race) -> (u64, Option<Bytes>) {
    match r {
        Race::Write(j) => (j.offset, Some(j.data.clone())),
        Race::Discard(off) => (*off, None),
    }
}

/// The tasks of the discard race, started by `spawn`.
macro_rules! race_tasks {
    ($img:expr, $races:expr, $spawn:path) => {{
        let barrier = Arc::new(Barrier::new($races.len()));
        $races
            .iter()
            .map(|r| {
                let (off, data) = race_args(r);
                $spawn(race_job($img.clone(), Arc::clone(&barrier), off, data))
            })
            .collect::<Tasks>()
    }};
}

fn race_std(w: &Work, races: &[Race]) -> Outcome {
    std_run(w, |img| race_tasks!(img, races, tokio::spawn))
}

fn race_uring(w: &Work, races: &[Race]) -> Outcome {
    uring_run(w, |img| race_tasks!(img, races, tokio::task::spawn_local))
}

#[test]
fn discards_racing_in_place_writes_std_multi_thread() {
    discard_race(race_std);
}

#[test]
fn discards_racing_in_place_writes_uring_current_thread() {
    if uring_or_skip("discards_racing_in_place_writes_uring_current_thread") {
        discard_race(race_uring);
    }
}

/// Readers during allocation: while the writers of [`half_over`] run, reader tasks keep reading the odd
/// 4 KiB slots, which no request writes. They must read the old content every time: a cluster linked
/// into L2 before its copy-on-write data is on disk would show zeros or garbage there for a moment.
fn readers_during_cow(base: Base, run: fn(&Work, &[Job], Arc<Vec<u8>>) -> Outcome) {
    let w = Work::new();
    let s = half_over(base);
    let mut model = setup(&w, &s);
    let initial = Arc::new(model.data.clone());
    let jobs = jobs(&s);
    for j in &jobs {
        model.write(j.offset, &j.data);
    }
    let out = run(&w, &jobs, initial);
    assert_same(&out.after_close, &model.data, "our read after close");
    assert_same(
        &qemu_raw(&w, "img.qcow2"),
        &model.data,
        "qemu-img convert -O raw",
    );
    assert_check_clean(&w, "img.qcow2");
}

/// One reader: passes over every odd slot of the 8 clusters until `done`, at least once; returns the
/// number of reads.
async fn slot_reader<B: Backend>(
    img: Image<B>,
    done: Arc<std::sync::atomic::AtomicBool>,
    initial: Arc<Vec<u8>>,
    first: usize,
) -> Result<u64, String> {
    let mut reads = 0u64;
    let mut buf = vec![0u8; WRITE as usize];
    loop {
        for k in 0..GUEST_CLUSTERS.len() {
            let c = GUEST_CLUSTERS[(k + first) % GUEST_CLUSTERS.len()];
            for slot in (1..SLOTS).step_by(2) {
                let off = c * CLUSTER + slot * WRITE;
                img.read(off, &mut buf)
                    .await
                    .map_err(|e| format!("read at {off}: {e}"))?;
                reads += 1;
                let want = &initial[off as usize..(off + WRITE) as usize];
                if buf != want {
                    return Err(format!(
                        "read {reads} at {off:#x} (not written by anyone) saw {:?}",
                        common::write::first_diff(&buf, want)
                    ));
                }
            }
        }
        if done.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(reads);
        }
    }
}

const READERS: usize = 8;

/// Reader tasks plus one task that runs the writers and then tells the readers to stop.
macro_rules! reader_tasks {
    ($img:expr, $jobs:expr, $initial:expr, $spawn:path) => {{
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks: Tasks = (0..READERS)
            .map(|i| {
                let r = slot_reader($img.clone(), Arc::clone(&done), Arc::clone(&$initial), i);
                $spawn(async move { r.await.map(|_| ()) })
            })
            .collect();
        let writers = write_tasks!($img, $jobs, $spawn);
        tasks.push($spawn(async move {
            join(writers).await;
            done.store(true, std::sync::atomic::Ordering::Release);
            Ok(())
        }));
        tasks
    }};
}

fn readers_std(w: &Work, jobs: &[Job], initial: Arc<Vec<u8>>) -> Outcome {
    std_run(w, |img| reader_tasks!(img, jobs, initial, tokio::spawn))
}

fn readers_uring(w: &Work, jobs: &[Job], initial: Arc<Vec<u8>>) -> Outcome {
    uring_run(w, |img| {
        reader_tasks!(img, jobs, initial, tokio::task::spawn_local)
    })
}

#[test]
fn readers_never_see_unfinished_cow_over_backing_std_multi_thread() {
    readers_during_cow(Base::Backing, readers_std);
}

#[test]
fn readers_never_see_unfinished_cow_over_backing_uring_current_thread() {
    if uring_or_skip("readers_never_see_unfinished_cow_over_backing_uring_current_thread") {
        readers_during_cow(Base::Backing, readers_uring);
    }
}

#[test]
fn readers_never_see_unfinished_cow_of_snapshot_clusters_std_multi_thread() {
    readers_during_cow(Base::Snapshot, readers_std);
}

#[test]
fn readers_never_see_unfinished_cow_of_compressed_clusters_uring_current_thread() {
    if uring_or_skip("readers_never_see_unfinished_cow_of_compressed_clusters_uring_current_thread")
    {
        readers_during_cow(Base::Compressed, readers_uring);
    }
}
