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
    /// Linux semantics for a failed flush (see [`FaultBackend::with_lossy_flush_failures`]).
    lossy_flush: bool,
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
                lossy_flush: false,
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

    /// Makes a failed flush behave as Linux's `fdatasync` does since 4.13 instead of sticky: the error is
    /// reported once, the writes it covered are dropped (they stay visible, as in the page cache, but
    /// never become durable), and later flushes succeed. The engine must then remember the failure
    /// itself; with the default sticky backend a test could not tell whether it does.
    pub fn with_lossy_flush_failures(self) -> FaultBackend {
        self.lock().lossy_flush = true;
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
            // and (sticky by default) no later flush may claim otherwise.
            st.flush_failed = true;
            if st.lossy_flush && st.crash_image.is_none() {
                st.epoch.retain(|(s, _)| *s >= issued_at);
            }
            return Err(e);
        }
        if st.flush_failed && !st.lossy_flush {
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
        Ok(crate::memory::vec_host_status(
            len64(st.visible.len()),
            offset,
            max_len,
        ))
    }

    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(Some(len64(self.lock().visible.len())))
    }
}

#[cfg(test)]
mod tests;
