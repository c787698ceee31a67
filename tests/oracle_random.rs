//! Seeded random workloads: image options and a sequence of qemu-io operations (data, zero, unmap,
//! compressed writes, discards, snapshots, overlays) chosen from a fixed seed, then the usual oracle check
//! (convert bytes, map extents, info). Each seed is its own test so a failure names its seed; the recipe is
//! printed so it can be replayed by hand.

mod common;

use common::{check_image_env, Work};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// xorshift64* generator.
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
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

struct Layer {
    cluster_size: u64,
    /// Compressed writes and snapshots are possible (no external data file).
    compressed_ok: bool,
    /// Snapshots are possible (refcounts of 8 bits or more: shared compressed clusters plus a snapshot can
    /// overflow narrower ones; no external data file).
    snapshot_ok: bool,
    size: u64,
}

/// Options for one random layer; returns the `-o` string and facts about it.
fn random_options(r: &mut Rng, with_backing: bool) -> (String, Layer) {
    let cs = *r.pick(&[
        512,
        4 * KIB,
        16 * KIB,
        64 * KIB,
        64 * KIB,
        256 * KIB,
        2 * MIB,
    ]);
    let mut opts = vec![format!("cluster_size={cs}")];
    let v2 = r.chance(20);
    let mut data_file = false;
    let mut refcount_bits = 16;
    if v2 {
        opts.push("compat=0.10".into());
    } else {
        if cs >= 16 * KIB && r.chance(40) {
            opts.push("extended_l2=on".into());
        }
        if r.chance(30) {
            opts.push("compression_type=zstd".into());
        }
        refcount_bits = *r.pick(&[1, 2, 4, 8, 16, 16, 32, 64]);
        opts.push(format!("refcount_bits={refcount_bits}"));
        if r.chance(20) {
            opts.push("lazy_refcounts=on".into());
        }
        if !with_backing && r.chance(15) {
            data_file = true;
            opts.push("data_file=DATA".into());
            if r.chance(50) {
                opts.push("data_file_raw=on".into());
            }
        }
    }
    let clusters = 8 + r.below(120);
    let size = (cs * clusters).min(48 * MIB) + r.below(8) * 512;
    (
        opts.join(","),
        Layer {
            cluster_size: cs,
            compressed_ok: !data_file,
            snapshot_ok: !data_file && refcount_bits >= 8,
            size,
        },
    )
}

/// Compressed writes of a few distinct whole clusters (QEMU can only compress into unallocated clusters,
/// so these come first, on the fresh layer).
fn compressed_ops(r: &mut Rng, l: &Layer) -> Vec<String> {
    let clusters = l.size / l.cluster_size;
    if !l.compressed_ok || clusters == 0 || !r.chance(50) {
        return Vec::new();
    }
    let mut picked: Vec<u64> = (0..1 + r.below(6)).map(|_| r.below(clusters)).collect();
    picked.sort_unstable();
    picked.dedup();
    picked
        .into_iter()
        .map(|c| {
            format!(
                "write -c -P {} {} {}",
                1 + r.below(255),
                c * l.cluster_size,
                l.cluster_size
            )
        })
        .collect()
}

/// A random qemu-io operation inside [0, size).
fn random_op(r: &mut Rng, l: &Layer) -> String {
    let cs = l.cluster_size;
    let size = l.size;
    let unaligned = r.chance(15);
    let off = if unaligned {
        r.below(size)
    } else {
        r.below(size / 512) * 512
    };
    let max_len = (size - off).min(3 * cs + 4 * KIB).max(1);
    let mut len = if unaligned {
        1 + r.below(max_len)
    } else {
        512 * (1 + r.below(max_len.div_ceil(512)))
    };
    len = len.min(size - off).max(1);
    let kind = r.below(100);
    if kind < 45 {
        format!("write -P {} {off} {len}", 1 + r.below(255))
    } else if kind < 60 {
        format!("write -z {off} {len}")
    } else if kind < 68 {
        format!("write -z -u {off} {len}")
    } else if kind < 80 {
        format!("discard {off} {len}")
    } else {
        format!("write -P {} {off} {len}", 1 + r.below(255))
    }
}

