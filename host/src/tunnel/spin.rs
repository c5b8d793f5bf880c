//! When a forwarding thread may go to sleep. Waking a sleeping thread costs tens of
//! microseconds on a VM (an idle vCPU has to be woken), and a userspace overlay pays it at
//! every node crossing: an idle round trip wakes a thread on each side, twice, where the
//! kernel's VXLAN wakes none. A thread that keeps polling its device and socket for a moment
//! after it moved packets catches the answer to what it just forwarded without sleeping.
//!
//! The moment adapts, pure logic over timestamps: after traffic the thread spins for twice the
//! last short gap between two bursts (request-response traffic: about one round trip), never
//! longer than the maximum; a spin that catches nothing shortens the next one by a quarter,
//! down to a floor, so one-way trickles and idle nodes burn almost nothing. A quarter, not a
//! half: every exchange ends in one spin that catches nothing (after the answer), and halving
//! there would leave the next exchange a spin of exactly one round trip, which jitter misses.
//! With no traffic the thread never spins at all.

use std::time::{Duration, Instant};

/// The shortest spin.
pub const FLOOR: Duration = Duration::from_micros(5);

/// A forwarding thread's spin state.
#[derive(Debug, Clone)]
pub struct Spin {
    max: Duration,
    budget: Duration,
    last: Option<Instant>,
    /// A spin is due (traffic came, and no sleep since).
    armed: bool,
    /// Spins that ran out without traffic.
    pub missed: u64,
}

impl Spin {
    /// Spins of at most `max` after traffic (zero: never spin).
    pub fn new(max: Duration) -> Self {
        Spin {
            max,
            budget: max,
            last: None,
            armed: false,
            missed: 0,
        }
    }

    /// The current spin length.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Packets moved at `now`.
    #[inline]
    pub fn traffic(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last);
            // A short gap says what a spin must cover to catch the next burst.
            if gap <= self.max && gap > Duration::ZERO {
                self.budget = (gap * 2).clamp(FLOOR, self.max);
            }
        }
        self.last = Some(now);
        self.armed = !self.max.is_zero();
    }

    /// Whether the thread should poll once more rather than sleep, at `now`.
    #[inline]
    pub fn keep_spinning(&mut self, now: Instant) -> bool {
        if !self.armed {
            return false;
        }
        let Some(last) = self.last else { return false };
        if now.saturating_duration_since(last) < self.budget {
            return true;
        }
        // Nothing came: sleep, and spin less next time.
        self.armed = false;
        self.missed += 1;
        self.budget = (self.budget * 3 / 4).max(FLOOR).min(self.max);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn an_idle_thread_never_spins() {
        let mut s = Spin::new(us(200));
        assert!(!s.keep_spinning(Instant::now()));
        let mut off = Spin::new(Duration::ZERO);
        let t = Instant::now();
        off.traffic(t);
        assert!(!off.keep_spinning(t), "a zero maximum turns spinning off");
    }

    #[test]
    fn request_response_traffic_is_caught_by_the_spin() {
        let mut s = Spin::new(us(200));
        let t = Instant::now();
        s.traffic(t);
        // The answer comes 60 us later, while the thread still spins.
        assert!(s.keep_spinning(t + us(30)));
        s.traffic(t + us(60));
        assert_eq!(s.budget(), us(120), "twice the last gap");
        assert!(s.keep_spinning(t + us(150)));
        assert!(!s.keep_spinning(t + us(181)), "budget spent: sleep");
        assert_eq!(s.missed, 1);
        assert!(!s.keep_spinning(t + us(190)), "no second spin without new traffic");
    }

    /// Pings 5 ms apart whose answers come 50-70 us after the request: after the first, every
    /// answer is caught, although each exchange ends in a spin that catches nothing.
    #[test]
    fn spaced_exchanges_stay_caught_despite_jitter() {
        let mut s = Spin::new(us(200));
        let mut t = Instant::now();
        let mut caught = 0;
        for i in 0..50u64 {
            s.traffic(t);
            let answer = t + us(50 + (i * 7) % 21);
            let mut now = t;
            while now < answer && s.keep_spinning(now) {
                now += us(1);
            }
            if now >= answer {
                caught += 1;
                s.traffic(answer);
                while s.keep_spinning(now) {
                    now += us(1);
                }
            }
            t += us(5_000);
        }
        assert_eq!(caught, 50);
    }

    #[test]
    fn one_way_trickles_decay_to_the_floor() {
        let mut s = Spin::new(us(200));
        let mut t = Instant::now();
        for _ in 0..20 {
            s.traffic(t);
            // Packets 1 ms apart: every spin runs out.
            while s.keep_spinning(t) {
                t += us(1);
            }
            t += us(1_000);
        }
        assert_eq!(s.budget(), FLOOR);
        assert_eq!(s.missed, 20);
    }

    #[test]
    fn the_spin_is_bounded() {
        let mut s = Spin::new(us(50));
        let t = Instant::now();
        s.traffic(t);
        s.traffic(t + us(40));
        assert_eq!(s.budget(), us(50));
        assert!(!s.keep_spinning(t + us(40) + us(50)));
    }
}
