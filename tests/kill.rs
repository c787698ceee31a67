//! Kill tests: a `qcow2 io` writer with many concurrent `aio_write`s is SIGKILLed at seeded random
//! moments; after each kill `qemu-img check` must find no corruption (leaks are allowed) and every write
//! flushed before the kill must read back.
//!
//! The writer reads its script from standard input: rounds of 8 non-overlapping `aio_write`s with
//! distinct patterns (one in six a zero write, `-z`), `aio_flush`, every other round a `discard` of whole
//! clusters, `flush`, and a marker `read <round*512> 512` whose output line ("read
//! 512/512 bytes at offset N") tells the test that the round's flush completed (commands run in order,
//! and `qcow2 io` flushes its standard output after every outcome). The test reads the writer's output
//! line by line, and kills it after the k-th marker plus a random number of further output lines (both
//! from the seed), so the kill lands at a point of the writer's progress, not after a fixed sleep.
//!
//! After the kill, a lazy-refcounts image (left dirty) is first opened read-write by `qcow2 io` (which
//! rebuilds its refcounts, as QEMU does on a read-write open), then: `qemu-img check` must report no
//! corruption and no check error, and `qcow2 check` must report the same counts and exit code; the guest
//! contents (`qemu-img convert -O raw`, and ours, which must be
//! identical) must have, in every 512-byte sector, either the value it had after the last completed flush
//! or the pattern of a later write covering it. Leaks left by a kill are repaired by `qcow2 check -r
//! leaks` on a copy, which `qemu-img check` must then find clean, with the same contents. The contents read become the starting point of the next
//! run of the writer on the same image, so later runs start from the state a kill left.
//!
//! Configurations: cluster sizes 512 B, 64 KiB and 2 MiB, extended L2, 1-bit refcounts, lazy refcounts,
//! an overlay over a backing file (partial writes copy the rest of the cluster from it);
//! each run of the writer uses the threads (std file) or the io_uring backend, from the seed.
//!
//! `kill_repair_at_each_write`: `qcow2 check -r all` on damaged images (rebuild, refcount 2, COPIED, leak,
//! double reference, unaligned and past-the-end entries, a dirty lazy-refcounts image) is killed by
//! strace's syscall injection (`-e inject=pwrite64:signal=SIGKILL:when=k`, and the same for fdatasync,
//! ...) at each write it makes: the image must be no worse than before (no more corruptions besides
//! COPIED-flag mismatches, no check error), and a second repair must end clean with the contents of an
//! uninterrupted one. Skipped (with a message) where ptrace is not allowed.
//!
//! `QCOW2_KILL_SEED` replays a run (the seed is printed); `QCOW2_KILLS_PER_CONFIG` sets the number of kills
//! per configuration (default 4: 28 kills in all).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::images::{KIB, MIB};
use common::Work;
use serde_json::Value;

/// A configuration.
struct Config {
    name: &'static str,
    opts: &'static str,
    cs: u64,
    size: u64,
    lazy: bool,
    /// Over a backing file whose every byte is [`BACKING_PATTERN`] (writes COW from it).
    backing: bool,
}

const BACKING_PATTERN: u8 = 0x77;

const CONFIGS: &[Config] = &[
    Config {
        name: "512",
        opts: "cluster_size=512",
        cs: 512,
        size: 8 * MIB,
        lazy: false,
        backing: false,
    },
    Config {
        name: "64k",
        opts: "",
        cs: 64 * KIB,
        size: 64 * MIB,
        lazy: false,
        backing: false,
    },
    Config {
        name: "2M",
        opts: "cluster_size=2M",
        cs: 2 * MIB,
        size: 64 * MIB,
        lazy: false,
        backing: false,
    },
    Config {
        name: "extended_l2",
        opts: "extended_l2=on",
        cs: 64 * KIB,
        size: 32 * MIB,
        lazy: false,
        backing: false,
    },
    Config {
        name: "refcount_bits=1",
        opts: "refcount_bits=1",
        cs: 64 * KIB,
        size: 32 * MIB,
        lazy: false,
        backing: false,
    },
    Config {
        name: "lazy_refcounts",
        opts: "lazy_refcounts=on",
        cs: 64 * KIB,
        size: 32 * MIB,
        lazy: true,
        backing: false,
    },
    Config {
        name: "backing",
        opts: "",
        cs: 64 * KIB,
        size: 32 * MIB,
        lazy: false,
        backing: true,
    },
];

