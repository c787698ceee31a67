//! A small process-wide pool of I/O threads for the std backend's blocking calls.
//!
//! It does what `tokio::task::spawn_blocking` does for this one purpose, with less per-call work: a
//! job is a boxed closure pushed on one mutex-protected queue, a parked worker is woken only when one
//! is idle (else a new one is started, up to [`MAX_THREADS`]), and the result comes back through a
//! `tokio::sync::oneshot` channel, so that no Tokio task is created per call. Workers that stay idle
//! for [`IDLE_TIMEOUT`] exit. The pool does not belong to any runtime, so it keeps working while a
//! runtime shuts down; a job whose caller went away still runs to completion (as with
//! `spawn_blocking`) and its result is dropped.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Most worker threads at once (QEMU's thread pool uses 64 too). Jobs beyond that wait in the queue.
pub(crate) const MAX_THREADS: usize = 64;

/// How long an idle worker waits for work before it exits.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A queued job. Called with `None` to run it; with `Some(error)` to abandon it because no worker
/// thread could be started (it then reports that error to its caller instead of running).
type Job = Box<dyn FnOnce(Option<&io::Error>) + Send + 'static>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting on the condition variable.
    idle: usize,
    /// Wake-ups sent to idle workers that they have not yet consumed.
    notified: usize,
    /// Workers alive.
    threads: usize,
}

struct Pool {
    state: Mutex<State>,
    work: Condvar,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool {
        state: Mutex::new(State::default()),
        work: Condvar::new(),
    })
}

impl Pool {
    /// Locks the state; a worker never panics while holding the lock (jobs run unlocked and inside
    /// `catch_unwind`), but recover from poisoning anyway.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`, waking an idle worker or starting a new one.
    fn submit(&'static self, job: Job) -> io::Result<()> {
        let mut st = self.lock();
        st.jobs.push_back(job);
        if st.idle > st.notified {
            st.notified += 1;
            drop(st);
            self.work.notify_one();
            return Ok(());
        }
        if st.threads >= MAX_THREADS {
            // Every worker is busy or already woken; each looks at the queue before it waits again.
            return Ok(());
        }
        st.threads += 1;
        drop(st);
        let spawned = std::thread::Builder::new()
            .name("qcow2-io".into())
            .spawn(move || self.worker());
        if let Err(e) = spawned {
            let mut st = self.lock();
            st.threads -= 1;
            if st.threads == 0 {
                // Nobody would ever run the queued jobs (ours and any other caller's queued since):
                // abandon them, each telling its caller that no I/O thread could be started.
                let abandoned = std::mem::take(&mut st.jobs);
                drop(st);
                for job in abandoned {
                    job(Some(&e));
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot start an I/O thread: {e}"),
                ));
            }
        }
        Ok(())
    }

    fn worker(&'static self) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                drop(st);
                // A panicking job drops its result sender, which its caller sees as an error.
                let _ = catch_unwind(AssertUnwindSafe(|| job(None)));
                st = self.lock();
                continue;
            }
            st.idle += 1;
            let (guard, timeout) = self
                .work
                .wait_timeout(st, IDLE_TIMEOUT)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            // Whatever woke us (a notification, a spurious wake-up or the timeout), we look at the
            // queue before waiting again, so counting one notification consumed is safe: at worst a
            // later submit wakes one worker more than needed.
            st.idle -= 1;
            st.notified = st.notified.saturating_sub(1);
            if timeout.timed_out() && st.jobs.is_empty() {
                st.threads -= 1;
                return;
            }
        }
    }
}

/// Wraps `f` as a [`Job`] whose result (or, when abandoned, the reason) arrives on the receiver.
fn make_job<T, F>(f: F) -> (Job, tokio::sync::oneshot::Receiver<io::Result<T>>)
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<io::Result<T>>();
    let job: Job = Box::new(move |abandon: Option<&io::Error>| {
        let _ = tx.send(match abandon {
            None => Ok(f()),
            Some(e) => Err(io::Error::new(
                e.kind(),
                format!("blocking I/O job not run: no I/O thread could be started: {e}"),
            )),
        });
    });
    (job, rx)
}

/// Runs `f` on the pool and waits (asynchronously) for its result.
pub(crate) async fn run<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (job, rx) = make_job(f);
    pool().submit(job)?;
    rx.await
        .map_err(|_| io::Error::other("blocking I/O job did not complete (it panicked)"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_many_jobs_and_survives_panics() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let jobs = (0..500u64).map(|i| run(move || i * 2));
            let got = futures_join(jobs).await;
            assert_eq!(got, (0..500u64).map(|i| i * 2).collect::<Vec<_>>());
            let r = run(|| -> u32 { panic!("job panics on purpose") }).await;
            assert!(r.is_err());
            assert_eq!(run(|| 7).await.unwrap(), 7);
        });
    }

    #[test]
    fn abandoned_job_says_no_thread_could_start() {
        let (job, mut rx) = make_job(|| 1u8);
        job(Some(&io::Error::from_raw_os_error(libc::EAGAIN)));
        let err = rx.try_recv().unwrap().unwrap_err();
        assert!(
            err.to_string().contains("no I/O thread could be started"),
            "{err}"
        );
        let (job, mut rx) = make_job(|| 2u8);
        job(None);
        assert_eq!(rx.try_recv().unwrap().unwrap(), 2);
    }

    /// Awaits all futures (spawned as tasks so that they run concurrently).
    async fn futures_join<I, Fut>(futs: I) -> Vec<u64>
    where
        I: Iterator<Item = Fut>,
        Fut: std::future::Future<Output = io::Result<u64>> + Send + 'static,
    {
        let handles: Vec<_> = futs.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap().unwrap());
        }
        out
    }
}
