//! Which of a queue's two threads watches which descriptor. Both threads spinning is right
//! under load (a TCP stream's data and ACKs must not wait for each other), but in a light
//! exchange (one packet at a time each way: a request-response protocol, `sockperf`, an idle
//! ping) two spinning threads per queue and node crowd the cores the exchange's own processes
//! need: on two vCPUs, four spinning agent threads and the two ends of a ping-pong made a
//! million context switches a second, and each packet waited behind the other spinners' turns.
//!
//! So when traffic is light one thread parks: it sleeps on its thread handle, not on its
//! descriptor, so packets do not wake it, and its partner moves both directions and, when it
//! sleeps itself, polls both descriptors. The first turn that moves more than one packet on
//! either side ("heavy") wakes the parked thread again. Parking follows a Dekker handshake with
//! the partner's sleep, so a descriptor is never left unwatched: the parker publishes that it
//! parks and then looks whether its partner sleeps (if so it does not park); the partner
//! publishes that it sleeps and then looks whether someone parked (if so it polls both
//! descriptors). Sequentially consistent order makes at least one of them see the other.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;

/// A queue's thread, by the direction it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Device -> underlay.
    Tx = 1,
    /// Underlay -> device.
    Rx = 2,
}

impl Role {
    /// The other thread of the queue.
    pub fn partner(self) -> Role {
        match self {
            Role::Tx => Role::Rx,
            Role::Rx => Role::Tx,
        }
    }

    fn index(self) -> usize {
        self as usize - 1
    }
}

/// How long a queue must have seen no heavy turn before a thread may park: long enough that a
/// stream's short lulls do not park and wake a thread over and over (each wake-up is a system
/// call for the waker and a cross-CPU wake-up).
pub const LIGHT_FOR_US: u64 = 1_000;

/// A turn moving more packets than this on one side is heavy.
pub const LIGHT_TURN: usize = 1;

/// How long a thread must have slept before its partner moves its packets though it is not
/// parked. Helping pays off for sparse exchanges (an idle round trip, a DNS query); in a busy
/// ping-pong the owner naps for microseconds between packets, and helping then would have the
/// kernel wake it for every packet only to find the work taken (measured: 64-byte ping-pong
/// 1.3x slower with helping at any nap).
pub const HELP_AFTER_US: u64 = 1_000;

/// One queue's watch.
#[derive(Debug, Default)]
pub struct Watch {
    /// The parked thread's role as a number, 0 when none is parked.
    parked: AtomicU8,
    /// When the last heavy turn happened, on the caller's microsecond clock.
    last_heavy: AtomicU64,
    threads: [OnceLock<Thread>; 2],
    /// Microseconds on [`micros`] at which each thread went to sleep; 0 while it is awake.
    asleep_since: [AtomicU64; 2],
}

/// Microseconds since the process clock's base, never 0 (0 means awake).
fn micros() -> u64 {
    crate::clock::us() + 1
}

