//! `bench` (read mode): qemu-img bench's request pattern and messages.
//!
//! `count` requests of `bufsize` bytes, `depth` of them in flight; the first at `offset`, each next one
//! `step` bytes further, wrapping so that every request stays inside the image (qemu-img's current rule:
//! modulo `image_size - bufsize`, or 0 when the image is not larger than one request).

use std::cell::RefCell;
use std::time::{Duration, Instant};

use futures::stream::{self, TryStreamExt};

use crate::error::CliError;
use crate::source::BlockSource;

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

/// Runs the read benchmark; returns the elapsed time.
pub async fn run_read<S: BlockSource>(src: &S, p: BenchParams) -> Result<Duration, CliError> {
    let size = src.size();
    // Buffers are recycled: at most `depth` exist at once. bufsize was bounded by the caller.
    let pool: RefCell<Vec<Vec<u8>>> = RefCell::new(Vec::new());
    let pool = &pool;
    let start = Instant::now();
    stream::iter(offsets(p, size).map(Ok::<u64, CliError>))
        .map_ok(|off| async move {
            let mut buf = pool
                .borrow_mut()
                .pop()
                .unwrap_or_else(|| vec![0u8; p.bufsize as usize]);
            let r = src.read(off, &mut buf).await;
            pool.borrow_mut().push(buf);
            r
        })
        .try_buffer_unordered(p.depth.max(1))
        .try_collect::<()>()
        .await?;
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mem::MemImage;

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
}
