//! `bench` (read mode): qemu-img bench's request pattern and messages.
//!
//! `count` requests of `bufsize` bytes, `depth` of them in flight; the first at `offset`, each next one
//! `step` bytes further, wrapping so that every request stays inside the image (qemu-img's current rule:
//! modulo `image_size - bufsize`, or 0 when the image is not larger than one request).

use std::cell::RefCell;
use std::time::{Duration, Instant};

use std::future::Future;

use bytes::BytesMut;
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
