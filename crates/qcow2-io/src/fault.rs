//! A fault-injecting in-memory backend, for crash-consistency, I/O-error and deterministic-simulation tests.
//!
//! A real disk with a volatile write cache guarantees nothing about writes until an `fdatasync` returns:
//! after a power cut any subset of them may be on the platter, in any order, torn at sector granularity.
//! The engine's crash safety rests on its barriers (DESIGN.md, "Metadata caches and crash-safe ordering"),
//! and those can only be tested against a backend that actually exercises that freedom. [`FaultBackend`]
//! therefore keeps two images:
//!
//! - the *visible* contents, which reads see (every completed write, as the page cache would), and
//! - the *durable* contents, the state as of the last successful flush,
//!
//! plus the log of mutating operations completed since then (the current *epoch*). A simulated power cut
//! ([`FaultBackend::power_cut`]) is the durable image with a seeded choice of the epoch's operations applied.
//!
//! It can also fail chosen operations with `EIO` or `ENOSPC` ([`FaultBackend::fail_op`]), "crash" at a chosen
//! operation and refuse all I/O afterwards ([`FaultBackend::crash_after`]), and complete operations in a
//! seeded order ([`FaultBackend::with_schedule`]) so that the engine's interleavings of concurrent requests
//! are explored on a current-thread runtime, each one reproducible from its seed.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

use crate::memory::DEFAULT_MAX_SIZE;
use crate::sys::len64;
use crate::{Backend, HostStatus};

/// The sector size at which [`CutMode::Torn`] tears writes: the smallest unit a disk writes atomically.
pub const SECTOR_SIZE: u64 = 512;

/// Which of the writes since the last successful flush survive a simulated power cut.
///
/// The modes go from the most benign to the most hostile, so that a test can tell "the engine relies on
/// write order" (fails under [`CutMode::Subset`] but not [`CutMode::Prefix`]) from "the engine relies on
/// sector atomicity" (fails only under [`CutMode::Torn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CutMode {
    /// None of them: the durable image as of the last flush.
    Nothing,
    /// All of them: what reads saw just before the cut.
    All,
    /// An in-order prefix of them (a disk that writes in order but lost its queue tail).
    Prefix,
    /// Any subset of whole operations (a write cache that reorders but never tears).
    Subset,
    /// Any subset of the 512-byte sectors of each write; other operations are kept or dropped whole.
    Torn,
    /// One of the above, chosen from the seed, so one seed sweep covers all of them.
    Any,
}

/// Which operations [`FaultBackend::fail_op`] counts and fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `read_at`.
    Read,
    /// `write_at` and `writev_at`.
    Write,
    /// `flush`.
    Flush,
    /// `zero_range`.
    ZeroRange,
    /// `punch_hole`.
    PunchHole,
    /// `set_len`.
    SetLen,
    /// Any operation that changes the contents: writes, `zero_range`, `punch_hole`, `set_len` (not flush,
    /// whose failure has its own sticky semantics and is asked for with [`OpKind::Flush`]).
    AnyWrite,
}

/// The error an injected failure returns: the two a real host gives for a failing or full disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InjectedError {
    /// `EIO`: the device failed the operation.
    Eio,
    /// `ENOSPC`: the host file system is full.
    Enospc,
}

impl InjectedError {
    /// The `io::Error` the engine sees, with the real OS error code so that error mapping is exercised too.
    pub fn to_io_error(self) -> io::Error {
        match self {
            InjectedError::Eio => io::Error::from_raw_os_error(libc::EIO),
            InjectedError::Enospc => io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }
}

/// A mutating operation of the current epoch, as it is replayed onto the durable image.
#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Punch { offset: u64, len: u64 },
    SetLen { len: u64 },
}

/// A pending injected failure from [`FaultBackend::fail_op`].
#[derive(Debug, Clone, Copy)]
struct PendingFailure {
    kind: OpKind,
    /// How many more matching operations pass before the one that fails.
    countdown: u64,
    err: InjectedError,
}

/// A pending crash from [`FaultBackend::crash_after`].
#[derive(Debug, Clone, Copy)]
struct PendingCrash {
    countdown: u64,
    mode: CutMode,
    seed: u64,
}

