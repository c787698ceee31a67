//! The images of each configuration, made once by qemu-img (and the engine, for a backing file's
//! data) and reused by every seed.

use std::sync::OnceLock;

use qcow2_engine::{Image, ImageFormat, OpenOptions};
use qcow2_testkit::{create_qcow2, TempDir};

use crate::model::{Patterns, BASE_ID};
use crate::workload::{Backing, Config, CONFIGS};
use crate::{rt, B};

/// An image configuration with its images made once (by qemu-img) and reused by every seed.
pub struct Prepared {
    pub cfg: &'static Config,
    pub dir: TempDir,
    pub top: Vec<u8>,
    pub base: Option<(Vec<u8>, ImageFormat, &'static str)>,
    /// The disk as the fresh overlay reads (the backing data, zeros elsewhere).
    pub initial: Vec<u8>,
}

pub fn prepared(i: usize) -> &'static Prepared {
    static PREP: OnceLock<Vec<OnceLock<Prepared>>> = OnceLock::new();
    let all = PREP.get_or_init(|| CONFIGS.iter().map(|_| OnceLock::new()).collect());
    all[i].get_or_init(|| prepare(&CONFIGS[i]))
}

/// Which 4 KiB blocks of the backing file hold data.
fn base_block_has_data(i: u64) -> bool {
    (i * 7 + i / 5) % 4 != 3
}

fn prepare(cfg: &'static Config) -> Prepared {
    let dir = qcow2_testkit::temp_dir();
    let d = dir.path();
    let pats = Patterns::get();
    let mut initial = vec![0u8; cfg.size as usize];
    let base = cfg.backing.map(|b| {
        let (size, name) = match b {
            Backing::Qcow2 { size, .. } => (size, "base.qcow2"),
            Backing::Raw { size } => (size, "base.raw"),
        };
        let mut ranges = Vec::new();
        let mut o = 0;
        while o < size {
            let n = (size - o).min(4096);
            if base_block_has_data(o / 4096) {
                ranges.push((o, n));
                initial[o as usize..(o + n) as usize]
                    .copy_from_slice(&pats.fill(BASE_ID, o, n as usize));
            }
            o += n;
        }
        let (bytes, fmt) = match b {
            Backing::Raw { size } => {
                let mut v = vec![0u8; size as usize];
                for &(o, n) in &ranges {
                    v[o as usize..(o + n) as usize]
                        .copy_from_slice(&initial[o as usize..(o + n) as usize]);
                }
                (v, ImageFormat::Raw)
            }
            Backing::Qcow2 { size, cluster } => {
                create_qcow2(
                    d,
                    name,
                    &size.to_string(),
                    &format!("cluster_size={cluster}"),
                    None,
                );
                let fresh = std::fs::read(d.join(name)).expect("read base");
                let mem = B::new(fresh);
                let init = &initial;
                rt().block_on(async {
                    let img = Image::open_backend(
                        mem.clone(),
                        name,
                        &OpenOptions {
                            read_only: false,
                            format: Some(ImageFormat::Qcow2),
                            ..OpenOptions::default()
                        },
                    )
                    .await
                    .expect("open base");
                    for &(o, n) in &ranges {
                        img.write(o, &init[o as usize..(o + n) as usize])
                            .await
                            .expect("fill base");
                    }
                    img.close().await.expect("close base");
                });
                (mem.contents(), ImageFormat::Qcow2)
            }
        };
        std::fs::write(d.join(name), &bytes).expect("write base");
        (bytes, fmt, name)
    });
    let backing_arg = base.as_ref().map(|(_, fmt, name)| (*name, fmt.name()));
    if cfg.compressed {
        // Compressible data that still names its sector: each sector repeats
        // [sector number (7 bytes), 0xC0]. Some 4 KiB blocks stay empty.
        assert!(
            base.is_none(),
            "compressed configurations have no backing file"
        );
        for (i, sector) in initial.chunks_mut(512).enumerate() {
            if base_block_has_data(i as u64 / 8 + 1) {
                let mut label = (i as u64).to_le_bytes();
                label[7] = 0xC0;
                for w in sector.chunks_mut(8) {
                    w.copy_from_slice(&label[..w.len()]);
                }
            }
        }
        std::fs::write(d.join("top.raw"), &initial).expect("write top.raw");
        qcow2_testkit::qemu_img(
            d,
            &[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &cfg.create_opts(),
                "top.raw",
                "top.qcow2",
            ],
        );
    } else {
        create_qcow2(
            d,
            "top.qcow2",
            &cfg.size.to_string(),
            &cfg.create_opts(),
            backing_arg,
        );
    }
    let top = std::fs::read(d.join("top.qcow2")).expect("read top");
    Prepared {
        cfg,
        dir,
        top,
        base,
        initial,
    }
}
