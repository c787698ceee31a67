//! The main job: builds a qcow2 image with a backing file, then reads it back through the engine from many
//! concurrent tasks and verifies every byte against a model of what was written.
//!
//! The image is made with QEMU's tools (the oracle) because the engine's write path lands with the next
//! issue; the reads are ours. Run with `cargo run --release --example demo`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcow2::engine::{Image, OpenOptions};
use qcow2::io::StdFileBackend;

const SIZE: u64 = 64 << 20;

/// One write the model and qemu-io both apply: `len` bytes of `pattern` at `offset`, in layer `layer`.
struct Write {
    layer: usize,
    offset: u64,
    len: u64,
    pattern: u8,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn build(dir: &Path, writes: &[Write]) -> Result<std::path::PathBuf, String> {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg(SIZE.to_string()))?;
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-F",
            "qcow2",
            "-b",
        ])
        .arg(&base)
        .arg(&top))?;
    for (layer, path) in [(0, &base), (1, &top)] {
        let mut cmd = Command::new("qemu-io");
        for w in writes.iter().filter(|w| w.layer == layer) {
            cmd.arg("-c")
                .arg(format!("write -P {} {} {}", w.pattern, w.offset, w.len));
        }
        run(cmd.arg(path))?;
    }
    Ok(top)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // A deterministic scatter of writes in both layers; later writes win, the top layer wins over the base.
    let mut writes = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..200u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 512 * (1 + x % 256);
        let offset = (x >> 20) % (SIZE - len) / 512 * 512;
        writes.push(Write {
            layer: (i % 2) as usize,
            offset,
            len,
            pattern: (1 + i % 250) as u8,
        });
    }
    let top = build(dir.path(), &writes)?;

    let mut model = vec![0u8; SIZE as usize];
    for layer in 0..2 {
        for w in writes.iter().filter(|w| w.layer == layer) {
            model[w.offset as usize..(w.offset + w.len) as usize].fill(w.pattern);
        }
    }
    let model = Arc::new(model);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let image = Image::<StdFileBackend>::open(&top, &OpenOptions::default()).await?;
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        let chunk = SIZE / 64;
        for t in 0..64u64 {
            let image = image.clone();
            let model = Arc::clone(&model);
            tasks.push(tokio::spawn(async move {
                // Each task reads its stripe in odd-sized pieces that cross cluster and L2 boundaries.
                let mut off = t * chunk;
                let end = off + chunk;
                let mut buf = vec![0u8; 100_000];
                while off < end {
                    let len = (end - off).min(buf.len() as u64) as usize;
                    image.read(off, &mut buf[..len]).await?;
                    if buf[..len] != model[off as usize..off as usize + len] {
                        return Err(format!("mismatch in [{off}, {})", off + len as u64).into());
                    }
                    off += len as u64;
                }
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            }));
        }
        for t in tasks {
            t.await?.map_err(|e| e.to_string())?;
        }
        println!(
            "demo: 64 concurrent readers verified {} MiB through a 2-deep qcow2 chain ({} writes) in {:.2?}: OK",
            SIZE >> 20,
            writes.len(),
            started.elapsed()
        );
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
