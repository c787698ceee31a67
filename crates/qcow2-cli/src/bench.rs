//! `bench`: qemu-img bench's request pattern and messages, in read mode and in write mode (`-w`).
//!
//! `count` requests of `bufsize` bytes, `depth` of them in flight; the first at `offset`, each next one
//! `step` bytes further, wrapping so that every request stays inside the image (qemu-img's current rule:
//! modulo `image_size - bufsize`, or 0 when the image is not larger than one request).

use std::cell::RefCell;
use std::time::{Duration, Instant};

use std::future::Future;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};

use crate::error::CliError;

/// The parameters of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchParams {
    /// Number of requests.
    pub count: u64,
    /// Requests in flight.
    pub depth: usize,
    /// Bytes per request.
    pub bufsize: u64,
    /// First offset.
    pub offset: u64,
    /// Offset increment.
    pub step: u64,
}

impl BenchParams {
    /// qemu-img's first line: `Sending N read requests, B bytes each, D in parallel (starting at offset O,
    /// step size S)`.
    pub fn banner(&self, write: bool) -> String {
        format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            self.count,
            if write { "write" } else { "read" },
            self.bufsize,
            self.depth,
            self.offset,
            self.step
        )
    }
}

/// qemu-img's last line.
pub fn completed_line(elapsed: Duration) -> String {
    format!("Run completed in {:.3} seconds.", elapsed.as_secs_f64())
}

/// The offset after `offset` (qemu-img's wrap rule).
pub fn next_offset(offset: u64, step: u64, image_size: u64, bufsize: u64) -> u64 {
    let next = offset.saturating_add(step);
    if image_size <= bufsize {
        0
    } else {
        next % (image_size - bufsize)
    }
}

/// The offset of request number `index` (0-based): the first request is at `offset` as given, each later
/// one `step` further, wrapped as [`next_offset`] does.
pub fn offset_of(p: BenchParams, image_size: u64, index: u64) -> u64 {
    if index == 0 {
        return p.offset;
    }
    if image_size <= p.bufsize {
        return 0;
    }
    let m = u128::from(image_size - p.bufsize);
    // (a % m + s) % m == (a + s) % m, so the recurrence has this closed form.
    ((u128::from(p.offset) + u128::from(index) * u128::from(p.step)) % m) as u64
}

/// The offsets of all requests, in submission order.
pub fn offsets(p: BenchParams, image_size: u64) -> impl Iterator<Item = u64> {
    let mut next = p.offset;
    (0..p.count).map(move |_| {
        let this = next;
        next = next_offset(this, p.step, image_size, p.bufsize);
        this
    })
}