/// Writes per round.
const WRITES_PER_ROUND: usize = 8;
/// Rounds in a script (far more than a run reaches before its kill).
const ROUNDS: u64 = 400;
/// Time limit for one writer run (a hang is a failure).
const WRITER_TIMEOUT: Duration = Duration::from_secs(120);
const SECTOR: u64 = 512;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One write of the script.
#[derive(Debug, Clone, Copy)]
struct Write1 {
    round: u64,
    offset: u64,
    len: u64,
    pattern: u8,
}

/// Makes the script: its text and its writes.
fn script(rng: &mut Rng, c: &Config) -> (String, Vec<Write1>) {
    let max_sectors = (3 * c.cs / SECTOR).clamp(16, 2048);
    let mut text = String::new();
    let mut writes = Vec::new();
    let mut n = 0u64;
    for round in 0..ROUNDS {
        let mut this: Vec<(u64, u64)> = Vec::new();
        while this.len() < WRITES_PER_ROUND {
            let len = SECTOR * (1 + rng.below(max_sectors));
            // Half the writes near the start (overwrites, partial clusters), half anywhere.
            let span = if rng.below(2) == 0 {
                c.size / 8
            } else {
                c.size
            };
            let offset = SECTOR * rng.below((span - len) / SECTOR);
            if this
                .iter()
                .any(|&(o, l)| offset < o + l && o < offset + len)
            {
                continue;
            }
            this.push((offset, len));
            // One write in six writes zeros (`-z`: zero flags or zero clusters in the metadata).
            let pattern = if rng.below(6) == 0 {
                text.push_str(&format!("aio_write -z {offset} {len}\n"));
                0
            } else {
                let p = 1 + (n % 254) as u8;
                text.push_str(&format!("aio_write -P {p} {offset} {len}\n"));
                p
            };
            n += 1;
            writes.push(Write1 {
                round,
                offset,
                len,
                pattern,
            });
        }
        text.push_str("aio_flush\n");
        // Every other round, once its writes are done, a discard of one or two whole clusters (the
        // clusters then read as zeros). Not over a backing file, where a discarded cluster that was not
        // allocated may keep reading the backing file's data.
        if !c.backing && rng.below(2) == 0 {
            let clusters = c.size / c.cs;
            let count = 1 + rng.below(2).min(clusters - 1);
            let first = rng.below(clusters - count + 1);
            let (offset, len) = (first * c.cs, count * c.cs);
            text.push_str(&format!("discard {offset} {len}\n"));
            writes.push(Write1 {
                round,
                offset,
                len,
                pattern: 0,
            });
        }
        text.push_str("flush\n");
        text.push_str(&format!("read {} 512\n", round * SECTOR));
    }
    (text, writes)
}

/// What a writer run printed before and after its kill.
struct RunResult {
    /// Rounds whose flush completed (markers seen).
    flushed_rounds: u64,
    /// Output lines read.
    lines: u64,
    /// Lines that report a failed command.
    failures: Vec<String>,
    stderr: String,
}

