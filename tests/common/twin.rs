//! Twin runs: the same seeded random qemu-io script through qemu-io and through `qcow2 io`, on twin images
//! made by qemu-img, then `qemu-img compare` (identical content) and `qemu-img check` (no error, no leak)
//! on ours.
//!
//! A script is hundreds of commands: pattern writes of 512 B to 1 MiB at 512-byte-aligned offsets (some
//! cluster-aligned, some in a hot region so that later writes land in allocated clusters), `write -z`,
//! `write -z -u`, `discard`, `flush`, `read -P` of ranges whose content a sector model knows (so that a
//! read-after-write bug shows inside the session, not only in the final image), and groups of
//! `aio_write`s that never overlap byte-wise but share clusters, closed by `aio_flush`.
//!
//! Scripts go to both tools on standard input (both read commands from stdin when no `-c` is given): a
//! script of 400 commands is too long for a comfortable command line. On failure the script is kept in the
//! system temp directory and the message names it and the seed, with the commands to replay it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{qcow2_bin, run_with_timeout, Out, Work, ORACLE_TIMEOUT};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// splitmix64: a small, good, seedable generator (no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One twin configuration.
#[derive(Debug, Clone)]
pub struct TwinConfig {
    /// Name (used in file names and messages).
    pub name: &'static str,
    /// Virtual size in bytes.
    pub size: u64,
    /// `qemu-img create -o` options of the twin images (cluster size etc.).
    pub create_opts: &'static str,
    /// Give both twins a qcow2 backing file pre-filled with data by qemu-io.
    pub backing: bool,
    /// Extra options of `qcow2 io` (`-i io_uring`, `-t none`).
    pub io_flags: &'static [&'static str],
    /// Number of commands per script.
    pub commands: usize,
    /// Percentage of commands that are aio groups.
    pub aio_percent: u64,
    /// Environment of `qcow2 io` (e.g. a tiny `QCOW2_L2_CACHE_SIZE`).
    pub env: &'static [(&'static str, &'static str)],
    /// Alignment of offsets and lengths in bytes (512; 1 for byte-granular requests).
    pub granularity: u64,
    /// Largest number of requests of an aio group.
    pub aio_max_pieces: u64,
    /// Largest number of clusters an aio group covers (the group stays within 2 MiB).
    pub aio_max_clusters: u64,
    /// The script is cut into this many parts of equal line counts, each run by its own process
    /// (so each tool reopens the image the previous session closed).
    pub sessions: usize,
}