/// The shared state behind a [`FaultBackend`] and its clones.
#[derive(Debug)]
struct State {
    visible: Vec<u8>,
    durable: Vec<u8>,
    /// Operations completed since the last successful flush, in completion order, with their sequence
    /// numbers (used by flushes to tell which operations completed before they were issued).
    epoch: Vec<(u64, Op)>,
    /// Sequence number of the next completed mutating operation.
    next_seq: u64,
    /// A flush failed: every later flush fails too.
    flush_failed: bool,
    failures: Vec<PendingFailure>,
    crash: Option<PendingCrash>,
    crash_image: Option<Vec<u8>>,
    reads: u64,
    mutating: u64,
    flushes: u64,
    /// The scheduler's RNG state and the largest number of yields per operation (`None`: no delays).
    schedule: Option<(u64, u32)>,
}

/// An in-memory backend that records the writes since the last flush, simulates power cuts, injects I/O
/// errors and, optionally, completes operations in a seeded order. Clones share all state, so a test keeps
/// one clone to inspect while the engine owns another.
///
/// Reads, lengths and host status behave as [`crate::MemoryBackend`]'s: reads past the end zero-fill and
/// return the short count, writes grow the contents up to a maximum size.
#[derive(Clone, Debug)]
pub struct FaultBackend {
    state: Arc<Mutex<State>>,
    max_size: u64,
}

/// splitmix64: a tiny, good-enough generator; the point is reproducibility from a seed, not quality.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A value in `0..n` (`n > 0`) from `rng`.
fn below(rng: &mut u64, n: u64) -> u64 {
    splitmix(rng) % n
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn end_of(offset: u64, len: u64) -> io::Result<u64> {
    offset.checked_add(len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("byte range at offset {offset} of length {len} overflows"),
        )
    })
}

/// Grows `data` with zeros to `end` bytes if it is shorter. `end` has been checked against the maximum
/// size when the operation ran, so this cannot allocate without bound.
fn grow(data: &mut Vec<u8>, end: u64) {
    if end > len64(data.len()) {
        data.resize(end as usize, 0);
    }
}

/// Zeroes the bytes of `[offset, end)` that lie within `data`.
fn clear(data: &mut [u8], offset: u64, end: u64) {
    let stop = end.min(len64(data.len()));
    if offset < stop {
        data[offset as usize..stop as usize].fill(0);
    }
}

impl Op {
    /// Applies the whole operation to `data`.
    fn apply(&self, data: &mut Vec<u8>) {
        match self {
            Op::Write { offset, data: d } => {
                grow(data, offset + len64(d.len()));
                let start = *offset as usize;
                data[start..start + d.len()].copy_from_slice(d);
            }
            Op::Zero { offset, len } => {
                clear(data, *offset, offset + len);
                grow(data, offset + len);
            }
            Op::Punch { offset, len } => clear(data, *offset, offset + len),
            Op::SetLen { len } => {
                if *len <= len64(data.len()) {
                    data.truncate(*len as usize);
                } else {
                    grow(data, *len);
                }
            }
        }
    }

    /// Applies a seeded subset of the write's 512-byte sectors (split at absolute sector boundaries, as a
    /// disk tears); other operations are kept or dropped whole.
    fn apply_torn(&self, data: &mut Vec<u8>, rng: &mut u64) {
        let Op::Write { offset, data: d } = self else {
            if splitmix(rng) & 1 == 1 {
                self.apply(data);
            }
            return;
        };
        let end = offset + len64(d.len());
        let mut pos = *offset;
        while pos < end {
            let next = ((pos / SECTOR_SIZE) + 1) * SECTOR_SIZE;
            let stop = next.min(end);
            if splitmix(rng) & 1 == 1 {
                grow(data, stop);
                let src = (pos - offset) as usize..(stop - offset) as usize;
                data[pos as usize..stop as usize].copy_from_slice(&d[src]);
            }
            pos = stop;
        }
    }
}

impl FaultBackend {
    /// A backend whose visible and durable contents are both `initial` (as if just flushed).
    pub fn new(initial: Vec<u8>) -> FaultBackend {
        FaultBackend {
            state: Arc::new(Mutex::new(State {
                durable: initial.clone(),
                visible: initial,
                epoch: Vec::new(),
                next_seq: 0,
                flush_failed: false,
                failures: Vec::new(),
                crash: None,
                crash_image: None,
                reads: 0,
                mutating: 0,
                flushes: 0,
                schedule: None,
            })),
            max_size: DEFAULT_MAX_SIZE,
        }
    }

