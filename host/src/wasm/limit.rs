//! A call's time limit, counted in CPU time of the thread that runs it.
//!
//! Wall time would also count the time a busy node keeps that thread off a core, and fail the
//! module for it: under iperf3 on two cores a well-behaved call was now and then held off long
//! enough to pass a 5 ms wall-clock deadline, and a module that fails closed dropped the flow.
//! A module cannot make itself be preempted, so the CPU it burns is the only thing a deadline
//! can fairly bound.
//!
//! The epoch ticker says when to look: each of its ticks is a tick of wall time, and a thread
//! cannot use more CPU than wall time passes. A look reads the thread's CPU clock, a system
//! call, so a call does not read it when it starts (a new flow's whole decision costs less than
//! that call): the first tick after the start takes the reading every later look counts from.
//! What ran before that tick is at most a tick, so a call is never cut short of its budget and
//! ends within about two ticks of CPU past it. That holds while the ticker keeps time; one that
//! waits for a core (it has no real-time priority, and the node is busy) comes late, and a
//! runaway call would run free until it came. So while such a ticker has lately been late, a
//! call reads its clock as it starts: a system call per call (0.7 µs on this VM), paid only by
//! an agent without CAP_SYS_NICE on a node too busy to tick on time.

use std::time::Duration;

use super::ticker::TICK;

/// The running call's budget and the CPU clock it counts from.
#[derive(Debug, Default)]
pub(super) struct Limit {
    budget: Duration,
    /// The thread's CPU time at the first look after the call started.
    base: Option<Duration>,
}

/// What to do when the epoch reaches a call's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Look {
    /// The call has used its budget: interrupt it.
    Interrupt,
    /// Look again after this many ticks.
    Again(u64),
}

/// The epoch deadline a call starts with: its first look takes the reading to count from.
pub(super) const FIRST_LOOK_TICKS: u64 = 1;

/// The most ticks between two looks of one call. Each look tells the ticker a call still runs
/// ([`super::ticker::Ticker::wake`]); a ticker that heard of no call for its idle second parks,
/// and a parked ticker would never bring the next look: a call with a budget past that second
/// (a slow configure on a busy node, or `--module-deadline-ms` over 1000) would run forever.
pub(super) const MAX_LOOK_TICKS: u64 = 250;
const _: () = assert!(MAX_LOOK_TICKS * (TICK.as_millis() as u64) * 2 <= super::ticker::IDLE_MS);

impl Limit {
    /// A call that may use `budget` of CPU is starting; `now` reads its thread's CPU clock,
    /// asked for only when `exact` (the ticker is late), else the first look reads it.
    #[inline]
    pub fn start(&mut self, budget: Duration, exact: bool, now: impl FnOnce() -> Duration) {
        self.budget = budget;
        self.base = exact.then(now);
    }

    /// The epoch reached the call's deadline while its thread's CPU clock read `cpu`.
    pub fn look(&mut self, cpu: Duration) -> Look {
        let Some(base) = self.base else {
            self.base = Some(cpu);
            return Look::Again(ticks_at_least(self.budget).min(MAX_LOOK_TICKS));
        };
        let used = cpu.saturating_sub(base);
        if used >= self.budget {
            return Look::Interrupt;
        }
        // CPU time runs no faster than the ticks, so the rest cannot be used up sooner.
        Look::Again(ticks_at_least(self.budget - used).min(MAX_LOOK_TICKS))
    }
}

/// Ticks that take at least `d`, and at least one.
fn ticks_at_least(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(TICK.as_nanos()))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// CPU time the calling thread has used.
pub fn thread_cpu() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_look_takes_the_reading_and_waits_the_whole_budget() {
        let mut l = Limit::default();
        l.start(5 * MS, false, || panic!("no reading as the call starts"));
        assert_eq!(l.look(100 * MS), Look::Again(5));
        assert_eq!(l.look(102 * MS), Look::Again(3), "2 ms used, 3 left");
        assert_eq!(l.look(104 * MS + MS / 2), Look::Again(1), "half a tick left is a tick");
        assert_eq!(l.look(105 * MS), Look::Interrupt);
    }

    #[test]
    fn a_long_budget_is_looked_at_before_the_ticker_could_park() {
        let mut l = Limit::default();
        l.start(Duration::from_secs(10), false, || MS);
        assert_eq!(l.look(MS), Look::Again(MAX_LOOK_TICKS));
        assert_eq!(
            l.look(2 * MS),
            Look::Again(MAX_LOOK_TICKS),
            "9.999 s left, looked at in 250 ms"
        );
        assert_eq!(l.look(10_000 * MS), Look::Again(1));
        assert_eq!(l.look(10_001 * MS), Look::Interrupt);
    }

    #[test]
    fn time_off_the_cpu_does_not_count() {
        let mut l = Limit::default();
        l.start(5 * MS, false, || MS);
        l.look(10 * MS);
        // However many ticks pass while the thread waits for a core, its clock stands still.
        for _ in 0..100 {
            assert_eq!(l.look(11 * MS), Look::Again(4));
        }
        assert_eq!(l.look(15 * MS), Look::Interrupt);
    }

    #[test]
    fn each_call_counts_from_its_own_first_look() {
        let mut l = Limit::default();
        l.start(5 * MS, false, || MS);
        l.look(MS);
        assert_eq!(l.look(9 * MS), Look::Interrupt);
        l.start(5 * MS, false, || MS);
        assert_eq!(l.look(9 * MS), Look::Again(5), "a new call, a new reading");
        assert_eq!(l.look(13 * MS), Look::Again(1));
    }

    #[test]
    fn a_call_started_while_the_ticker_is_late_counts_from_its_start() {
        let mut l = Limit::default();
        l.start(5 * MS, true, || 20 * MS);
        // The first tick came 4 ms of CPU after the start: those count.
        assert_eq!(l.look(24 * MS), Look::Again(1));
        assert_eq!(l.look(25 * MS), Look::Interrupt);
    }

    #[test]
    fn the_thread_clock_moves_with_work_on_this_thread() {
        let before = thread_cpu();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while thread_cpu() - before < 5 * MS {
            x = std::hint::black_box(x.wrapping_add(1));
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the thread's CPU clock stood still"
            );
        }
    }
}