fn run_seed(seed: u64) {
    let w = Work::new();
    let mut r = Rng::new(seed);
    let mut recipe = Vec::new();
    let layers = 1 + r.below(3);
    let mut prev: Option<String> = None;
    for i in 0..layers {
        let name = format!("l{i}.qcow2");
        let (opts, layer) = random_options(&mut r, prev.is_some());
        let opts = opts.replace("DATA", &format!("l{i}.data"));
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        if let Some(p) = &prev {
            args.extend(["-b".into(), p.clone(), "-F".into(), "qcow2".into()]);
        }
        args.extend([
            "-o".into(),
            opts.clone(),
            name.clone(),
            layer.size.to_string(),
        ]);
        recipe.push(format!("qemu-img {}", args.join(" ")));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = w.qemu_img_try(&a, common::ORACLE_TIMEOUT);
        assert!(
            o.success(),
            "seed {seed}: recipe so far:\n{}\n{}",
            recipe.join("\n"),
            o.describe()
        );
        let nops = 5 + r.below(25);
        let mut cmds = compressed_ops(&mut r, &layer);
        for _ in 0..nops {
            cmds.push(random_op(&mut r, &layer));
        }
        let snapshot_ok = layer.snapshot_ok && r.chance(25);
        let split = if snapshot_ok {
            cmds.len() / 2
        } else {
            cmds.len()
        };
        for (chunk, snap) in [(&cmds[..split], snapshot_ok), (&cmds[split..], false)] {
            if chunk.is_empty() {
                continue;
            }
            let c: Vec<&str> = chunk.iter().map(String::as_str).collect();
            recipe.push(format!("qemu-io -f qcow2 -c '{}' {name}", c.join("' -c '")));
            w.qemu_io(&["-f", "qcow2"], &name, &c);
            if snap {
                recipe.push(format!("qemu-img snapshot -c s{i} {name}"));
                w.qemu_img(&["snapshot", "-c", &format!("s{i}"), &name]);
            }
        }
        prev = Some(name);
    }
    eprintln!("seed {seed} recipe:\n{}", recipe.join("\n"));
    let top = prev.expect("at least one layer");
    // Odd seeds read with a tiny L2 cache (smaller than one L2 table for most cluster sizes).
    let envs: &[(&str, &str)] = if seed % 2 == 1 {
        &[("QCOW2_L2_CACHE_SIZE", "4096")]
    } else {
        &[]
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_image_env(&w, &top, envs);
        // Human `info` and `map` too (qemu-img's human map refuses compressed clusters; so must we).
        for args in [&["info"][..], &["map"][..]] {
            if let Err(e) = common::compare_human_output(&w, args, &top) {
                panic!("human output of {top}: {e}");
            }
        }
    }));
    if let Err(e) = result {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("seed {seed}: {msg}\nrecipe:\n{}", recipe.join("\n"));
    }
}

macro_rules! seeds {
    ($($name:ident = $seed:expr;)*) => {
        $(
            #[test]
            fn $name() {
                run_seed($seed);
            }
        )*
    };
}

seeds! {
    random_seed_1 = 1;
    random_seed_2 = 2;
    random_seed_3 = 3;
    random_seed_4 = 4;
    random_seed_5 = 5;
    random_seed_6 = 6;
    random_seed_7 = 7;
    random_seed_8 = 8;
    random_seed_9 = 9;
    random_seed_10 = 10;
    random_seed_11 = 11;
    random_seed_12 = 12;
    random_seed_13 = 13;
    random_seed_14 = 14;
    random_seed_15 = 15;
    random_seed_16 = 16;
    random_seed_17 = 17;
    random_seed_18 = 18;
    random_seed_19 = 19;
    random_seed_20 = 20;
    random_seed_21 = 21;
    random_seed_22 = 22;
    random_seed_23 = 23;
    random_seed_24 = 24;
}

/// More seeds on demand: `QCOW2_RANDOM_SEEDS=100..400 cargo test --test oracle_random random_extra_seeds`
/// (does nothing when the variable is unset).
#[test]
fn random_extra_seeds() {
    let Ok(spec) = std::env::var("QCOW2_RANDOM_SEEDS") else {
        return;
    };
    let (a, b) = spec
        .split_once("..")
        .expect("QCOW2_RANDOM_SEEDS must look like 100..400");
    let a: u64 = a.trim().parse().expect("start seed");
    let b: u64 = b.trim().parse().expect("end seed");
    for seed in a..b {
        run_seed(seed);
    }
}