impl TwinConfig {
    fn cluster_size(&self) -> u64 {
        self.create_opts
            .split(',')
            .find_map(|kv| kv.strip_prefix("cluster_size="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(64 * KIB)
    }
}

/// What each sector of the virtual disk reads as, as far as the script knows (`None`: unknown, e.g. after
/// a discard, whose effect depends on alignment, version and backing file).
struct Model {
    /// Bytes per entry of `sectors` (the script's granularity).
    unit: u64,
    sectors: Vec<Option<u8>>,
}

impl Model {
    fn set(&mut self, off: u64, len: u64, v: Option<u8>) {
        let (a, b) = (
            (off / self.unit) as usize,
            ((off + len) / self.unit) as usize,
        );
        for s in &mut self.sectors[a..b] {
            *s = v;
        }
    }
}

/// A generated script and the backing file's fill commands.
pub struct Script {
    /// The commands of the twin run, one per line.
    pub text: String,
    /// Number of commands.
    pub commands: usize,
    /// qemu-io commands that fill the backing file (empty without one).
    pub backing_fill: Vec<String>,
}

/// A random 512-aligned extent inside the disk: sometimes cluster-aligned whole clusters, sometimes in
/// a hot region (the first eighth of the disk) so that writes hit allocated clusters.
fn extent(rng: &mut Rng, size: u64, cluster: u64, unit: u64) -> (u64, u64) {
    let max_len = MIB.min(size);
    if rng.chance(30) {
        let clusters = size / cluster;
        let start = rng.below(clusters) * cluster;
        let n = rng.range(1, (max_len / cluster).max(1));
        let len = (n * cluster).min(size - start);
        return (start, len);
    }
    let region = if rng.chance(40) { size / 8 } else { size };
    let off = rng.below(region / unit) * unit;
    let len = match rng.below(10) {
        0..=4 => rng.range(1, 16 * KIB / unit) * unit,
        5..=7 => rng.range(1, 128 * KIB / unit) * unit,
        _ => rng.range(1, max_len / unit) * unit,
    };
    (off, len.min(size - off))
}

/// A non-zero pattern byte (zero would not tell written data from zeros).
fn pattern(rng: &mut Rng) -> u8 {
    rng.range(1, 255) as u8
}

/// Generates the script of `cfg` for `seed`.
pub fn generate(cfg: &TwinConfig, seed: u64) -> Script {
    let mut rng = Rng::new(seed);
    let size = cfg.size;
    let cluster = cfg.cluster_size();
    let mut model = Model {
        unit: cfg.granularity,
        sectors: vec![Some(0); (size / cfg.granularity) as usize],
    };
    let mut backing_fill = Vec::new();
    if cfg.backing {
        for _ in 0..24 {
            let (off, len) = extent(&mut rng, size, 64 * KIB, 512);
            let p = pattern(&mut rng);
            backing_fill.push(format!("write -q -P {p} {off} {len}"));
            model.set(off, len, Some(p));
        }
    }
    let mut text = String::new();
    let mut n = 0;
    while n < cfg.commands {
        let roll = rng.below(100);
        if roll < cfg.aio_percent {
            n += aio_group(&mut rng, &mut model, &mut text, cfg);
            continue;
        }
        n += 1;
        let (off, len) = extent(&mut rng, size, cluster, cfg.granularity);
        match rng.below(100) {
            0..=44 => {
                let p = pattern(&mut rng);
                let _ = writeln!(text, "write -P {p} {off} {len}");
                model.set(off, len, Some(p));
            }
            45..=54 => {
                let _ = writeln!(text, "write -z {off} {len}");
                model.set(off, len, Some(0));
            }
            55..=62 => {
                let _ = writeln!(text, "write -z -u {off} {len}");
                model.set(off, len, Some(0));
            }
            63..=72 => {
                let _ = writeln!(text, "discard {off} {len}");
                model.set(off, len, None);
            }
            73..=78 => text.push_str("flush\n"),
            _ => match known_run(&mut rng, &model) {
                Some((off, len, p)) => {
                    let _ = writeln!(text, "read -P {p} {off} {len}");
                }
                None => text.push_str("flush\n"),
            },
        }
    }
    Script {
        text,
        commands: n,
        backing_fill,
    }
}

/// A range of sectors that all hold the same known byte, for a `read -P`.
fn known_run(rng: &mut Rng, model: &Model) -> Option<(u64, u64, u8)> {
    let total = model.sectors.len();
    for _ in 0..8 {
        let s = rng.below(total as u64) as usize;
        let Some(p) = model.sectors[s] else { continue };
        let max = rng.range(1, 512) as usize;
        let mut e = s + 1;
        while e < total && e - s < max && model.sectors[e] == Some(p) {
            e += 1;
        }
        return Some((s as u64 * model.unit, (e - s) as u64 * model.unit, p));
    }
    None
}

/// A group of `aio_write`s over one to three clusters (at most 2 MiB): the region is cut at random
/// sector boundaries into pieces, some pieces are left out (so partly written clusters need copy-on-write
/// while their neighbours are in flight), the rest are issued in random order, then `aio_flush`.
fn aio_group(rng: &mut Rng, model: &mut Model, text: &mut String, cfg: &TwinConfig) -> usize {
    let (size, cluster, unit) = (cfg.size, cfg.cluster_size(), model.unit);
    let clusters = size / cluster;
    let start = rng.below(clusters) * cluster;
    let len = (rng.range(1, cfg.aio_max_clusters) * cluster)
        .min(2 * MIB)
        .min(size - start);
    let sectors = len / unit;
    let pieces = rng.range(2, cfg.aio_max_pieces).min(sectors);
    let mut cuts: Vec<u64> = (0..pieces.saturating_sub(1))
        .map(|_| rng.range(1, sectors.saturating_sub(1).max(1)))
        .collect();
    cuts.push(0);
    cuts.push(sectors);
    cuts.sort_unstable();
    cuts.dedup();
    let mut parts: Vec<(u64, u64)> = cuts
        .windows(2)
        .map(|w| (start + w[0] * unit, (w[1] - w[0]) * unit))
        .collect();
    // Fisher-Yates.
    for i in (1..parts.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        parts.swap(i, j);
    }
    let mut n = 0;
    let group = (start, start + len);
    for (i, &(off, len)) in parts.iter().enumerate() {
        if parts.len() > 2 && i > 1 && rng.chance(25) {
            continue;
        }
        let p = pattern(rng);
        let _ = writeln!(text, "aio_write -P {p} {off} {len}");
        model.set(off, len, Some(p));
        n += 1;
        if rng.chance(20) {
            n += sync_beside(rng, model, text, cfg, group);
        }
    }
    text.push_str("aio_flush\n");
    n + 1
}

/// A synchronous write or checked read outside the clusters of an aio group, issued while the group's
/// requests are in flight (they run alongside, as in qemu-io). Returns the number of commands added.
fn sync_beside(
    rng: &mut Rng,
    model: &mut Model,
    text: &mut String,
    cfg: &TwinConfig,
    (gs, ge): (u64, u64),
) -> usize {
    for _ in 0..4 {
        let (off, len) = extent(rng, cfg.size, cfg.cluster_size(), model.unit);
        if off < ge && gs < off + len {
            continue;
        }
        if rng.chance(60) {
            let p = pattern(rng);
            let _ = writeln!(text, "write -P {p} {off} {len}");
            model.set(off, len, Some(p));
            return 1;
        }
        // A checked read of a known run that stays outside the group.
        if let Some((roff, rlen, p)) = known_run(rng, model) {
            if roff >= ge || roff + rlen <= gs {
                let _ = writeln!(text, "read -P {p} {roff} {rlen}");
                return 1;
            }
        }
    }
    0
}

/// Runs `program args... < script` in the work directory.
fn run_script(w: &Work, program: &Path, args: &[&str], script: &Path, env: &[(&str, &str)]) -> Out {
    let mut c = Command::new("sh");
    c.envs(env.iter().copied());
    c.arg("-c")
        .arg("exec \"$0\" \"$@\" < \"$SCRIPT\"")
        .arg(program)
        .args(args)
        .env("SCRIPT", script)
        .current_dir(w.path());
    run_with_timeout(c, ORACLE_TIMEOUT)
}

/// The output with prompts removed, the timing lines masked, sorted (aio completions come in any
/// order), for comparing the two tools' outputs.
fn normalized(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .replace("qemu-io> ", "")
        .lines()
        .map(|l| {
            if l.contains(" ops; ") {
                "<timing>".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    v.sort();
    v
}

/// The number from `"key": N` of qemu-img check's JSON output (0 when absent).
fn json_count(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Keeps a failing script where it can be replayed and returns the failure message's replay part.
fn keep(cfg: &TwinConfig, seed: u64, script: &Script) -> String {
    let dir = std::env::temp_dir();
    let path: PathBuf = dir.join(format!("qcow2-twin-{}-{seed}.txt", cfg.name));
    let _ = std::fs::write(&path, &script.text);
    let mut fill = String::new();
    if !script.backing_fill.is_empty() {
        let _ = write!(
            fill,
            "qemu-img create -f qcow2 base.qcow2 {} && qemu-io{} base.qcow2 && \
             qemu-img create -f qcow2 -b base.qcow2 -F qcow2 -o {} ours.qcow2 {} && ",
            cfg.size,
            script
                .backing_fill
                .iter()
                .map(|c| format!(" -c '{c}'"))
                .collect::<String>(),
            cfg.create_opts,
            cfg.size
        );
    } else {
        let _ = write!(
            fill,
            "qemu-img create -f qcow2 -o {} ours.qcow2 {} && ",
            cfg.create_opts, cfg.size
        );
    }
    format!(
        "config {} seed {seed}: script kept at {} (run as {} sessions of equal line counts)\n\
         replay: {fill}{}qcow2 io {} ours.qcow2 < {} && \
         qemu-img check ours.qcow2 (twin: the same with qemu-io, then qemu-img compare)",
        cfg.name,
        path.display(),
        cfg.sessions,
        cfg.env
            .iter()
            .map(|(k, v)| format!("{k}={v} "))
            .collect::<String>(),
        cfg.io_flags.join(" "),
        path.display()
    )
}

/// Runs one twin: generate, create the twins (and their backing file), run both tools, compare, check.
/// Panics with the seed and the kept script's path on any difference.
pub fn run_twin(cfg: &TwinConfig, seed: u64) {
    let w = Work::new();
    let script = generate(cfg, seed);
    let script_path = w.p("script.txt");
    std::fs::write(&script_path, &script.text).expect("write script");
    let size = cfg.size.to_string();
    let mut create: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if cfg.backing {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", &size]);
        let fill: Vec<&str> = script.backing_fill.iter().map(String::as_str).collect();
        w.qemu_io(&[], "base.qcow2", &fill);
        create.extend(["-b", "base.qcow2", "-F", "qcow2"].map(String::from));
    }
    create.extend(["-o".to_string(), cfg.create_opts.to_string()]);
    for name in ["theirs.qcow2", "ours.qcow2"] {
        let mut a: Vec<&str> = create.iter().map(String::as_str).collect();
        a.push(name);
        a.push(&size);
        w.qemu_img(&a);
    }
    let fail = |what: String| {
        panic!("{what}\n{}", keep(cfg, seed, &script));
    };

    let lines: Vec<&str> = script.text.lines().collect();
    let per = lines.len().div_ceil(cfg.sessions.max(1)).max(1);
    let parts: Vec<PathBuf> = lines
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let p = w.p(&format!("script.{i}.txt"));
            std::fs::write(&p, chunk.join("\n") + "\n").expect("write script part");
            p
        })
        .collect();
    let bin = qcow2_bin();
    let mut args: Vec<&str> = vec!["io", "-f", "qcow2"];
    args.extend_from_slice(cfg.io_flags);
    args.push("ours.qcow2");
    let (mut theirs_out, mut ours_out) = (String::new(), String::new());
    for (i, part) in parts.iter().enumerate() {
        let theirs = run_script(
            &w,
            Path::new("qemu-io"),
            &["-f", "qcow2", "theirs.qcow2"],
            part,
            &[],
        );
        let theirs_text = format!("{}{}", theirs.stdout_str(), theirs.stderr);
        if !theirs.success() || theirs_text.contains("failed") {
            fail(format!(
                "qemu-io itself failed session {i} of the script (a bug of the generator's model):\n{}",
                theirs.describe()
            ));
        }
        let ours = run_script(&w, &bin, &args, part, cfg.env);
        if ours.panicked() || ours.timed_out || !ours.success() || ours.stderr.contains("qcow2:") {
            fail(format!(
                "qcow2 io failed in session {i}:\n{}",
                ours.describe()
            ));
        }
        theirs_out.push_str(&theirs.stdout_str());
        ours_out.push_str(&ours.stdout_str());
    }
    let (ours, theirs) = (ours_out, theirs_out);
    if normalized(&ours) != normalized(&theirs) {
        let (a, b) = (normalized(&ours), normalized(&theirs));
        let first = a
            .iter()
            .zip(&b)
            .find(|(x, y)| x != y)
            .map(|(x, y)| format!("ours: {x:?}\ntheirs: {y:?}"))
            .unwrap_or_else(|| format!("{} lines vs {} lines", a.len(), b.len()));
        fail(format!(
            "the outputs differ (sorted, timing masked); first difference:\n{first}"
        ));
    }
    let cmp = w.qemu_img_try(
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "ours.qcow2",
            "theirs.qcow2",
        ],
        ORACLE_TIMEOUT,
    );
    if !cmp.success() {
        fail(format!(
            "qemu-img compare: the content differs:\n{}",
            cmp.describe()
        ));
    }
    let check = w.qemu_img_try(
        &["check", "-f", "qcow2", "--output=json", "ours.qcow2"],
        ORACLE_TIMEOUT,
    );
    let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap_or_default();
    let bad = ["check-errors", "corruptions", "leaks"]
        .iter()
        .map(|k| (k, json_count(&v, k)))
        .filter(|(_, n)| *n > 0)
        .collect::<Vec<_>>();
    if !check.success() || !bad.is_empty() {
        fail(format!(
            "qemu-img check on ours: {bad:?}\n{}",
            check.describe()
        ));
    }
}

/// The seeds to run for a configuration: `QCOW2_TWIN_SEED=S` runs only S; otherwise `QCOW2_TWIN_SEEDS=N`
/// (default 1) seeds derived from the configuration's name, so each configuration has its own fixed
/// default seed.
pub fn seeds(name: &str) -> Vec<u64> {
    if let Some(s) = std::env::var("QCOW2_TWIN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let n: u64 = std::env::var("QCOW2_TWIN_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let base = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) % 1_000_000;
    (0..n).map(|i| base + i).collect()
}