    /// Sets the largest size the contents may grow to; operations beyond it fail (as
    /// [`crate::MemoryBackend::with_max_size`]), so a hostile offset cannot make a test allocate without
    /// bound.
    pub fn with_max_size(mut self, max_size: u64) -> FaultBackend {
        self.max_size = max_size;
        self
    }

    /// Turns on deterministic simulation: every operation, when first polled, yields to the runtime a
    /// seeded-random number of times in `0..=max_delay` before it takes effect. One generator serves all
    /// operations, so on a current-thread runtime (where the task order is itself deterministic) the same
    /// seed replays the same completion order exactly, and different seeds explore different orders.
    pub fn with_schedule(self, seed: u64, max_delay: u32) -> FaultBackend {
        self.lock().schedule = Some((seed, max_delay));
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is never left half-updated by a panic (no panicking code runs under the lock), so a
        // poisoned lock's contents are still valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What reads see now: every completed write, durable or not.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().visible.clone()
    }

    /// The contents as of the last successful flush: what survives a power cut that keeps nothing.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The image a power cut now would leave: the durable contents plus the operations since the last
    /// successful flush that `mode` and `seed` keep, applied in completion order. Does not change the
    /// backend, so one run can be cut many ways.
    pub fn power_cut(&self, mode: CutMode, seed: u64) -> Vec<u8> {
        let st = self.lock();
        cut(&st.durable, &st.epoch, mode, seed)
    }

    /// Arms a crash: when the `n`-th mutating operation (0-based: writes, `writev`, `zero_range`,
    /// `punch_hole`, `set_len` and flushes, counted from this call) is about to take effect, the crash image
    /// is taken as [`FaultBackend::power_cut`]`(mode, seed)` and, from then on, every operation fails with
    /// `EIO`, that one included: the machine is gone, so nothing the engine does after the cut may matter.
    pub fn crash_after(&self, n: u64, mode: CutMode, seed: u64) {
        let mut st = self.lock();
        st.crash = Some(PendingCrash {
            countdown: n,
            mode,
            seed,
        });
        st.crash_image = None;
    }

    /// The image taken when an armed crash fired; `None` while it has not.
    pub fn crash_image(&self) -> Option<Vec<u8>> {
        self.lock().crash_image.clone()
    }

    /// Whether an armed crash has fired (the backend now fails every operation).
    pub fn crashed(&self) -> bool {
        self.lock().crash_image.is_some()
    }

    /// Arms one injected failure: the `nth` (0-based, counted from this call) operation of `kind` fails
    /// with `err` and has no effect. Several may be armed at once; each counts independently.
    pub fn fail_op(&self, kind: OpKind, nth: u64, err: InjectedError) {
        self.lock().failures.push(PendingFailure {
            kind,
            countdown: nth,
            err,
        });
    }

    /// How many failures armed with [`FaultBackend::fail_op`] have not fired yet, so a test that sweeps
    /// the index `nth` knows when it has gone past the last operation of the workload.
    pub fn armed_failures(&self) -> usize {
        self.lock().failures.len()
    }

    /// Disarms every failure armed with [`FaultBackend::fail_op`] that has not fired yet, so that a
    /// test's own verification reads are not hit by a failure meant for the workload.
    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    /// Whether a flush has failed, which makes every later flush fail.
    pub fn flush_failed(&self) -> bool {
        self.lock().flush_failed
    }

    /// Operations run so far: `(reads, mutating operations including flushes, flushes)`, so a test can run
    /// a workload once and then pick crash points and failure indices within it.
    pub fn op_counts(&self) -> (u64, u64, u64) {
        let st = self.lock();
        (st.reads, st.mutating, st.flushes)
    }

    /// The deterministic-simulation delay: yields a seeded number of times, when a schedule is set.
    async fn delay(&self) {
        let yields = {
            let mut st = self.lock();
            match &mut st.schedule {
                Some((rng, max)) => below(rng, u64::from(*max) + 1),
                None => 0,
            }
        };
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
    }

