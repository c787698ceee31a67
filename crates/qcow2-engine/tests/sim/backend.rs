//! The simulation's backend and its random numbers.
//!
//! `SimBackend` is a local scheduling wrapper around `MemoryBackend`, with the shape of the
//! fault-injecting backend's schedule API (`new(bytes).with_schedule(seed, max_delay)`): every
//! operation, when first polled, yields to the runtime a seeded number of times in `0..=max_delay`
//! before it takes effect, all operations drawing from one shared generator. On a current-thread
//! runtime that makes each seed one reproducible interleaving of the engine's concurrent requests.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use qcow2_io::{Backend, HostStatus, MemoryBackend};

/// splitmix64: small, fast, good enough to drive workloads and schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

struct Schedule {
    rng: Rng,
    max_delay: u32,
}

/// A memory file whose every operation yields a seeded number of times before it takes effect.
/// Clones share the contents and the schedule.
#[derive(Clone)]
pub struct SimBackend {
    mem: MemoryBackend,
    schedule: Option<Arc<Mutex<Schedule>>>,
}

impl SimBackend {
    pub fn new(bytes: Vec<u8>) -> SimBackend {
        SimBackend {
            mem: MemoryBackend::from_vec(bytes),
            schedule: None,
        }
    }

    pub fn with_schedule(mut self, seed: u64, max_delay: u32) -> SimBackend {
        self.schedule = Some(Arc::new(Mutex::new(Schedule {
            rng: Rng::new(seed),
            max_delay,
        })));
        self
    }

    pub fn contents(&self) -> Vec<u8> {
        self.mem.contents()
    }

    async fn delay(&self) {
        let n = match &self.schedule {
            Some(s) => {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                let max = u64::from(s.max_delay);
                s.rng.below(max + 1)
            }
            None => 0,
        };
        for _ in 0..n {
            tokio::task::yield_now().await;
        }
    }
}

impl Backend for SimBackend {
    async fn read_at(&self, buf: BytesMut, offset: u64) -> (io::Result<usize>, BytesMut) {
        self.delay().await;
        self.mem.read_at(buf, offset).await
    }

    async fn write_at(&self, buf: Bytes, offset: u64) -> io::Result<()> {
        self.delay().await;
        self.mem.write_at(buf, offset).await
    }

    async fn writev_at(&self, bufs: Vec<Bytes>, offset: u64) -> io::Result<()> {
        self.delay().await;
        self.mem.writev_at(bufs, offset).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.delay().await;
        self.mem.flush().await
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.delay().await;
        self.mem.zero_range(offset, len).await
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.delay().await;
        self.mem.punch_hole(offset, len).await
    }

    async fn len(&self) -> io::Result<u64> {
        self.delay().await;
        self.mem.len().await
    }

    async fn set_len(&self, len: u64) -> io::Result<()> {
        self.delay().await;
        self.mem.set_len(len).await
    }

    async fn host_status(&self, offset: u64, max_len: u64) -> io::Result<HostStatus> {
        self.mem.host_status(offset, max_len).await
    }

    async fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.mem.allocated_size().await
    }
}