/// Runs the writer on `img` with `script` on its standard input; kills it (SIGKILL) after marker
/// `kill_after_round` plus `extra_lines` further lines.
fn run_writer(
    w: &Work,
    img: &str,
    aio: &str,
    script: &str,
    kill_after_round: u64,
    extra_lines: u64,
) -> RunResult {
    std::fs::write(w.p("script.txt"), script).expect("write script");
    let stdin = std::fs::File::open(w.p("script.txt")).expect("open script");
    let mut child = Command::new(common::qcow2_bin())
        .args(["io", "-i", aio, "-f", "qcow2", img])
        .current_dir(w.path())
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "0")
        .spawn()
        .expect("start qcow2 io");
    let pid = child.id();
    // Watchdog: a hung writer is killed (and the test fails on the missing markers).
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(WRITER_TIMEOUT).is_err() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            true
        } else {
            false
        }
    });
    let mut stderr = child.stderr.take().expect("stderr piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut flushed_rounds = 0u64;
    let mut lines = 0u64;
    let mut after_marker: Option<u64> = None;
    let mut killed = false;
    let mut failures = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        lines += 1;
        if line.contains("failed") || line.contains("error") {
            failures.push(line.trim().to_string());
        }
        if let Some(i) = line.find("read 512/512 bytes at offset ") {
            let rest = &line[i + "read 512/512 bytes at offset ".len()..];
            if let Ok(off) = rest.trim().parse::<u64>() {
                flushed_rounds = flushed_rounds.max(off / SECTOR + 1);
            }
        }
        if !killed {
            if after_marker.is_none() && flushed_rounds > kill_after_round {
                after_marker = Some(0);
            } else if let Some(n) = after_marker.as_mut() {
                *n += 1;
            }
            if after_marker.is_some_and(|n| n >= extra_lines) {
                let _ = child.kill();
                killed = true;
            }
        }
    }
    let _ = child.wait();
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(true);
    let stderr = err_thread.join().unwrap_or_default();
    assert!(
        !timed_out,
        "the writer hung ({lines} lines, {flushed_rounds} rounds flushed): {stderr}"
    );
    assert!(
        killed,
        "the writer ended before its kill (after {lines} lines, {flushed_rounds} rounds): {stderr}"
    );
    RunResult {
        flushed_rounds,
        lines,
        failures,
        stderr,
    }
}

/// The guest contents of `img`: qemu-img's and ours must be identical.
fn read_contents(w: &Work, img: &str) -> Result<Vec<u8>, String> {
    let _ = std::fs::remove_file(w.p("q.raw"));
    let _ = std::fs::remove_file(w.p("o.raw"));
    let q = w.qemu_img_try(
        &["convert", "-U", "-f", "qcow2", "-O", "raw", img, "q.raw"],
        common::ORACLE_TIMEOUT,
    );
    if !q.success() {
        return Err(format!("qemu-img convert: {}", q.describe()));
    }
    let o = w.qcow2_try(
        &["convert", "-f", "qcow2", "-O", "raw", img, "o.raw"],
        &[],
        common::ORACLE_TIMEOUT,
    );
    if !o.success() {
        return Err(format!("qcow2 convert: {}", o.describe()));
    }
    common::diff_files(
        &w.p("q.raw"),
        &w.p("o.raw"),
        "qemu-img convert",
        "qcow2 convert",
    )?;
    Ok(w.read_file("q.raw"))
}