impl Watch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Called once by each thread before it may park, so its partner can wake it.
    pub fn register(&self, me: Role) {
        let _ = self.threads[me.index()].set(std::thread::current());
    }

    /// Whether `role`'s thread is parked (its partner watches for it).
    #[inline]
    pub fn is_parked(&self, role: Role) -> bool {
        self.parked.load(Ordering::SeqCst) == role as u8
    }

    /// A turn of `moved_own` packets on the caller's side and `moved_other` on its partner's,
    /// at `now_us`: a heavy turn wakes a parked thread (counted in `unparks`).
    #[inline]
    pub fn turned(&self, moved_own: usize, moved_other: usize, now_us: u64, unparks: &AtomicU64) {
        if moved_own <= LIGHT_TURN && moved_other <= LIGHT_TURN {
            return;
        }
        self.last_heavy.store(now_us, Ordering::Relaxed);
        let parked = self.parked.load(Ordering::SeqCst);
        if parked != 0
            && self
                .parked
                .compare_exchange(parked, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            let role = if parked == Role::Tx as u8 { Role::Tx } else { Role::Rx };
            if let Some(t) = self.threads[role.index()].get() {
                unparks.fetch_add(1, Ordering::Relaxed);
                t.unpark();
            }
        }
    }

    /// Around `me`'s sleep; going to sleep, whether it must also watch its parked partner's
    /// descriptor. Sequentially consistent: the sleeper's half of the handshake.
    pub fn sleeping(&self, me: Role, asleep: bool) -> bool {
        let v = if asleep { micros() } else { 0 };
        self.asleep_since[me.index()].store(v, Ordering::SeqCst);
        asleep && self.is_parked(me.partner())
    }

    /// Whether `role`'s partner may move `role`'s packets now: `role`'s thread is parked, or
    /// has slept for [`HELP_AFTER_US`].
    #[inline]
    pub fn may_help(&self, role: Role) -> bool {
        if self.is_parked(role) {
            return true;
        }
        let since = self.asleep_since[role.index()].load(Ordering::Acquire);
        since != 0 && micros().saturating_sub(since) >= HELP_AFTER_US
    }

    /// Whether the queue has been light long enough at `now_us` for a thread to park.
    #[inline]
    pub fn light(&self, now_us: u64) -> bool {
        now_us.saturating_sub(self.last_heavy.load(Ordering::Relaxed)) >= LIGHT_FOR_US
    }

    /// Parks `me` if its partner is awake (read after this side has published that it parks:
    /// the parker's half of the handshake), counting it in `parks`; returns once woken by a
    /// heavy turn, true if it parked at all.
    pub fn park(&self, me: Role, parks: &AtomicU64) -> bool {
        if self.threads[me.index()].get().is_none() {
            return false;
        }
        if self
            .parked
            .compare_exchange(0, me as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // The partner is parked: this thread is the one watching.
            return false;
        }
        if self.asleep_since[me.partner().index()].load(Ordering::SeqCst) != 0 {
            // It may be polling its own descriptor only; stay awake to watch ours.
            let _ = self
                .parked
                .compare_exchange(me as u8, 0, Ordering::SeqCst, Ordering::SeqCst);
            return false;
        }
        parks.fetch_add(1, Ordering::Relaxed);
        // Spurious returns of park() are allowed: only the flag says whether it is over.
        while self.is_parked(me) {
            std::thread::park();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_thread_does_not_park_while_its_partner_sleeps() {
        let w = Arc::new(Watch::new());
        let (done, finished) = std::sync::mpsc::channel();
        let w2 = w.clone();
        std::thread::spawn(move || {
            w2.register(Role::Rx);
            w2.sleeping(Role::Tx, true);
            let _ = done.send(w2.park(Role::Rx, &AtomicU64::new(0)));
        });
        let parked = finished.recv_timeout(Duration::from_secs(5));
        assert_eq!(parked, Ok(false), "it parked (and hung) while its partner slept");
        assert!(!w.is_parked(Role::Rx), "the flag is taken back");
    }

    #[test]
    fn a_partner_helps_a_parked_thread_at_once_and_a_sleeping_one_after_a_while() {
        let w = Watch::new();
        assert!(!w.may_help(Role::Tx), "an awake thread moves its own packets");
        assert!(!w.sleeping(Role::Tx, true), "nobody parked: one descriptor to watch");
        assert!(!w.may_help(Role::Tx), "a nap is not long enough");
        std::thread::sleep(Duration::from_micros(HELP_AFTER_US + 200));
        assert!(w.may_help(Role::Tx));
        w.sleeping(Role::Tx, false);
        assert!(!w.may_help(Role::Tx));
        w.parked.store(Role::Tx as u8, Ordering::SeqCst);
        assert!(w.may_help(Role::Tx), "a parked thread is helped at once");
        assert!(w.sleeping(Role::Rx, true), "its partner watches both descriptors");
    }

    #[test]
    fn an_unregistered_thread_never_parks() {
        let w = Watch::new();
        assert!(!w.park(Role::Tx, &AtomicU64::new(0)));
    }

    #[test]
    fn light_turns_keep_a_parked_thread_parked_and_a_heavy_one_wakes_it() {
        let w = Arc::new(Watch::new());
        let back = Arc::new(AtomicBool::new(false));
        let (w2, back2) = (w.clone(), back.clone());
        let t = std::thread::spawn(move || {
            w2.register(Role::Tx);
            let parked = w2.park(Role::Tx, &AtomicU64::new(0));
            back2.store(true, Ordering::SeqCst);
            parked
        });
        while !w.is_parked(Role::Tx) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The partner cannot park as well: it watches.
        w.register(Role::Rx);
        assert!(!w.park(Role::Rx, &AtomicU64::new(0)));
        w.turned(1, 1, 10, &AtomicU64::new(0));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!back.load(Ordering::SeqCst), "one packet each way is light");
        assert!(w.light(10 + LIGHT_FOR_US));
        let unparks = AtomicU64::new(0);
        w.turned(0, 2, 20, &unparks);
        assert!(t.join().expect("parked thread"), "it had parked");
        assert!(back.load(Ordering::SeqCst));
        assert!(!w.is_parked(Role::Tx));
        assert_eq!(unparks.load(Ordering::Relaxed), 1);
        assert!(
            !w.light(20 + LIGHT_FOR_US - 1),
            "a heavy turn keeps both threads up a while"
        );
        assert!(w.light(20 + LIGHT_FOR_US));
    }

    /// The handshake: however a park and a partner's sleep interleave, either the sleeper sees
    /// the park (and polls both descriptors: here, it finds traffic and wakes the parked thread)
    /// or the parker sees the sleep (and does not park). A park nobody saw would hang.
    #[test]
    fn a_park_and_a_sleep_at_once_never_leave_a_descriptor_unwatched() {
        for _ in 0..500 {
            let w = Arc::new(Watch::new());
            let w2 = w.clone();
            let sleeper = std::thread::spawn(move || {
                if w2.sleeping(Role::Rx, true) {
                    w2.turned(0, 2, 1, &AtomicU64::new(0));
                }
            });
            let (done, finished) = std::sync::mpsc::channel();
            let w3 = w.clone();
            std::thread::spawn(move || {
                w3.register(Role::Tx);
                let _ = done.send(w3.park(Role::Tx, &AtomicU64::new(0)));
            });
            let r = finished.recv_timeout(Duration::from_secs(5));
            sleeper.join().expect("sleeper");
            assert!(r.is_ok(), "a thread parked while its partner slept without seeing it");
        }
    }
}