    /// Counts an operation of `kind` as it takes effect and decides its fate: `Err` if the machine has
    /// crashed (or crashes now) or an injected failure fires, `Ok` to go ahead. Runs under the state lock,
    /// together with the operation's effect, so that the two are atomic.
    fn admit(&self, st: &mut State, kind: OpKind) -> io::Result<()> {
        if st.crash_image.is_some() {
            return Err(eio());
        }
        let mutating = kind != OpKind::Read;
        match kind {
            OpKind::Read => st.reads += 1,
            OpKind::Flush => {
                st.flushes += 1;
                st.mutating += 1;
            }
            _ => st.mutating += 1,
        }
        if mutating {
            if let Some(c) = &mut st.crash {
                if c.countdown == 0 {
                    let (mode, seed) = (c.mode, c.seed);
                    st.crash = None;
                    st.crash_image = Some(cut(&st.durable, &st.epoch, mode, seed));
                    return Err(eio());
                }
                c.countdown -= 1;
            }
        }
        let mut fired = None;
        st.failures.retain_mut(|f| {
            let matches =
                f.kind == kind || (f.kind == OpKind::AnyWrite && mutating && kind != OpKind::Flush);
            if !matches {
                return true;
            }
            if f.countdown == 0 {
                fired.get_or_insert(f.err);
                return false;
            }
            f.countdown -= 1;
            true
        });
        match fired {
            Some(err) => Err(err.to_io_error()),
            None => Ok(()),
        }
    }

    /// Checks that the contents may grow to `end`.
    fn check_size(&self, end: u64) -> io::Result<()> {
        if end > self.max_size {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "fault backend cannot grow to {end} bytes (maximum size {})",
                    self.max_size
                ),
            ));
        }
        if usize::try_from(end).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{end} bytes do not fit in memory"),
            ));
        }
        Ok(())
    }

    /// Runs a mutating operation: delay, admission, then the effect on the visible contents and the log.
    async fn mutate(&self, kind: OpKind, op: Op) -> io::Result<()> {
        self.delay().await;
        let mut st = self.lock();
        self.admit(&mut st, kind)?;
        let end = match &op {
            Op::Write { offset, data } => end_of(*offset, len64(data.len()))?,
            Op::Zero { offset, len } => end_of(*offset, *len)?,
            Op::Punch { offset, len } => {
                end_of(*offset, *len)?;
                0
            }
            Op::SetLen { len } => *len,
        };
        self.check_size(end)?;
        if let Op::Write { data, .. } = &op {
            let grow_by = end.saturating_sub(len64(st.visible.len()));
            // Reserve up front so that a huge (but allowed) size fails cleanly instead of aborting.
            st.visible.try_reserve(grow_by as usize).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("cannot grow fault backend to {end} bytes"),
                )
            })?;
            if data.is_empty() {
                return Ok(());
            }
        }
        op.apply(&mut st.visible);
        let seq = st.next_seq;
        st.next_seq += 1;
        st.epoch.push((seq, op));
        Ok(())
    }
}

/// The durable image plus the operations of `epoch` that `mode` and `seed` keep, in completion order.
fn cut(durable: &[u8], epoch: &[(u64, Op)], mode: CutMode, seed: u64) -> Vec<u8> {
    let mut rng = seed ^ 0x6a09_e667_f3bc_c908;
    let mode = match mode {
        CutMode::Any => match below(&mut rng, 5) {
            0 => CutMode::Nothing,
            1 => CutMode::All,
            2 => CutMode::Prefix,
            3 => CutMode::Subset,
            _ => CutMode::Torn,
        },
        m => m,
    };
    let mut data = durable.to_vec();
    match mode {
        CutMode::Nothing => {}
        CutMode::All => epoch.iter().for_each(|(_, op)| op.apply(&mut data)),
        CutMode::Prefix => {
            let keep = below(&mut rng, len64(epoch.len()) + 1) as usize;
            epoch[..keep].iter().for_each(|(_, op)| op.apply(&mut data));
        }
        CutMode::Subset => {
            // A seeded keep probability (in 1/8 steps) so that both "almost nothing" and "almost
            // everything" cuts happen, not just half-and-half ones.
            let p = below(&mut rng, 9);
            for (_, op) in epoch {
                if below(&mut rng, 8) < p {
                    op.apply(&mut data);
                }
            }
        }
        CutMode::Torn => epoch
            .iter()
            .for_each(|(_, op)| op.apply_torn(&mut data, &mut rng)),
        CutMode::Any => unreachable!("resolved above"),
    }
    data
}

impl Backend for FaultBackend {
    async fn read_at(&self, mut buf: BytesMut, offset: u64) -> (io::Result<usize>, BytesMut) {
        self.delay().await;
        let mut st = self.lock();
        if let Err(e) = self.admit(&mut st, OpKind::Read) {
            return (Err(e), buf);
        }
        if let Err(e) = end_of(offset, len64(buf.len())) {
            return (Err(e), buf);
        }
        let have = len64(st.visible.len()).saturating_sub(offset);
        // `have` is at most the vector's length, so it fits usize.
        let n = have.min(len64(buf.len())) as usize;
        if n > 0 {
            let start = offset as usize;
            buf[..n].copy_from_slice(&st.visible[start..start + n]);
        }
        buf[n..].fill(0);
        (Ok(n), buf)
    }