/// Checks `data` against the model: per sector, the value after the last flushed round, or the pattern
/// of a later write.
fn verify(base: &[u8], writes: &[Write1], flushed_rounds: u64, data: &[u8]) -> Result<(), String> {
    // Sector values after the flushed rounds (rounds apply in order; a round's writes do not overlap).
    let mut expected: Vec<u8> = base.to_vec();
    let mut later: HashMap<u64, Vec<u8>> = HashMap::new();
    for wr in writes {
        for s in wr.offset / SECTOR..(wr.offset + wr.len) / SECTOR {
            if wr.round < flushed_rounds {
                expected[s as usize] = wr.pattern;
            } else {
                later.entry(s).or_default().push(wr.pattern);
            }
        }
    }
    let mut bad = Vec::new();
    for (s, chunk) in data.chunks(SECTOR as usize).enumerate() {
        let b = chunk[0];
        let uniform = chunk.iter().all(|&x| x == b);
        let allowed = b == expected[s] || later.get(&(s as u64)).is_some_and(|v| v.contains(&b));
        if !uniform || !allowed {
            bad.push(format!(
                "sector {s} (offset {}): {} {b:#x}, expected {:#x} or one of {:?}",
                s as u64 * SECTOR,
                if uniform {
                    "reads"
                } else {
                    "is torn, starts with"
                },
                expected[s],
                later.get(&(s as u64)).cloned().unwrap_or_default()
            ));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        let n = bad.len();
        bad.truncate(10);
        Err(format!(
            "{n} sectors lost flushed data:\n  {}",
            bad.join("\n  ")
        ))
    }
}

/// Runs the kills of one configuration; returns (kills, corruptions found, images with leaks repaired,
/// failures).
fn run_config(c: &Config, seed: u64, kills: u64) -> (u64, u64, u64, Vec<String>) {
    let w = Work::new();
    let img = "k.qcow2";
    let initial = if c.backing {
        common::images::create(&w, "backing.qcow2", "", c.size);
        w.qemu_io(
            &["-f", "qcow2"],
            "backing.qcow2",
            &[&format!("write -P {BACKING_PATTERN} 0 {}", c.size)],
        );
        common::images::create_overlay(&w, img, "backing.qcow2", "qcow2", c.opts, None);
        BACKING_PATTERN
    } else {
        common::images::create(&w, img, c.opts, c.size);
        0
    };
    let mut rng = Rng(seed);
    // Per-sector values of the image (uniform sectors, as every write writes a pattern).
    let mut base = vec![initial; (c.size / SECTOR) as usize];
    let mut failures = Vec::new();
    let mut corruptions = 0;
    let mut done = 0;
    let mut repaired_leaks = 0;
    for k in 0..kills {
        let (text, writes) = script(&mut rng, c);
        let kill_after_round = rng.below(6);
        let extra_lines = rng.below(40);
        let aio = if rng.below(2) == 0 {
            "threads"
        } else {
            "io_uring"
        };
        let r = run_writer(&w, img, aio, &text, kill_after_round, extra_lines);
        done += 1;
        let what = format!(
            "{} kill {k} (seed {seed}, -i {aio}, after round {kill_after_round} + {extra_lines} lines: {} lines read, {} rounds flushed)",
            c.name, r.lines, r.flushed_rounds
        );
        if !r.failures.is_empty() {
            failures.push(format!(
                "{what}: the writer reported failures: {:?}\n{}",
                r.failures, r.stderr
            ));
        }
        if c.lazy {
            // A read-write open repairs the dirty image (as QEMU's does).
            let o = w.qcow2_try(
                &["io", "-f", "qcow2", "-c", "flush", img],
                &[],
                common::ORACLE_TIMEOUT,
            );
            if !o.success() {
                failures.push(format!(
                    "{what}: read-write open after the kill failed: {}",
                    o.describe()
                ));
                break;
            }
        }
        let chk = w.qemu_img_try(&["check", "--output=json", img], common::ORACLE_TIMEOUT);
        let v: Value = serde_json::from_slice(&chk.stdout).unwrap_or(Value::Null);
        let n = |key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
        let code = chk.status.and_then(|s| s.code()).unwrap_or(-1);
        if v.is_null() || n("corruptions") > 0 || n("check-errors") > 0 || !(code == 0 || code == 3)
        {
            corruptions += 1;
            failures.push(format!(
                "{what}: qemu-img check finds corruption: {}",
                chk.describe()
            ));
            break;
        }
        // Our check agrees with qemu-img's.
        let ours = w.qcow2_try(
            &["check", "--output=json", img],
            &[],
            common::ORACLE_TIMEOUT,
        );
        let ov: Value = serde_json::from_slice(&ours.stdout).unwrap_or(Value::Null);
        let on = |key: &str| ov.get(key).and_then(Value::as_u64).unwrap_or(0);
        let ocode = ours.status.and_then(|s| s.code()).unwrap_or(-1);
        if ov.is_null()
            || ocode != code
            || on("corruptions") != n("corruptions")
            || on("leaks") != n("leaks")
        {
            failures.push(format!(
                "{what}: qcow2 check disagrees with qemu-img check:\n{}\n{}",
                chk.describe(),
                ours.describe()
            ));
        }
        // Leaks left by the kill: our `-r leaks` (on a copy) frees them, and nothing else changes.
        if n("leaks") > 0 {
            std::fs::copy(w.p(img), w.p("rep.qcow2")).expect("copy image");
            let rep = w.qcow2_try(
                &["check", "-r", "leaks", "rep.qcow2"],
                &[],
                common::ORACLE_TIMEOUT,
            );
            let after = w.qemu_img_try(&["check", "rep.qcow2"], common::ORACLE_TIMEOUT);
            let same = w.qemu_img_try(&["compare", img, "rep.qcow2"], common::ORACLE_TIMEOUT);
            if !rep.success() || !after.success() || !same.success() {
                failures.push(format!(
                    "{what}: repairing the leaks: {}\n{}\n{}",
                    rep.describe(),
                    after.describe(),
                    same.describe()
                ));
            }
            repaired_leaks += 1;
        }
        let data = match read_contents(&w, img) {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("{what}: {e}"));
                break;
            }
        };
        if let Err(e) = verify(&base, &writes, r.flushed_rounds, &data) {
            failures.push(format!("{what}: {e}"));
            break;
        }
        println!(
            "{what}: qemu-img check exit {code}, {} leaks; flushed data intact",
            n("leaks")
        );
        base = data.chunks(SECTOR as usize).map(|s| s[0]).collect();
    }
    (done, corruptions, repaired_leaks, failures)
}

