//! The main job: create a qcow2 image with the engine, write it from 64 concurrent tasks, close it, reopen
//! it and verify every byte against a model with 64 concurrent readers; then let QEMU's tools judge it.
//!
//! The writers' requests have random offsets and sizes (unaligned, crossing clusters), with zero writes,
//! discards and flushes mixed in. Each task owns every 64th stripe of the disk; the stripes (100.5 KiB)
//! are not cluster-aligned, so neighbouring tasks write into the same clusters at the same time and the
//! engine must allocate each cluster once and merge their data. Since no two tasks touch the same byte,
//! the final content is well defined: the model records each request when it completes.
//!
//! Run with `cargo run --release --example demo`. With qemu-img installed, it also runs
//! `qemu-img check` (must be clean) and `qemu-img compare` against the model written as a raw file.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use qcow2::engine::{CreateOptions, Error, Image, OpenOptions};
use qcow2::io::StdFileBackend;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SIZE: u64 = 64 << 20;
const TASKS: u64 = 64;
const REQUESTS_PER_TASK: u64 = 48;
/// Stripe size: not a multiple of the cluster size, so stripes of different tasks share clusters.
const STRIPE: u64 = 100 * 1024 + 512;
const CLUSTER: u64 = 64 << 10;

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Creates the image with the engine; falls back to `qemu-img create` only while the engine cannot
/// create images. Returns who created it.
async fn create(path: &Path) -> Result<&'static str, BoxError> {
    let opts = CreateOptions::qcow2(SIZE);
    match Image::<StdFileBackend>::create(path, &opts).await {
        Ok(()) => Ok("the engine (Image::create)"),
        Err(Error::Unsupported { .. }) => {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(path)
                .arg(SIZE.to_string())
                .output()?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
            }
            Ok("qemu-img create (Image::create is not available yet)")
        }
        Err(e) => Err(e.into()),
    }
}

/// What the writers did, for the summary.
#[derive(Default)]
struct Counts {
    writes: u64,
    zero_writes: u64,
    discards: u64,
    flushes: u64,
    bytes: u64,
}

/// One writer: `REQUESTS_PER_TASK` requests inside its own stripes, each recorded in the model when done.
async fn writer(
    image: Image<StdFileBackend>,
    task: u64,
    model: Arc<Mutex<Vec<u8>>>,
) -> Result<Counts, BoxError> {
    let mut rng = Rng::new(task + 1);
    let mut counts = Counts::default();
    let stripes = SIZE / STRIPE;
    for i in 0..REQUESTS_PER_TASK {
        let stripe = task + TASKS * rng.below(stripes / TASKS);
        let base = stripe * STRIPE;
        let len = 1 + rng.below(STRIPE);
        let off = base + rng.below(STRIPE - len + 1);
        let kind = rng.below(100);
        if kind < 80 {
            let byte = (task * 37 + i) as u8 | 1;
            let data: Vec<u8> = (0..len).map(|k| byte ^ (k / 512) as u8).collect();
            image.write(off, &data).await?;
            lock(&model)[off as usize..(off + len) as usize].copy_from_slice(&data);
            counts.writes += 1;
            counts.bytes += len;
        } else if kind < 92 {
            image.write_zeroes(off, len, kind.is_multiple_of(2)).await?;
            lock(&model)[off as usize..(off + len) as usize].fill(0);
            counts.zero_writes += 1;
        } else {
            // A discard zeroes the whole clusters inside its range (v3 image), nothing else.
            image.discard(off, len).await?;
            let start = off.div_ceil(CLUSTER) * CLUSTER;
            let end = (off + len) / CLUSTER * CLUSTER;
            if start < end {
                lock(&model)[start as usize..end as usize].fill(0);
            }
            counts.discards += 1;
        }
        if i == REQUESTS_PER_TASK / 2 && task.is_multiple_of(8) {
            image.flush().await?;
            counts.flushes += 1;
        }
    }
    Ok(counts)
}

fn lock(m: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// 64 readers, each verifying one 1 MiB-aligned slice of the disk in odd-sized pieces.
async fn verify(image: &Image<StdFileBackend>, model: Arc<Vec<u8>>) -> Result<(), BoxError> {
    let chunk = SIZE / TASKS;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let image = image.clone();
        let model = Arc::clone(&model);
        tasks.push(tokio::spawn(async move {
            let mut off = t * chunk;
            let end = off + chunk;
            let mut buf = vec![0u8; 100_000];
            while off < end {
                let len = (end - off).min(buf.len() as u64) as usize;
                image.read(off, &mut buf[..len]).await?;
                let want = &model[off as usize..off as usize + len];
                if buf[..len] != *want {
                    let i = (0..len).find(|&i| buf[i] != want[i]).unwrap_or(0);
                    return Err(format!(
                        "byte {} reads {:#04x}, the model says {:#04x}",
                        off + i as u64,
                        buf[i],
                        want[i]
                    )
                    .into());
                }
                off += len as u64;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs a QEMU tool if installed: `None` when it is not, else (success, stdout + stderr).
fn qemu(tool: &str, args: &[&std::ffi::OsStr]) -> Option<(bool, String)> {
    let out = Command::new(tool).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text.trim().to_string()))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: FAILED: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("demo.qcow2");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let model = rt.block_on(async {
        let created_by = create(&path).await?;
        println!("demo: created a {} MiB qcow2 image with {created_by}", SIZE >> 20);

        let rw = OpenOptions {
            read_only: false,
            ..OpenOptions::default()
        };
        let image = Image::<StdFileBackend>::open(&path, &rw).await?;
        let model = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            tasks.push(tokio::spawn(writer(image.clone(), t, Arc::clone(&model))));
        }
        let mut total = Counts::default();
        for t in tasks {
            let c = t.await??;
            total.writes += c.writes;
            total.zero_writes += c.zero_writes;
            total.discards += c.discards;
            total.flushes += c.flushes;
            total.bytes += c.bytes;
        }
        image.close().await?;
        let elapsed = started.elapsed();
        println!(
            "demo: {TASKS} tasks wrote concurrently: {} writes ({:.1} MiB), {} zero writes, {} discards, \
             {} flushes, then close, in {elapsed:.2?}",
            total.writes,
            total.bytes as f64 / (1 << 20) as f64,
            total.zero_writes,
            total.discards,
            total.flushes
        );
        drop(image);

        let model = Arc::new(std::mem::take(&mut *lock(&model)));
        let image = Image::<StdFileBackend>::open(&path, &OpenOptions::default()).await?;
        let started = Instant::now();
        verify(&image, Arc::clone(&model)).await?;
        println!(
            "demo: reopened; {TASKS} concurrent readers verified all {} MiB against the model in {:.2?}",
            SIZE >> 20,
            started.elapsed()
        );
        Ok::<_, BoxError>(model)
    })?;

    let p = path.as_os_str();
    match qemu("qemu-img", &["check".as_ref(), p]) {
        None => println!("demo: qemu-img not installed; skipping QEMU's check"),
        Some((true, _)) => println!("demo: qemu-img check: no errors, no leaks"),
        Some((false, text)) => return Err(format!("qemu-img check failed:\n{text}").into()),
    }
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &*model)?;
    match qemu(
        "qemu-img",
        &[
            "compare".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            raw.as_os_str(),
            p,
        ],
    ) {
        None => {}
        Some((true, _)) => println!("demo: qemu-img compare: the image equals the model: OK"),
        Some((false, text)) => return Err(format!("qemu-img compare failed:\n{text}").into()),
    }
    Ok(())
}