/// What the read benchmark reads from: owned-buffer reads, so that an engine can hand the buffer straight
/// to its backend (no copy, no bounce with `O_DIRECT`).
pub trait BenchTarget {
    /// The size in bytes (requests stay inside it).
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset` into `buf` and hands it back.
    fn read_owned(
        &self,
        offset: u64,
        buf: BytesMut,
    ) -> impl Future<Output = Result<BytesMut, CliError>>;

    /// Writes `data` at `offset` (write mode). Targets that cannot write keep this default, which
    /// refuses.
    fn write_owned(&self, offset: u64, data: Bytes) -> impl Future<Output = Result<(), CliError>> {
        let _ = (offset, data);
        std::future::ready(Err(CliError::other("bench: this target cannot be written")))
    }

    /// Makes completed writes durable (write mode, `--flush-interval`).
    fn flush(&self) -> impl Future<Output = Result<(), CliError>> {
        std::future::ready(Ok(()))
    }
}

/// `--flush-interval` of write mode: a flush after every `interval` completed requests; with `drain`
/// (the default) no new request starts until the in-flight ones have completed and the flush is done,
/// as qemu-img bench drains its queue before each flush; with `--no-drain` the flush runs alongside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushPlan {
    /// Completed requests between two flushes (> 0).
    pub interval: u64,
    /// Drain the queue before each flush.
    pub drain: bool,
}

/// qemu-img bench's second line in write mode with `--flush-interval`.
pub fn flush_line(interval: u64) -> String {
    format!("Sending flush every {interval} requests")
}

/// One write buffer per worker, each `bufsize` bytes of `pattern`, aligned for `O_DIRECT`; every request
/// of a worker sends a clone of its buffer (a reference count, not a copy).
pub fn pattern_buffers(workers: u64, bufsize: usize, pattern: u8) -> Vec<Bytes> {
    worker_buffers(workers, bufsize)
        .into_iter()
        .map(|mut b| {
            b.fill(pattern);
            b.freeze()
        })
        .collect()
}

/// Counts completed requests and runs the flushes of a [`FlushPlan`]. Requests hold a read guard of
/// `gate` while in flight; a draining flush takes the write guard, which waits for the in-flight ones
/// and holds back new ones (Tokio's lock is fair: queued writers go before later readers).
pub struct Flusher {
    plan: Option<FlushPlan>,
    done: std::sync::atomic::AtomicU64,
    gate: tokio::sync::RwLock<()>,
}

impl Flusher {
    /// A flusher for `plan` (`None`: no flushes, no locking).
    pub fn new(plan: Option<FlushPlan>) -> Flusher {
        Flusher {
            plan,
            done: std::sync::atomic::AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
        }
    }

    /// Runs one write request under the flush rules.
    pub async fn write<T: BenchTarget>(
        &self,
        target: &T,
        offset: u64,
        data: Bytes,
    ) -> Result<(), CliError> {
        let Some(plan) = self.plan else {
            return target.write_owned(offset, data).await;
        };
        {
            let _in_flight = self.gate.read().await;
            target.write_owned(offset, data).await?;
        }
        let n = self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_multiple_of(plan.interval) {
            if plan.drain {
                let _drained = self.gate.write().await;
                target.flush().await?;
            } else {
                target.flush().await?;
            }
        }
        Ok(())
    }
}

/// Runs the write benchmark (`-w`): as [`run_read`], each worker writing its pattern buffer; returns
/// the elapsed time (the final flush or close is the caller's, outside the measured time, as in
/// qemu-img bench).
pub async fn run_write<T: BenchTarget>(
    target: &T,
    p: BenchParams,
    pattern: u8,
    flush: Option<FlushPlan>,
) -> Result<Duration, CliError> {
    let size = target.size();
    let next = RefCell::new(offsets(p, size));
    let next = &next;
    let flusher = Flusher::new(flush);
    let flusher = &flusher;
    let workers = u64::try_from(p.depth.max(1))
        .unwrap_or(u64::MAX)
        .min(p.count.max(1));
    // The caller bounded bufsize (<= i32::MAX) and depth * bufsize (<= 4 GiB).
    let mut bufs = pattern_buffers(workers, p.bufsize as usize, pattern);
    let start = Instant::now();
    let mut running: FuturesUnordered<_> = std::iter::from_fn(|| bufs.pop())
        .map(|buf| async move {
            loop {
                let Some(off) = next.borrow_mut().next() else {
                    return Ok::<(), CliError>(());
                };
                flusher.write(target, off, buf.clone()).await?;
            }
        })
        .collect();
    while let Some(done) = running.next().await {
        done?;
    }
    Ok(start.elapsed())
}

/// One buffer of `bufsize` bytes per worker, each aligned to `qcow2_io::DIRECT_ALIGN`. When `bufsize`
/// is a multiple of the alignment they are carved out of one allocation, as qemu-img bench does (one
/// large mapping: the kernel pins its pages for each `O_DIRECT` transfer a little faster than scattered
/// heap chunks); otherwise each gets its own, so that odd sizes do not waste a block per worker.
fn worker_buffers(workers: u64, bufsize: usize) -> Vec<BytesMut> {
    let n = usize::try_from(workers).unwrap_or(usize::MAX);
    let whole = n.checked_mul(bufsize);
    match whole {
        Some(total) if bufsize > 0 && bufsize.is_multiple_of(qcow2_io::DIRECT_ALIGN) => {
            let mut all = qcow2_io::aligned::aligned_bytes_mut(total);
            // Each part starts a multiple of bufsize (hence of DIRECT_ALIGN) after an aligned start.
            (0..n).map(|_| all.split_to(bufsize)).collect()
        }
        _ => (0..n)
            .map(|_| qcow2_io::aligned::aligned_bytes_mut(bufsize))
            .collect(),
    }
}

/// Runs the read benchmark; returns the elapsed time.
///
/// `depth` workers run concurrently on the current task, each with one buffer (aligned for `O_DIRECT`)
/// that it reuses for every request: a worker takes the next request in submission order whenever its
/// previous one completes, as qemu-img bench issues a new request when one finishes. Nothing is
/// allocated per request.
pub async fn run_read<T: BenchTarget>(target: &T, p: BenchParams) -> Result<Duration, CliError> {
    let size = target.size();
    let next = RefCell::new(offsets(p, size));
    let next = &next;
    // The caller bounded bufsize (<= i32::MAX) and depth * bufsize (<= 4 GiB).
    let bufsize = p.bufsize as usize;
    let workers = u64::try_from(p.depth.max(1))
        .unwrap_or(u64::MAX)
        .min(p.count.max(1));
    let mut bufs = worker_buffers(workers, bufsize);
    let start = Instant::now();
    let mut running: FuturesUnordered<_> = std::iter::from_fn(|| bufs.pop())
        .map(|mut buf| async move {
            loop {
                // The borrow ends before the await.
                let Some(off) = next.borrow_mut().next() else {
                    return Ok::<(), CliError>(());
                };
                buf = target.read_owned(off, buf).await?;
            }
        })
        .collect();
    while let Some(done) = running.next().await {
        done?;
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mem::MemImage;
    use crate::source::BlockSource;

    impl BenchTarget for MemImage {
        fn size(&self) -> u64 {
            BlockSource::size(self)
        }

        async fn read_owned(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut, CliError> {
            self.read(offset, &mut buf).await?;
            Ok(buf)
        }
    }

    #[test]
    fn banner_and_completion() {
        let p = BenchParams {
            count: 75000,
            depth: 64,
            bufsize: 4096,
            offset: 0,
            step: 4096,
        };
        assert_eq!(
            p.banner(false),
            "Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)"
        );
        assert_eq!(
            completed_line(Duration::from_millis(169)),
            "Run completed in 0.169 seconds."
        );
    }

    #[test]
    fn offsets_wrap_inside_the_image() {
        let p = BenchParams {
            count: 6,
            depth: 2,
            bufsize: 4096,
            offset: 4096,
            step: 8192,
        };
        let v: Vec<u64> = offsets(p, 16384).collect();
        // usable = 12288: 4096, 12288 % 12288 = 0, 8192, 16384 % 12288 = 4096, ...
        assert_eq!(v, vec![4096, 0, 8192, 4096, 0, 8192]);
        let v: Vec<u64> = offsets(
            BenchParams {
                count: 3,
                depth: 1,
                bufsize: 4096,
                offset: 0,
                step: 4096,
            },
            4096,
        )
        .collect();
        assert_eq!(v, vec![0, 0, 0]);
    }

    #[test]
    fn runs_against_memory() {
        let src = MemImage::dense("m", vec![7u8; 1 << 20]);
        let p = BenchParams {
            count: 1000,
            depth: 8,
            bufsize: 4096,
            offset: 0,
            step: 4096,
        };
        let rt = tokio::runtime::Builder::new_current_thread().build();
        let ok = match rt {
            Ok(rt) => rt.block_on(run_read(&src, p)).is_ok(),
            Err(_) => false,
        };
        assert!(ok);
    }

    /// Records the requests and the largest number in flight at once.
    struct Recorder {
        size: u64,
        seen: RefCell<Vec<u64>>,
        in_flight: std::cell::Cell<usize>,
        max_in_flight: std::cell::Cell<usize>,
    }

    impl BenchTarget for Recorder {
        fn size(&self) -> u64 {
            self.size
        }

        async fn read_owned(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, CliError> {
            assert_eq!(buf.len(), 8192);
            assert_eq!(buf.as_ptr() as usize % qcow2_io::DIRECT_ALIGN, 0);
            self.seen.borrow_mut().push(offset);
            let n = self.in_flight.get() + 1;
            self.in_flight.set(n);
            self.max_in_flight.set(self.max_in_flight.get().max(n));
            tokio::task::yield_now().await;
            self.in_flight.set(self.in_flight.get() - 1);
            Ok(buf)
        }
    }

    /// Records writes (offset, first byte) and flushes.
    struct WriteRecorder {
        writes: RefCell<Vec<(u64, u8)>>,
        flushes: std::cell::Cell<u32>,
    }

    impl BenchTarget for WriteRecorder {
        fn size(&self) -> u64 {
            1 << 20
        }

        async fn read_owned(&self, _offset: u64, buf: BytesMut) -> Result<BytesMut, CliError> {
            Ok(buf)
        }

        async fn write_owned(&self, offset: u64, data: Bytes) -> Result<(), CliError> {
            assert_eq!(data.as_ptr() as usize % qcow2_io::DIRECT_ALIGN, 0);
            self.writes.borrow_mut().push((offset, data[0]));
            tokio::task::yield_now().await;
            Ok(())
        }

        async fn flush(&self) -> Result<(), CliError> {
            self.flushes.set(self.flushes.get() + 1);
            Ok(())
        }
    }

    #[test]
    fn write_mode_writes_the_pattern_and_flushes() {
        let p = BenchParams {
            count: 100,
            depth: 4,
            bufsize: 4096,
            offset: 0,
            step: 4096,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for drain in [true, false] {
            let r = WriteRecorder {
                writes: RefCell::new(Vec::new()),
                flushes: std::cell::Cell::new(0),
            };
            let plan = FlushPlan {
                interval: 10,
                drain,
            };
            rt.block_on(run_write(&r, p, 0x5a, Some(plan)))
                .expect("bench");
            let w = r.writes.borrow();
            assert_eq!(w.len(), 100);
            assert!(w.iter().all(|&(_, b)| b == 0x5a));
            // Every request once (a worker waiting at a draining flush may record its offset late).
            let mut want: Vec<u64> = offsets(p, 1 << 20).collect();
            let mut got: Vec<u64> = w.iter().map(|&(o, _)| o).collect();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want);
            assert_eq!(r.flushes.get(), 10);
        }
        assert_eq!(flush_line(10), "Sending flush every 10 requests");
    }

    #[test]
    fn workers_issue_every_request_once_in_order() {
        let p = BenchParams {
            count: 500,
            depth: 7,
            bufsize: 8192,
            offset: 4096,
            step: 12288,
        };
        let r = Recorder {
            size: 1 << 20,
            seen: RefCell::new(Vec::new()),
            in_flight: std::cell::Cell::new(0),
            max_in_flight: std::cell::Cell::new(0),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(run_read(&r, p)).expect("bench");
        let want: Vec<u64> = offsets(p, 1 << 20).collect();
        // Submission order is the request order: each worker takes the next one.
        assert_eq!(*r.seen.borrow(), want);
        assert_eq!(r.max_in_flight.get(), 7);
        assert_eq!(worker_buffers(3, 1000).len(), 3);
    }
}
