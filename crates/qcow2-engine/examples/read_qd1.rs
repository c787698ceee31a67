//! Sequential 4 KiB reads at queue depth 1; prints time and L2 cache statistics.
//! Usage: `cargo run --release -p qcow2-engine --example read_qd1 -- IMAGE [COUNT] [direct] [uring]`

use std::time::Instant;

use qcow2_engine::{Image, OpenOptions};
use qcow2_io::{Backend, BackendOpen, LocalBackend, StdFileBackend};

async fn run<B: BackendOpen>(
    path: &str,
    count: u64,
    direct: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let opts = OpenOptions {
        direct,
        ..OpenOptions::default()
    };
    let img = Image::<B>::open(path, &opts).await?;
    bench(&img, count).await
}

async fn bench<B: Backend>(img: &Image<B>, count: u64) -> Result<(), Box<dyn std::error::Error>> {
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for i in 0..count {
        let off = (i * 4096) % img.virtual_size();
        img.read(off, &mut buf).await?;
    }
    let el = t.elapsed();
    println!(
        "{count} reads in {el:?} ({:.1} us/read)",
        el.as_secs_f64() * 1e6 / count as f64
    );
    println!("{:?}", img.l2_cache_stats().await);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: read_qd1 IMAGE [COUNT] [direct] [uring]")?
        .clone();
    let count: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let direct = args.iter().any(|s| s == "direct");
    if args.iter().any(|s| s == "uring") {
        qcow2_io::start_local(async move {
            run::<LocalBackend>(&path, count, direct)
                .await
                .map_err(|e| e.to_string())
        })??;
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(run::<StdFileBackend>(&path, count, direct))?;
    }
    Ok(())
}
