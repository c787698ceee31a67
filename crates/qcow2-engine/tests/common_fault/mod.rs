//! Shared pieces of the fault-injection tests (`crash.rs`, `io_errors.rs`): images made by qemu-img and
//! loaded into a `FaultBackend`, self-identifying sector patterns, `qemu-img check --output=json`, a seeded
//! generator.

#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;

use qcow2_engine::{Image, OpenOptions};
use qcow2_io::FaultBackend;
use qcow2_testkit::{path_str, run};

/// The unit the data models track: every test write is 512-byte aligned.
pub const SECTOR: u64 = 512;

/// The id the backing image's sectors carry (never used by a test write).
pub const BACKING_ID: u64 = u64::MAX / 2;

/// Read-write open options.
pub fn rw() -> OpenOptions {
    OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    }
}

/// Read-only open options.
pub fn ro() -> OpenOptions {
    OpenOptions::default()
}

/// A current-thread runtime: with `FaultBackend::with_schedule` the task interleaving is then a function
/// of the seed alone.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
}

/// splitmix64, so that every workload and cut replays from its seed.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` sectors starting at guest sector `first`, each filled with 32 copies of `(id, sector)` (little
/// endian), so that any sector read back tells which write put it there and whether it is in its place.
pub fn pattern(id: u64, first: u64, n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((n * SECTOR) as usize);
    for s in first..first + n {
        for _ in 0..SECTOR / 16 {
            v.extend_from_slice(&id.to_le_bytes());
            v.extend_from_slice(&s.to_le_bytes());
        }
    }
    v
}

/// What a sector read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Val {
    /// All zeros (unallocated, zero cluster, zero write, discard).
    Zero,
    /// The pattern of write `id` (or [`BACKING_ID`]) for this very sector.
    Id(u64),
    /// Anything else: a torn sector, a sector of another place, foreign bytes.
    Garbage,
}

/// Decodes guest sector `sector` from its 512 bytes.
pub fn decode(bytes: &[u8], sector: u64) -> Val {
    if bytes.iter().all(|&b| b == 0) {
        return Val::Zero;
    }
    let id = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let s = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if s != sector || bytes.chunks(16).any(|c| c != &bytes[..16]) {
        return Val::Garbage;
    }
    Val::Id(id)
}

/// `qemu-img create -f qcow2 -o OPTS NAME SIZE` (with `-b BACKING -F qcow2` if given) in `dir`, returning
/// the file's bytes.
pub fn qemu_create(
    dir: &Path,
    name: &str,
    size: u64,
    opts: &str,
    backing: Option<&str>,
) -> Vec<u8> {
    let size = size.to_string();
    qcow2_testkit::create_qcow2(
        dir,
        name,
        if backing.is_some() { "" } else { &size },
        opts,
        backing.map(|b| (b, "qcow2")),
    );
    std::fs::read(dir.join(name)).expect("read created image")
}

/// The result of `qemu-img check --output=json`.
#[derive(Debug, Clone)]
pub struct QemuCheck {
    /// Exit status (0 clean, 1 check errors, 2 corruptions, 3 leaks).
    pub code: i32,
    /// `corruptions` (absent means 0).
    pub corruptions: u64,
    /// `leaks` (absent means 0).
    pub leaks: u64,
    /// `check-errors`.
    pub check_errors: u64,
    /// Everything qemu-img printed, for failure messages.
    pub text: String,
}

impl QemuCheck {
    /// No corruption and no check error (leaks are allowed after a crash or a failed request).
    pub fn consistent(&self) -> bool {
        self.corruptions == 0 && self.check_errors == 0 && matches!(self.code, 0 | 3)
    }
}