    async fn write_at(&self, buf: Bytes, offset: u64) -> io::Result<()> {
        self.writev_at(vec![buf], offset).await
    }

    async fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        let total = bufs
            .iter()
            .try_fold(0u64, |acc, b| acc.checked_add(len64(b.len())))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffers too large"))?;
        // The size is checked (in `mutate`) before this copy is used, but the copy itself must not be
        // attempted for absurd totals either.
        self.check_size(end_of(offset, total)?)?;
        let data = bufs.concat();
        self.mutate(OpKind::Write, Op::Write { offset, data }).await
    }

    async fn flush(&self) -> io::Result<()> {
        // A flush covers the operations completed before it was issued (here: first polled); those that
        // complete while it is pending are not guaranteed durable by it.
        let issued_at = self.lock().next_seq;
        self.delay().await;
        let mut st = self.lock();
        if let Err(e) = self.admit(&mut st, OpKind::Flush) {
            // As Linux may drop the dirty pages of a failed fdatasync, the epoch's writes stay not durable
            // and no later flush may claim otherwise.
            st.flush_failed = true;
            return Err(e);
        }
        if st.flush_failed {
            return Err(eio());
        }
        let st = &mut *st;
        let done = st.epoch.iter().take_while(|(s, _)| *s < issued_at).count();
        for (_, op) in st.epoch.drain(..done) {
            op.apply(&mut st.durable);
        }
        Ok(())
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            end_of(offset, len)?;
            return Ok(());
        }
        self.mutate(OpKind::ZeroRange, Op::Zero { offset, len })
            .await
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(OpKind::PunchHole, Op::Punch { offset, len })
            .await
    }

    async fn len(&self) -> io::Result<u64> {
        let st = self.lock();
        if st.crash_image.is_some() {
            return Err(eio());
        }
        Ok(len64(st.visible.len()))
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.mutate(OpKind::SetLen, Op::SetLen { len }).await
    }

    async fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        let st = self.lock();
        if st.crash_image.is_some() {
            return Err(eio());
        }
        let size = len64(st.visible.len());
        Ok(if offset < size {
            HostStatus {
                data: true,
                len: (size - offset).min(max_len),
            }
        } else {
            HostStatus {
                data: false,
                len: max_len,
            }
        })
    }

    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(Some(len64(self.lock().visible.len())))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test runtime")
            .block_on(f)
    }

    const BASE: u8 = 0xee;
    const WRITES: usize = 8;
    /// Each test write covers two sectors, so a torn write is visible as one sector kept and one not.
    const WLEN: usize = 2 * SECTOR_SIZE as usize;

    /// A backend whose durable image is `WRITES * WLEN` bytes of `BASE`, with `WRITES` disjoint unflushed
    /// writes, write `i` filling its range with `i + 1`.
    async fn epoch_of_disjoint_writes() -> FaultBackend {
        let b = FaultBackend::new(vec![BASE; WRITES * WLEN]);
        for i in 0..WRITES {
            b.write_at(Bytes::from(vec![i as u8 + 1; WLEN]), (i * WLEN) as u64)
                .await
                .unwrap();
        }
        b
    }

    /// Per write: which of its sectors the image holds (`true` = new data); panics on any other byte.
    fn sectors_kept(img: &[u8]) -> Vec<[bool; 2]> {
        assert_eq!(img.len(), WRITES * WLEN);
        (0..WRITES)
            .map(|i| {
                let mut kept = [false; 2];
                for (s, k) in kept.iter_mut().enumerate() {
                    let start = i * WLEN + s * SECTOR_SIZE as usize;
                    let sector = &img[start..start + SECTOR_SIZE as usize];
                    let v = sector[0];
                    assert!(sector.iter().all(|&x| x == v), "sector torn inside");
                    assert!(v == BASE || v == i as u8 + 1, "foreign byte {v:#x}");
                    *k = v != BASE;
                }
                kept
            })
            .collect()
    }

    #[test]
    fn power_cut_modes_keep_exactly_their_subsets() {
        block_on(async {
            let b = epoch_of_disjoint_writes().await;
            assert_eq!(b.power_cut(CutMode::Nothing, 1), b.durable());
            assert_eq!(b.durable(), vec![BASE; WRITES * WLEN]);
            assert_eq!(b.power_cut(CutMode::All, 1), b.contents());
            let (mut prefixes, mut subsets, mut torn) = (BTreeSet::new(), 0, 0);
            for seed in 0..200 {
                // Prefix: writes 0..k whole, nothing after.
                let kept = sectors_kept(&b.power_cut(CutMode::Prefix, seed));
                let k = kept.iter().take_while(|s| s[0] && s[1]).count();
                assert!(kept[k..].iter().all(|s| !s[0] && !s[1]), "not a prefix");
                prefixes.insert(k);
                // Subset: any writes, each whole.
                let kept = sectors_kept(&b.power_cut(CutMode::Subset, seed));
                assert!(kept.iter().all(|s| s[0] == s[1]), "subset tore a write");
                let whole: Vec<bool> = kept.iter().map(|s| s[0]).collect();
                if whole.windows(2).any(|w| !w[0] && w[1]) {
                    subsets += 1; // not a prefix: a reordering happened
                }
                // Torn: any sectors (checked by sectors_kept); count writes torn in half.
                let kept = sectors_kept(&b.power_cut(CutMode::Torn, seed));
                torn += kept.iter().filter(|s| s[0] != s[1]).count();
                // Any: one of the above, so at least well-formed sectors; same seed, same image.
                sectors_kept(&b.power_cut(CutMode::Any, seed));
                assert_eq!(
                    b.power_cut(CutMode::Any, seed),
                    b.power_cut(CutMode::Any, seed)
                );
            }
            assert_eq!(prefixes.len(), WRITES + 1, "every prefix length occurs");
            assert!(subsets > 20, "subsets reorder: {subsets}");
            assert!(torn > 100, "torn cuts tear writes: {torn}");
            // The cut does not change the backend.
            assert_eq!(b.durable(), vec![BASE; WRITES * WLEN]);
        });
    }

    #[test]
    fn cut_applies_kept_ops_in_completion_order_and_keeps_non_writes_whole() {
        block_on(async {
            let b = FaultBackend::new(vec![1; 1024]);
            b.write_at(Bytes::from(vec![2; 1024]), 0).await.unwrap();
            b.write_at(Bytes::from(vec![3; 1024]), 0).await.unwrap();
            b.set_len(4096).await.unwrap();
            b.zero_range(0, 1024).await.unwrap();
            let mut seen = BTreeSet::new();
            for seed in 0..300 {
                for mode in [CutMode::Prefix, CutMode::Subset] {
                    let img = b.power_cut(mode, seed);
                    assert!(img.len() == 1024 || img.len() == 4096, "set_len torn");
                    let v = img[0];
                    assert!(img[..1024].iter().all(|&x| x == v));
                    assert!(img[1024..].iter().all(|&x| x == 0));
                    seen.insert((img.len(), v));
                    if mode == CutMode::Prefix && v == 2 {
                        assert_eq!(
                            img.len(),
                            1024,
                            "prefix kept set_len but not the second write"
                        );
                    }
                }
                // Torn (and Any, which may tear): every sector holds a value some kept op gave it.
                for img in [
                    b.power_cut(CutMode::Torn, seed),
                    b.power_cut(CutMode::Any, seed),
                ] {
                    assert!(img.len() == 1024 || img.len() == 4096);
                    for sector in img[..1024].chunks(SECTOR_SIZE as usize) {
                        assert!(sector.iter().all(|&x| x == sector[0]));
                        assert!([0, 1, 2, 3].contains(&sector[0]));
                    }
                }
            }
            for v in [0, 1, 2, 3] {
                assert!(seen.contains(&(4096, v)) || seen.contains(&(1024, v)));
            }
            assert!(seen.contains(&(1024, 1)) && seen.contains(&(4096, 0)));
        });
    }

    #[test]
    fn flush_makes_the_epoch_durable() {
        block_on(async {
            let b = FaultBackend::new(vec![0; 512]);
            b.write_at(Bytes::from(vec![7; 512]), 512).await.unwrap();
            assert_eq!(b.durable().len(), 512);
            b.flush().await.unwrap();
            assert_eq!(b.durable(), b.contents());
            for seed in 0..20 {
                assert_eq!(b.power_cut(CutMode::Any, seed), b.contents());
            }
            assert_eq!(b.op_counts(), (0, 2, 1));
        });
    }

    #[test]
    fn flush_covers_only_ops_completed_before_it_was_issued() {
        use std::future::Future;
        use std::task::{Context, Waker};
        let b = FaultBackend::new(vec![0; 512]).with_schedule(3, 1000);
        let mut flush = std::pin::pin!(b.flush());
        // First poll: the flush is issued and starts its seeded delay.
        let first = flush.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(first.is_pending(), "seed 3 delays the flush");
        block_on(async {
            b.write_at(Bytes::from(vec![1; 512]), 0).await.unwrap();
            flush.as_mut().await.unwrap();
        });
        assert_eq!(b.contents(), vec![1; 512]);
        assert_eq!(
            b.durable(),
            vec![0; 512],
            "the write completed after the flush was issued"
        );
        assert_eq!(b.power_cut(CutMode::Nothing, 0), vec![0; 512]);
        block_on(b.flush()).unwrap();
        assert_eq!(b.durable(), vec![1; 512]);
    }

    #[test]
    fn failed_flush_is_sticky_and_leaves_the_epoch_not_durable() {
        block_on(async {
            let b = FaultBackend::new(vec![0; 512]);
            b.fail_op(OpKind::Flush, 0, InjectedError::Eio);
            b.write_at(Bytes::from(vec![5; 512]), 0).await.unwrap();
            let e = b.flush().await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert!(b.flush_failed());
            for _ in 0..3 {
                b.write_at(Bytes::from(vec![6; 512]), 0).await.unwrap();
                assert_eq!(b.flush().await.unwrap_err().raw_os_error(), Some(libc::EIO));
            }
            assert_eq!(b.durable(), vec![0; 512]);
            assert_eq!(b.power_cut(CutMode::Nothing, 0), vec![0; 512]);
            assert_eq!(b.power_cut(CutMode::All, 0), vec![6; 512]);
            // Reads and writes still work: only durability is lost.
            assert_eq!(b.contents(), vec![6; 512]);
        });
    }

    #[test]
    fn fail_op_fails_the_nth_op_of_its_kind_without_effect() {
        block_on(async {
            let b = FaultBackend::new(vec![0; 1024]);
            b.fail_op(OpKind::Write, 1, InjectedError::Enospc);
            b.fail_op(OpKind::AnyWrite, 3, InjectedError::Eio);
            b.fail_op(OpKind::Read, 0, InjectedError::Eio);
            let w = |v: u8, off: u64| b.write_at(Bytes::from(vec![v; 256]), off);
            w(1, 0).await.unwrap(); // write 0, any-write 0
            let e = w(2, 256).await.unwrap_err(); // write 1: fails ENOSPC; any-write 1
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
            b.zero_range(0, 10).await.unwrap(); // any-write 2
            b.flush().await.unwrap(); // not an any-write
            let e = b.punch_hole(0, 512).await.unwrap_err(); // any-write 3: fails EIO
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert_eq!(b.armed_failures(), 1, "the read failure is still armed");
            w(3, 512).await.unwrap();
            let (r, buf) = b.read_at(BytesMut::zeroed(16), 0).await;
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
            assert_eq!(buf.len(), 16, "the buffer comes back");
            let (r, buf) = b.read_at(BytesMut::zeroed(1024), 0).await;
            assert_eq!(r.unwrap(), 1024);
            let mut want = vec![0u8; 1024];
            want[10..256].fill(1);
            want[512..768].fill(3);
            assert_eq!(&buf[..], &want[..]);
            assert_eq!(b.contents(), want);
            assert_eq!(b.armed_failures(), 0);
            b.fail_op(OpKind::Read, 0, InjectedError::Eio);
            b.clear_failures();
            assert!(b.read_at(BytesMut::zeroed(1), 0).await.0.is_ok());
        });
    }

    #[test]
    fn crash_after_takes_the_image_and_then_fails_everything() {
        block_on(async {
            let b = FaultBackend::new(vec![0; 512]);
            b.write_at(Bytes::from(vec![1; 512]), 0).await.unwrap();
            b.crash_after(2, CutMode::All, 9);
            b.write_at(Bytes::from(vec![2; 512]), 0).await.unwrap(); // op 0
            b.flush().await.unwrap(); // op 1 (flushes count)
            let before = b.contents();
            assert!(b.crash_image().is_none() && !b.crashed());
            let e = b.write_at(Bytes::from(vec![3; 512]), 0).await.unwrap_err(); // op 2: crash
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert_eq!(b.crash_image(), Some(before.clone()));
            assert_eq!(b.contents(), before, "the crashing op has no effect");
            assert!(b.read_at(BytesMut::zeroed(8), 0).await.0.is_err());
            assert!(b.flush().await.is_err());
            assert!(b.len().await.is_err());
            assert!(b.zero_range(0, 8).await.is_err());
            assert_eq!(b.crash_image(), Some(before));

            // With Nothing, the crash image is the durable state.
            let b = FaultBackend::new(vec![0; 512]);
            b.crash_after(1, CutMode::Nothing, 0);
            b.write_at(Bytes::from(vec![4; 512]), 0).await.unwrap();
            assert!(b.set_len(0).await.is_err());
            assert_eq!(b.crash_image(), Some(vec![0; 512]));
        });
    }

    /// Runs `tasks` concurrent writers on a current-thread runtime with the schedule `seed`; returns the
    /// order in which their writes completed.
    fn completion_order(seed: u64, tasks: u8) -> Vec<u8> {
        block_on(async {
            let b = FaultBackend::new(Vec::new()).with_schedule(seed, 8);
            let order = Arc::new(Mutex::new(Vec::new()));
            let handles: Vec<_> = (0..tasks)
                .map(|t| {
                    let (b, order) = (b.clone(), order.clone());
                    tokio::spawn(async move {
                        for i in 0..3u64 {
                            b.write_at(Bytes::from(vec![t; 16]), u64::from(t) * 64 + i * 16)
                                .await
                                .unwrap();
                            order.lock().unwrap().push(t);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.await.unwrap();
            }
            let v = order.lock().unwrap().clone();
            v
        })
    }

    #[test]
    fn schedule_replays_per_seed_and_varies_across_seeds() {
        let a = completion_order(42, 6);
        assert_eq!(a.len(), 18);
        assert_eq!(a, completion_order(42, 6), "same seed, same order");
        let distinct: BTreeSet<Vec<u8>> = (0..10).map(|s| completion_order(s, 6)).collect();
        assert!(
            distinct.len() >= 5,
            "seeds explore orders: {}",
            distinct.len()
        );
        // Without a schedule, tasks run in spawn order.
        let plain = block_on(async {
            let b = FaultBackend::new(Vec::new());
            b.write_at(Bytes::from_static(b"x"), 0).await.unwrap();
            b.op_counts()
        });
        assert_eq!(plain, (0, 1, 0));
    }

    #[test]
    fn max_size_bounds_growth_and_reads_past_eof_zero_fill() {
        block_on(async {
            let b = FaultBackend::new(vec![9; 100]).with_max_size(1 << 20);
            assert!(b.write_at(Bytes::from_static(b"x"), 1 << 40).await.is_err());
            assert!(b
                .write_at(Bytes::from_static(b"x"), u64::MAX)
                .await
                .is_err());
            assert!(b.zero_range(1 << 40, 1).await.is_err());
            assert!(b.zero_range(u64::MAX, 2).await.is_err());
            assert!(b.set_len(1 << 40).await.is_err());
            assert!(b.punch_hole(u64::MAX, 2).await.is_err());
            b.punch_hole(1 << 40, 1 << 40).await.unwrap();
            let (r, _) = b.read_at(BytesMut::zeroed(16), u64::MAX - 3).await;
            assert!(r.is_err());
            let (r, buf) = b.read_at(BytesMut::from(&[1u8; 16][..]), 96).await;
            assert_eq!(r.unwrap(), 4);
            assert_eq!(&buf[..], &[9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(b.len().await.unwrap(), 100);
            b.write_at(Bytes::from_static(b"ok"), (1 << 20) - 2)
                .await
                .unwrap();
            assert_eq!(b.len().await.unwrap(), 1 << 20);
            assert_eq!(
                b.host_status(1 << 20, 10).await.unwrap(),
                HostStatus {
                    data: false,
                    len: 10
                }
            );
            assert_eq!(b.power_cut(CutMode::Nothing, 0).len(), 100);
        });
    }

    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: T) {}
        let b = FaultBackend::new(Vec::new());
        send(b.read_at(BytesMut::new(), 0));
        send(b.writev_at(Vec::new(), 0));
        send(b.flush());
        send(b.zero_range(0, 0));
        send(b.punch_hole(0, 0));
        send(b.set_len(0));
        send(b.len());
        send(b.host_status(0, 0));
        send(b.allocated_size());
    }
}
