//! Where modules are compiled, instantiated and checked off the paths that must stay fast: a
//! few threads of their own, never the agent's async runtime (whose two workers also answer
//! the admin API and follow the store) and never a forwarding thread. Work waiting is bounded,
//! so a burst of uploads is refused rather than queued without end, and every job has a
//! wall-clock cap: the caller gets its answer or "too slow", whatever the job does meanwhile.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every thread is busy and the queue is full.
    #[error("{0} modules are compiling already; try again shortly")]
    Busy(usize),
    /// The job did not finish within its cap.
    #[error("compiling and checking took longer than {0:?}")]
    TooSlow(Duration),
    /// The pool's threads are gone.
    #[error("the compile pool stopped")]
    Stopped,
}

/// The pool.
pub struct CompilePool {
    tx: SyncSender<Job>,
    room: usize,
}

impl CompilePool {
    /// `threads` workers and room for `queue` jobs waiting.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Arc<CompilePool>> {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("weft-compile{i}"))
                .spawn(move || worker(&rx))?;
        }
        Ok(Arc::new(CompilePool {
            tx,
            room: threads.max(1) + queue,
        }))
    }

    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::sync::mpsc::Receiver<T>, PoolError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move || {
            // Nobody waiting any more (the cap passed) is fine.
            let _ = tx.send(f());
        });
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(PoolError::Busy(self.room)),
            Err(TrySendError::Disconnected(_)) => Err(PoolError::Stopped),
        }
    }

    /// Runs `f` on the pool and waits (without holding up the async runtime) at most `cap`.
    pub async fn run<T: Send + 'static>(
        &self,
        cap: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        let rx = self.submit(f)?;
        // The wait itself is one blocking receive on a thread the runtime keeps for that.
        let waited = tokio::task::spawn_blocking(move || rx.recv_timeout(cap)).await;
        match waited {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(std::sync::mpsc::RecvTimeoutError::Timeout)) => Err(PoolError::TooSlow(cap)),
            Ok(Err(std::sync::mpsc::RecvTimeoutError::Disconnected)) | Err(_) => Err(PoolError::Stopped),
        }
    }

    /// [`run`](Self::run) from a thread that may block.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        cap: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        self.submit(f)?.recv_timeout(cap).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => PoolError::TooSlow(cap),
            std::sync::mpsc::RecvTimeoutError::Disconnected => PoolError::Stopped,
        })
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_answer_and_a_full_pool_says_so() {
        let pool = CompilePool::new(1, 1).unwrap();
        assert_eq!(pool.run_blocking(Duration::from_secs(1), || 2 + 2), Ok(4));
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = gate.clone();
        let (started_tx, started) = std::sync::mpsc::channel();
        // One job running, one waiting: the third is refused.
        let running = pool
            .submit(move || {
                let _ = started_tx.send(());
                g.wait();
            })
            .unwrap();
        started.recv().unwrap();
        let waiting = pool.submit(|| ()).unwrap();
        assert_eq!(pool.submit(|| ()).err(), Some(PoolError::Busy(2)));
        gate.wait();
        running.recv().unwrap();
        waiting.recv().unwrap();
    }

    #[test]
    fn a_slow_job_gets_too_slow_not_a_hang() {
        let pool = CompilePool::new(1, 1).unwrap();
        let t = std::time::Instant::now();
        let r = pool.run_blocking(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500))
        });
        assert_eq!(r, Err(PoolError::TooSlow(Duration::from_millis(50))));
        assert!(t.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_async_wait_leaves_the_runtime_free() {
        let pool = CompilePool::new(1, 1).unwrap();
        let slow = pool.run(Duration::from_secs(2), || {
            std::thread::sleep(Duration::from_millis(300));
            7
        });
        // A single-threaded runtime still runs other tasks while the job compiles.
        let other = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            std::time::Instant::now()
        };
        let t0 = std::time::Instant::now();
        let (r, other_done) = tokio::join!(slow, other);
        assert_eq!(r, Ok(7));
        assert!(other_done.duration_since(t0) < Duration::from_millis(150));
    }
}