/// Writes `bytes` to `dir/name` and runs `qemu-img check --output=json` on it.
pub fn qemu_check_bytes(dir: &Path, name: &str, bytes: &[u8]) -> QemuCheck {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write image for qemu-img check");
    let out = run(
        dir,
        "qemu-img",
        &["check", "--output=json", "-f", "qcow2", path_str(&path)],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code().unwrap_or(-1);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let get = |k: &str| json.get(k).and_then(|v| v.as_u64());
    QemuCheck {
        code,
        // A missing JSON (qemu-img could not even open the image) counts as a check error.
        check_errors: if json.is_object() {
            get("check-errors").unwrap_or(0)
        } else {
            1
        },
        corruptions: get("corruptions").unwrap_or(0),
        leaks: get("leaks").unwrap_or(0),
        text,
    }
}

/// Reads `[offset, offset + len)` of `img` in chunks of at most 1 MiB.
pub async fn read_range(
    img: &Image<FaultBackend>,
    offset: u64,
    len: u64,
) -> qcow2_engine::Result<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        img.read(offset + (i as u64) * (1 << 20), chunk).await?;
    }
    Ok(out)
}

/// Our check (`Image::check` through a read-only handle on `bytes`, backing file not opened) and
/// `qemu-img check` of the same bytes: both must find no corruption and no check error, and agree on
/// the leak and corruption counts. Returns the leak count.
pub async fn check_both(dir: &Path, name: &str, bytes: &[u8]) -> Result<u64, String> {
    let opts = OpenOptions {
        follow_backing: false,
        ..ro()
    };
    let ours = Image::open_backend(FaultBackend::new(bytes.to_vec()), name, &opts)
        .await
        .map_err(|e| format!("read-only open for our check: {e}"))?
        .check(qcow2_engine::Repair::None)
        .await
        .map_err(|e| format!("our check: {e}"))?;
    if ours.corruptions != 0 || ours.check_errors != 0 {
        return Err(format!("our check: {ours:?}"));
    }
    let c = qemu_check_bytes(dir, name, bytes);
    if !c.consistent() {
        return Err(format!("qemu-img check: {}", c.text));
    }
    if c.leaks != ours.leaks || c.corruptions != ours.corruptions {
        return Err(format!(
            "our check (leaks {}, corruptions {}) disagrees with qemu-img check: {}",
            ours.leaks, ours.corruptions, c.text
        ));
    }
    Ok(ours.leaks)
}

/// The id the backing image gives sector `s` (distinct per sector, so misplaced reads show).
pub fn backing_val(s: u64) -> u64 {
    BACKING_ID ^ s
}

/// Creates `dir/base.qcow2` (64 KiB clusters, `size` bytes) whose every sector `s` carries the pattern
/// of [`backing_val`]`(s)`, written through the engine; returns its bytes.
pub async fn make_backing(dir: &Path, size: u64) -> Vec<u8> {
    let base = qemu_create(dir, "base.qcow2", size, "", None);
    let be = FaultBackend::new(base);
    let img = Image::open_backend(be.clone(), "base.qcow2", &rw())
        .await
        .expect("open backing");
    const MIB: u64 = 1 << 20;
    let mut off = 0;
    while off < size {
        let len = MIB.min(size - off);
        let mut buf = Vec::with_capacity(len as usize);
        for s in off / SECTOR..(off + len) / SECTOR {
            buf.extend(pattern(backing_val(s), s, 1));
        }
        img.write_bytes(off, bytes::Bytes::from(buf))
            .await
            .expect("fill backing");
        off += len;
    }
    img.close().await.expect("close backing");
    let bytes = be.contents();
    std::fs::write(dir.join("base.qcow2"), &bytes).expect("write backing");
    bytes
}

/// Opens `backend` (read-write or not, per `opts`) over an in-memory backing image of `backing` bytes,
/// or alone.
pub async fn open_over(
    backend: FaultBackend,
    name: &str,
    opts: &OpenOptions,
    backing: Option<&[u8]>,
) -> qcow2_engine::Result<Image<FaultBackend>> {
    match backing {
        Some(b) => {
            let base =
                Image::open_backend(FaultBackend::new(b.to_vec()), "base.qcow2", &ro()).await?;
            Image::open_backend_with_backing(backend, name, opts, base).await
        }
        None => Image::open_backend(backend, name, opts).await,
    }
}