#[test]
fn kill_writer_at_random_moments() {
    let seed = std::env::var("QCOW2_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let per_config = std::env::var("QCOW2_KILLS_PER_CONFIG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4u64);
    println!("kill: seed {seed} (QCOW2_KILL_SEED={seed} replays the choices)");
    let _ = std::io::stdout().flush();
    let mut kills = 0;
    let mut corruptions = 0;
    let mut leaky = 0;
    let mut failures = Vec::new();
    for (i, c) in CONFIGS.iter().enumerate() {
        let (k, cor, rep, f) = run_config(c, seed.wrapping_add(i as u64 * 0x1000_0001), per_config);
        kills += k;
        corruptions += cor;
        leaky += rep;
        failures.extend(f);
    }
    println!(
        "kill: {kills} kills, {corruptions} corruptions ({leaky} left leaks, repaired by qcow2 check -r leaks)"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(kills >= 20 || per_config < 4, "only {kills} kills");
}

/// The model check itself: a lost flushed write, a torn sector and a value no write produced are
/// caught; an unflushed write may or may not be there.
#[test]
fn verify_catches_lost_flushed_writes() {
    let base = vec![0u8; 16];
    let writes = [
        Write1 {
            round: 0,
            offset: 0,
            len: 1024,
            pattern: 5,
        },
        Write1 {
            round: 1,
            offset: 512,
            len: 1024,
            pattern: 6,
        },
    ];
    let mut data = vec![0u8; 16 * 512];
    data[..1024].fill(5);
    // Round 1 not flushed: absent, or present.
    assert!(verify(&base, &writes, 1, &data).is_ok());
    data[512..1536].fill(6);
    assert!(verify(&base, &writes, 1, &data).is_ok());
    assert!(verify(&base, &writes, 2, &data).is_ok());
    // Round 0 lost although flushed.
    data[..512].fill(0);
    assert!(verify(&base, &writes, 1, &data).is_err());
    data[..512].fill(5);
    // A torn sector.
    data[1024 + 100] = 0;
    assert!(verify(&base, &writes, 1, &data).is_err());
    data[1024 + 100] = 6;
    // A value nobody wrote.
    data[4096..4608].fill(9);
    assert!(verify(&base, &writes, 1, &data).is_err());
}

// ---------------------------------------------------------------------------------------------------------
// Repairs killed at each write

/// The syscalls by which a repair changes the image file.
const MUTATING_SYSCALLS: &[&str] = &[
    "pwrite64",
    "pwritev",
    "fdatasync",
    "fsync",
    "ftruncate",
    "fallocate",
];

/// Whether `strace` can trace our processes here (it needs ptrace).
fn strace_works(w: &Work) -> bool {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .current_dir(w.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `qcow2 check -r all img` under strace; with `inject = Some((syscall, k))` strace sends SIGKILL at
/// the entry of the k-th call of `syscall` (counted per thread, so at some call of it). Returns the
/// number of calls of each mutating syscall seen, and whether the repair was killed.
fn traced_repair(w: &Work, img: &str, inject: Option<(&str, u64)>) -> (HashMap<String, u64>, bool) {
    let trace = format!("trace={}", MUTATING_SYSCALLS.join(","));
    let mut args: Vec<String> = ["-f", "-qq", "-o", "strace.txt", "-e", &trace]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some((syscall, k)) = inject {
        args.push("-e".into());
        args.push(format!("inject={syscall}:signal=SIGKILL:when={k}"));
    }
    args.push(common::qcow2_bin().to_string_lossy().into_owned());
    args.extend(["check", "-r", "all", img].map(String::from));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = Command::new("strace");
    cmd.args(&a).current_dir(w.path());
    let o = common::run_with_timeout(cmd, common::ORACLE_TIMEOUT);
    assert!(!o.timed_out, "the traced repair hung: {}", o.describe());
    let text = std::fs::read_to_string(w.p("strace.txt")).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        for s in MUTATING_SYSCALLS {
            if line.contains(&format!(" {s}(")) {
                *counts.entry(s.to_string()).or_insert(0) += 1;
            }
        }
    }
    (counts, text.contains("killed by SIGKILL"))
}

/// A damaged image recipe: its name, and a function making it as `name` in the work directory.
type Recipe = (&'static str, fn(&Work, &str));

fn base_image(w: &Work, name: &str, opts: &str) {
    common::images::create(w, name, opts, 8 * MIB);
    w.qemu_io(
        &["-f", "qcow2"],
        name,
        &[
            "write -P 1 0 200k",
            "write -P 2 1M 64k",
            "write -P 3 3M 64k",
        ],
    );
}

/// The file offset of the L2 entry of guest cluster `g` and its value.
fn l2_entry(w: &Work, name: &str, g: u64) -> (u64, u64) {
    let path = w.p(name);
    let d = std::fs::read(&path).expect("read image");
    let be64 =
        |o: u64| u64::from_be_bytes(d[o as usize..o as usize + 8].try_into().expect("8 bytes"));
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    let off = l2 + 8 * g;
    (off, be64(off))
}

/// Sets the 16-bit refcount of the host cluster of guest cluster `g` (default refcount width).
fn set_refcount_of_guest(w: &Work, name: &str, g: u64, value: u16) {
    let path = w.p(name);
    let (_, e) = l2_entry(w, name, g);
    let cluster = (e & 0x00ff_ffff_ffff_fe00) >> 16;
    let rt = common::get_be64(&path, 48);
    let block = common::get_be64(&path, rt);
    common::patch(&path, block + 2 * cluster, &value.to_be_bytes());
}

const REPAIR_RECIPES: &[Recipe] = &[
    ("refcount 0 (rebuild)", |w, n| {
        base_image(w, n, "");
        set_refcount_of_guest(w, n, 1, 0);
    }),
    ("refcount 2", |w, n| {
        base_image(w, n, "");
        set_refcount_of_guest(w, n, 1, 2);
    }),
    ("COPIED cleared", |w, n| {
        base_image(w, n, "");
        let (off, e) = l2_entry(w, n, 0);
        common::put_be64(&w.p(n), off, e & !(1 << 63));
    }),
    ("L2 entry dropped (leak)", |w, n| {
        base_image(w, n, "");
        let (off, _) = l2_entry(w, n, 2);
        common::put_be64(&w.p(n), off, 0);
    }),
    ("double reference", |w, n| {
        base_image(w, n, "");
        let (_, e) = l2_entry(w, n, 0);
        let (off, _) = l2_entry(w, n, 2);
        common::put_be64(&w.p(n), off, e);
    }),
    ("unaligned entry", |w, n| {
        base_image(w, n, "");
        let (off, e) = l2_entry(w, n, 1);
        common::put_be64(&w.p(n), off, e + 32 * KIB);
    }),
    ("entry past the end", |w, n| {
        base_image(w, n, "");
        let (off, _) = l2_entry(w, n, 1);
        common::put_be64(&w.p(n), off, (1 << 63) | (64 * MIB));
    }),
    ("lazy refcounts, killed while dirty", |w, n| {
        common::images::create(w, n, "lazy_refcounts=on", 8 * MIB);
        let o = w.qemu_io_try(
            &["-f", "qcow2"],
            n,
            &[
                "write -P 1 0 200k",
                "write -P 2 1M 64k",
                "write -P 3 3M 64k",
                "sigraise 9",
            ],
        );
        assert!(
            o.status.is_some_and(|s| s.code().is_none()),
            "{}",
            o.describe()
        );
    }),
];

/// What `qemu-img check` reports: (corruptions other than COPIED flags, COPIED-flag corruptions,
/// check errors); all `u64::MAX` when it printed no report.
///
/// COPIED-flag mismatches are counted apart: a repair that raises a refcount and then fixes the flags of
/// the entries referencing the cluster cannot do both at once, so between the two writes the flags do
/// not match (and with the opposite order neither would the refcount).
fn qemu_counts(w: &Work, img: &str) -> (u64, u64, u64) {
    let o = w.qemu_img_try(&["check", "--output=json", img], common::ORACLE_TIMEOUT);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    if v.is_null() {
        return (u64::MAX, u64::MAX, u64::MAX);
    }
    let corruptions = v.get("corruptions").and_then(Value::as_u64).unwrap_or(0);
    let errors = v.get("check-errors").and_then(Value::as_u64).unwrap_or(0);
    let copied = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("ERROR OFLAG_COPIED"))
        .count() as u64;
    (corruptions.saturating_sub(copied), copied, errors)
}

/// A repair (`qcow2 check -r all`) killed at every write it makes (via strace's syscall injection):
/// the interrupted image is no worse than before (no more corruptions besides COPIED-flag mismatches, see
/// [`qemu_counts`], and no check error), and a second
/// `qcow2 check -r all` then leaves an image qemu-img finds clean, with the guest contents of an
/// uninterrupted repair.
#[test]
fn kill_repair_at_each_write() {
    let w = Work::new();
    if !strace_works(&w) {
        println!("kill repair: strace cannot trace here (no ptrace); skipped");
        return;
    }
    let mut kills = 0;
    let mut copied_transients = 0;
    let mut failures = Vec::new();
    for (what, make) in REPAIR_RECIPES {
        make(&w, "damaged.qcow2");
        let (before, copied_before, _) = qemu_counts(&w, "damaged.qcow2");
        // The uninterrupted repair, for its contents and its syscalls.
        std::fs::copy(w.p("damaged.qcow2"), w.p("full.qcow2")).expect("copy");
        let (calls, killed) = traced_repair(&w, "full.qcow2", None);
        assert!(!killed, "{what}: the uninterrupted repair was killed");
        assert!(
            !calls.is_empty(),
            "{what}: the repair made no write (the damage recipe is wrong?)"
        );
        for (syscall, n) in &calls {
            for k in 1..=*n {
                std::fs::copy(w.p("damaged.qcow2"), w.p("cut.qcow2")).expect("copy");
                let (_, killed) = traced_repair(&w, "cut.qcow2", Some((syscall, k)));
                if !killed {
                    continue;
                }
                kills += 1;
                let case = format!("{what}: repair killed at {syscall} #{k} (per thread)");
                let (after, copied_after, errors) = qemu_counts(&w, "cut.qcow2");
                if after > before || errors != 0 {
                    failures.push(format!(
                        "{case}: worse than before: corruptions (besides COPIED flags) {before} -> {after}, check errors {errors}"
                    ));
                    continue;
                }
                if copied_after > copied_before {
                    copied_transients += 1;
                }
                let again = w.qcow2_try(
                    &["check", "-r", "all", "cut.qcow2"],
                    &[],
                    common::ORACLE_TIMEOUT,
                );
                let clean = w.qemu_img_try(&["check", "cut.qcow2"], common::ORACLE_TIMEOUT);
                let same = w.qemu_img_try(
                    &["compare", "full.qcow2", "cut.qcow2"],
                    common::ORACLE_TIMEOUT,
                );
                if !clean.success() || !same.success() {
                    failures.push(format!(
                        "{case}: the second repair did not end like an uninterrupted one:\n{}\n{}\n{}",
                        again.describe(),
                        clean.describe(),
                        same.describe()
                    ));
                }
            }
        }
        println!("kill repair: {what}: writes {calls:?}");
    }
    println!(
        "kill repair: {kills} repairs killed, {} failures ({copied_transients} left more COPIED-flag \
         mismatches than before)",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        kills >= REPAIR_RECIPES.len(),
        "only {kills} repairs were killed"
    );
}
