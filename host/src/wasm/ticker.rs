//! The epoch ticker: the thread that advances the engine's epoch, the clock every call deadline
//! counts in, and the log of when it woke, which is how a call's deadline is placed without
//! reading the clock when the call starts.
//!
//! A call notes the ticker's wake count (one load). Its deadline is known once the ticker has
//! woken after it started: the call began before that wake, so the wake's time plus the budget
//! never cuts it short, and it lands within a tick of the call's true end. Reading the clock at
//! every call instead cost 18 ns on this path, a tenth of a whole new flow.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::Engine;

/// How often the epoch advances: the unit of every deadline.
pub const TICK: Duration = Duration::from_millis(1);

const TICK_US: u64 = TICK.as_micros() as u64;

/// After this long without a module call the ticker parks: an idle node spends nothing on it.
const IDLE_MS: u64 = 1_000;

/// Wakes remembered: far more than a deadline's first firing is ever behind its call's start.
const LOG: usize = 256;

/// When the ticker woke, by wake number: what places each call's deadline.
pub struct WakeLog {
    /// Wakes so far.
    wakes: AtomicU64,
    /// Microseconds on the process clock of wake `n`, at `n % LOG`.
    at_us: [AtomicU64; LOG],
}

impl Default for WakeLog {
    fn default() -> Self {
        WakeLog {
            wakes: AtomicU64::new(0),
            at_us: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl WakeLog {
    /// What a call notes as it starts.
    #[inline]
    pub fn stamp(&self) -> u64 {
        self.wakes.load(Ordering::SeqCst)
    }

    /// Records a wake. The count moves first and the time is read after, so a call that saw
    /// the count before this wake started before the time recorded.
    pub fn woke(&self, now_us: impl FnOnce() -> u64) {
        let n = self.wakes.load(Ordering::Relaxed) + 1;
        self.wakes.store(n, Ordering::SeqCst);
        self.at_us[n as usize % LOG].store(now_us(), Ordering::Release);
    }

    /// When a call that noted `stamp` and may run `budget_us` must end, on the process clock;
    /// `None` while the ticker has not yet logged a wake after the call started.
    pub fn ends_us(&self, stamp: u64, budget_us: u64) -> Option<u64> {
        let since = self.wakes.load(Ordering::SeqCst).saturating_sub(stamp);
        // Two wakes: the first one's time is written before the second is counted.
        if since < 2 {
            return None;
        }
        let first = self.at_us[(stamp + 1) as usize % LOG].load(Ordering::Acquire);
        if self.wakes.load(Ordering::SeqCst).saturating_sub(stamp) <= LOG as u64 {
            return Some(first.saturating_add(budget_us));
        }
        // Overwritten: wakes are a full tick's sleep apart, so `since` wakes prove
        // `since - 1` ticks passed.
        ((since - 1).saturating_mul(TICK_US) >= budget_us).then_some(0)
    }
}

/// The thread that advances the epoch. It ticks while modules are being called and parks after
/// an idle second; the next call wakes it. A call costs one load (and a store per millisecond);
/// a wake-up only ends an idle spell.
pub struct Ticker {
    awake: AtomicBool,
    last_ms: AtomicU64,
    stop: AtomicBool,
    thread: OnceLock<Thread>,
    log: WakeLog,
}

impl Ticker {
    /// Starts the ticker of `engine`.
    pub fn start(engine: &Engine) -> std::io::Result<Arc<Ticker>> {
        let ticker = Arc::new(Ticker {
            awake: AtomicBool::new(true),
            last_ms: AtomicU64::new(crate::clock::ms()),
            stop: AtomicBool::new(false),
            thread: OnceLock::new(),
            log: WakeLog::default(),
        });
        let (e, t) = (engine.clone(), ticker.clone());
        let handle = std::thread::Builder::new()
            .name("weft-wasm-epoch".into())
            .spawn(move || t.run(&e))?;
        let _ = ticker.thread.set(handle.thread().clone());
        Ok(ticker)
    }

    /// Ends the thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// The log of wakes that places deadlines.
    pub fn log(&self) -> &WakeLog {
        &self.log
    }

    /// A call is about to start at `now_ms`.
    #[inline]
    pub fn wake(&self, now_ms: u64) {
        if self.last_ms.load(Ordering::Relaxed) != now_ms {
            self.last_ms.store(now_ms, Ordering::SeqCst);
        }
        // Either the ticker sees the call's time before it parks, or this sees it asleep.
        if !self.awake.load(Ordering::SeqCst) && !self.awake.swap(true, Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }

    fn run(&self, engine: &Engine) {
        realtime_priority();
        let idle = |last: u64| crate::clock::ms().saturating_sub(last) > IDLE_MS;
        let mut ticked = std::time::Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            // Held off the CPU for a while (a saturated machine), the ticker makes up every
            // tick it missed, so a deadline stretches by one late wake-up, not one per tick.
            let missed = (ticked.elapsed().as_nanos() / TICK.as_nanos()).clamp(1, 1_000);
            self.log.woke(crate::clock::us);
            for _ in 0..missed {
                engine.increment_epoch();
            }
            ticked += TICK * missed as u32;
            if !idle(self.last_ms.load(Ordering::SeqCst)) {
                continue;
            }
            self.awake.store(false, Ordering::SeqCst);
            while idle(self.last_ms.load(Ordering::SeqCst)) && !self.awake.load(Ordering::SeqCst) {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::park();
            }
            self.awake.store(true, Ordering::SeqCst);
            ticked = std::time::Instant::now();
        }
    }
}

/// Asks for the lowest real-time priority for the calling (ticker) thread, so busy threads
/// cannot hold it off: it runs for microseconds a millisecond and only while modules are being
/// called. Without CAP_SYS_NICE it stays a normal thread and catches up on missed ticks.
fn realtime_priority() {
    // SAFETY: sched_param is a plain C struct (musl's has more fields than glibc's), for which
    // all zeroes is a valid value.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = 1;
    // SAFETY: pthread_self() is the calling thread, always valid; param lives across the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc == 0 {
        tracing::debug!("epoch ticker runs at real-time priority (SCHED_FIFO 1)");
    } else {
        tracing::debug!(error = %std::io::Error::from_raw_os_error(rc), "epoch ticker stays at normal priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_counts_from_the_first_wake_after_the_call_started() {
        let log = WakeLog::default();
        log.woke(|| 1_000);
        let stamp = log.stamp();
        assert_eq!(log.ends_us(stamp, 5_000), None, "no wake since the start");
        log.woke(|| 1_900);
        assert_eq!(
            log.ends_us(stamp, 5_000),
            None,
            "its time is only trusted once the next is counted"
        );
        log.woke(|| 2_950);
        assert_eq!(log.ends_us(stamp, 5_000), Some(6_900), "the start was before 1.9 ms");
        // A burst of catch-up ticks is one wake: it counts once, at the time it happened.
        log.woke(|| 40_000);
        assert_eq!(log.ends_us(stamp, 5_000), Some(6_900));
        let later = log.stamp();
        log.woke(|| 41_000);
        log.woke(|| 42_000);
        assert_eq!(log.ends_us(later, 5_000), Some(46_000));
    }

    #[test]
    fn a_call_older_than_the_log_ends_once_its_wakes_prove_the_budget_spent() {
        let log = WakeLog::default();
        let stamp = log.stamp();
        for i in 0..=LOG as u64 + 1 {
            log.woke(|| 1_000 * i);
        }
        assert_eq!(log.ends_us(stamp, 5_000), Some(0), "258 wakes prove 257 ms");
        assert_eq!(log.ends_us(stamp, 10_000_000), None, "but not ten seconds");
    }
}
