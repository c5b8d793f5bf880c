//! The epoch ticker: the thread that advances the engine's epoch, which is when a running call
//! looks at how much CPU it has used ([`super::limit`]). It runs only while modules are being
//! called.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::Engine;

/// How often the epoch advances: the unit of every deadline.
pub const TICK: Duration = Duration::from_millis(1);

/// After this long without a module call the ticker parks: an idle node spends nothing on it.
pub(super) const IDLE_MS: u64 = 1_000;

/// The thread that advances the epoch. It ticks while modules are being called and parks after
/// an idle second; the next call wakes it. A call costs one load (and a store per millisecond);
/// a wake-up only ends an idle spell.
pub struct Ticker {
    awake: AtomicBool,
    last_ms: AtomicU64,
    stop: AtomicBool,
    thread: OnceLock<Thread>,
    /// Set while the ticker has lately woken a tick or more late (it waits for a core like
    /// any thread when it cannot have real-time priority).
    late: AtomicBool,
}

impl Ticker {
    /// Starts the ticker of `engine`.
    pub fn start(engine: &Engine) -> std::io::Result<Arc<Ticker>> {
        let ticker = Arc::new(Ticker::awake());
        let (e, t) = (engine.clone(), ticker.clone());
        let handle = std::thread::Builder::new()
            .name("weft-wasm-epoch".into())
            .spawn(move || t.run(&e))?;
        let _ = ticker.thread.set(handle.thread().clone());
        Ok(ticker)
    }

    /// A ticker about to run, with no thread yet.
    fn awake() -> Ticker {
        Ticker {
            awake: AtomicBool::new(true),
            last_ms: AtomicU64::new(crate::clock::ms()),
            stop: AtomicBool::new(false),
            thread: OnceLock::new(),
            late: AtomicBool::new(false),
        }
    }

    /// Ends the thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Whether the ticker has lately woken late, so a call cannot count on its first tick to
    /// come soon after it starts.
    #[inline]
    pub fn late(&self) -> bool {
        self.late.load(Ordering::Relaxed)
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
        // With real-time priority a late wake means the whole machine stalled (a VM's vCPU
        // descheduled), calls included, so it says nothing about what a call ran meanwhile.
        let realtime = realtime_priority();
        let idle = |last: u64| crate::clock::ms().saturating_sub(last) > IDLE_MS;
        let mut ticked = std::time::Instant::now();
        let mut punctual = 0;
        while !self.stop.load(Ordering::Relaxed) {
            let asleep = std::time::Instant::now();
            std::thread::sleep(TICK);
            // Late: woke a whole tick after it asked to. (Sleeps overshoot a little each time,
            // so the ticks made up below are no measure of that.)
            let late = !realtime && asleep.elapsed() >= 2 * TICK;
            // Held off the CPU for a while (a saturated machine), the ticker makes up every
            // tick it missed, so a deadline stretches by one late wake-up, not one per tick.
            let missed = (ticked.elapsed().as_nanos() / TICK.as_nanos()).clamp(1, 1_000);
            for _ in 0..missed {
                engine.increment_epoch();
            }
            ticked += TICK * missed as u32;
            punctual = self.note_lateness(late, punctual);
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

    /// Notes whether this wake came `late`; returns how many wakes in a row came on time. One
    /// late wake sets `late`; a second of punctual ones clears it.
    fn note_lateness(&self, late: bool, punctual: u32) -> u32 {
        if late {
            self.late.store(true, Ordering::Relaxed);
            return 0;
        }
        if punctual + 1 == PUNCTUAL_WAKES {
            self.late.store(false, Ordering::Relaxed);
        }
        punctual.saturating_add(1)
    }
}

/// Wakes on time in a row after which the ticker is trusted again.
const PUNCTUAL_WAKES: u32 = 1_000;

/// Asks for the lowest real-time priority for the calling (ticker) thread, so busy threads
/// cannot hold it off: it runs for microseconds a millisecond and only while modules are being
/// called. Without CAP_SYS_NICE it stays a normal thread and catches up on missed ticks.
fn realtime_priority() -> bool {
    // SAFETY: sched_param is a plain C struct (musl's has more fields than glibc's), for which
    // all zeroes is a valid value.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = 1;
    // SAFETY: pthread_self() is the calling thread, always valid; param lives across the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc == 0 {
        tracing::debug!("epoch ticker runs at real-time priority (SCHED_FIFO 1)");
    } else {
        tracing::debug!(error = %std::io::Error::from_raw_os_error(rc), "epoch ticker stays at normal priority; while it wakes late, module calls read their CPU clock as they start");
    }
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_late_wake_makes_calls_read_their_clock_until_a_second_passes_on_time() {
        let t = Ticker::awake();
        let mut punctual = t.note_lateness(false, 0);
        assert!(!t.late());
        punctual = t.note_lateness(true, punctual);
        assert!(t.late());
        for _ in 0..PUNCTUAL_WAKES - 1 {
            punctual = t.note_lateness(false, punctual);
        }
        assert!(t.late(), "a wake short of a second on time");
        punctual = t.note_lateness(false, punctual);
        assert!(!t.late());
        t.note_lateness(true, punctual);
        assert!(t.late());
    }
}
