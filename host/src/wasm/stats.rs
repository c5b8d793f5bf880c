//! Per-module counters, shared by every instance of a module on this node and read by the
//! metrics endpoint. They outlive module versions: a swap does not reset them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a module said, or what was done in its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[repr(usize)]
pub enum VerdictKind {
    /// Policy: allow.
    Allow = 0,
    /// Policy: drop.
    Drop = 1,
    /// Policy: allow and log.
    Log = 2,
    /// Routing: deliver to the owner.
    Owner = 3,
    /// Routing: through another node.
    Via = 4,
    /// The module failed; its failure policy decided.
    Failure = 5,
}

impl VerdictKind {
    /// Every kind, in index order.
    pub const ALL: [VerdictKind; 6] = [
        VerdictKind::Allow,
        VerdictKind::Drop,
        VerdictKind::Log,
        VerdictKind::Owner,
        VerdictKind::Via,
        VerdictKind::Failure,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            VerdictKind::Allow => "allow",
            VerdictKind::Drop => "drop",
            VerdictKind::Log => "log",
            VerdictKind::Owner => "owner",
            VerdictKind::Via => "via",
            VerdictKind::Failure => "failure",
        }
    }
}

/// Most decisions kept in a module's trace.
pub const TRACE_LEN: usize = 64;

/// Why a module's decision came out as it did, kept without formatting anything on the data
/// path (the API formats it when asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceReason {
    /// The module answered (`in_flight`: the flow was already established).
    Answered {
        /// The flow was in flight when decided.
        in_flight: bool,
    },
    /// A dry-run module asked for a drop that was not enforced.
    DryRunDrop,
    /// A routing module steered the flow.
    Via {
        /// Through this node.
        via: std::net::Ipv4Addr,
        /// Not applied (dry run).
        dry_run: bool,
    },
    /// A routing module left the flow to the owner.
    Owner,
    /// The call failed; the failure policy decided.
    Failed {
        /// What failed.
        why: Box<str>,
        /// The flow was dropped (fail-closed).
        dropped: bool,
    },
}

impl std::fmt::Display for TraceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceReason::Answered { in_flight: false } => f.write_str("policy answered"),
            TraceReason::Answered { in_flight: true } => f.write_str("policy answered (flow in flight)"),
            TraceReason::DryRunDrop => f.write_str("dry run: the drop was not enforced"),
            TraceReason::Via { via, dry_run } => {
                write!(f, "steer via {via}{}", if *dry_run { " (dry run)" } else { "" })
            }
            TraceReason::Owner => f.write_str("deliver to the owner"),
            TraceReason::Failed { why, dropped: true } => write!(f, "{why}; dropped (fail-closed)"),
            TraceReason::Failed { why, dropped: false } => write!(f, "{why}; skipped (fail-open or dry run)"),
        }
    }
}

/// One decision as the data path records it: plain values, no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRecord {
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
    /// Egress (true) or ingress.
    pub egress: bool,
    /// IP protocol number.
    pub protocol: u8,
    /// Source address and port.
    pub src: (std::net::Ipv4Addr, u16),
    /// Destination address and port.
    pub dst: (std::net::Ipv4Addr, u16),
    /// What was decided.
    pub verdict: VerdictKind,
    /// Why.
    pub reason: TraceReason,
}

/// One decision a module made (or its failure policy made for it), for the decision trace.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct TraceEntry {
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
    /// The module.
    pub module: String,
    /// Which way the flow crossed the node.
    pub direction: TraceDirection,
    /// IP protocol number.
    pub protocol: u8,
    /// Source address and port.
    pub src: String,
    /// Destination address and port.
    pub dst: String,
    /// What was decided.
    pub verdict: VerdictKind,
    /// Why: the module's answer, dry run, or the failure and its policy.
    pub reason: String,
}

/// Which way a decided flow crossed the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TraceDirection {
    /// From this node's pods.
    Egress,
    /// To this node's pods.
    Ingress,
}

/// Most counters one module may define.
pub const MAX_COUNTERS: usize = 64;
/// Guest log lines let through per second (and as a burst).
const LOG_PER_SEC: f64 = 10.0;
const LOG_BURST: f64 = 20.0;

/// One module's counters.
#[derive(Debug)]
pub struct ModuleStats {
    /// Decision calls made.
    pub calls: AtomicU64,
    /// Nanoseconds spent in decision calls.
    pub call_ns: AtomicU64,
    /// Calls that trapped.
    pub traps: AtomicU64,
    /// Calls interrupted at their deadline.
    pub timeouts: AtomicU64,
    /// Calls that returned a verdict word the ABI does not define.
    pub bad_verdicts: AtomicU64,
    /// Packets answered from the verdict cache while this module was in the chain.
    pub cache_hits: AtomicU64,
    /// Drops a dry-run module asked for and did not get.
    pub dry_run_drops: AtomicU64,
    /// Times the module was quarantined.
    pub quarantines: AtomicU64,
    /// Guest log lines suppressed by the rate limit.
    pub logs_suppressed: AtomicU64,
    verdicts: [AtomicU64; 6],
    counters: Mutex<Vec<(String, Arc<AtomicI64>)>>,
    log_bucket: Mutex<(f64, Instant)>,
    quarantine: Mutex<Quarantine>,
    /// Until when the module is benched (read on every call without the lock).
    benched_until_ms: AtomicU64,
    /// A failure happened in the current window: successes need counting (under the lock).
    failing: std::sync::atomic::AtomicBool,
    trace: Mutex<std::collections::VecDeque<TraceRecord>>,
}

impl Default for ModuleStats {
    fn default() -> Self {
        ModuleStats {
            calls: AtomicU64::new(0),
            call_ns: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            bad_verdicts: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            dry_run_drops: AtomicU64::new(0),
            quarantines: AtomicU64::new(0),
            logs_suppressed: AtomicU64::new(0),
            verdicts: Default::default(),
            counters: Mutex::new(Vec::new()),
            log_bucket: Mutex::new((LOG_BURST, Instant::now())),
            quarantine: Mutex::new(Quarantine::default()),
            benched_until_ms: AtomicU64::new(0),
            failing: std::sync::atomic::AtomicBool::new(false),
            trace: Mutex::new(std::collections::VecDeque::with_capacity(TRACE_LEN)),
        }
    }
}

/// Failures in the current window, and until when the module is benched.
#[derive(Debug, Default)]
struct Quarantine {
    window_start_ms: u64,
    failures: u32,
    successes: u32,
    /// Time spent failing in the window: rebuilding instances after failures, in ms.
    failing_ms: u64,
    until_ms: u64,
    backoff_ms: u64,
}

impl Quarantine {
    /// Starts a new window when the current one is over.
    fn roll(&mut self, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.window_start_ms) < WINDOW_MS {
            return false;
        }
        self.window_start_ms = now_ms;
        self.failures = 0;
        self.successes = 0;
        self.failing_ms = 0;
        true
    }

    /// Benches the module from `now_ms` for a backoff that doubles each time; returns until when.
    fn bench(&mut self, now_ms: u64) -> u64 {
        self.backoff_ms = if self.backoff_ms == 0 {
            FIRST_BACKOFF_MS
        } else {
            (self.backoff_ms * 2).min(MAX_BACKOFF_MS)
        };
        self.until_ms = now_ms + self.backoff_ms;
        self.failures = 0;
        self.successes = 0;
        self.failing_ms = 0;
        self.until_ms
    }
}

/// A window in which enough failures, outnumbering successes, quarantine a module.
const WINDOW_MS: u64 = 10_000;
const FAILURES_TO_QUARANTINE: u32 = 20;
/// Failing this long in one window quarantines too: a few failures that each cost much (a slow
/// `weft_configure` rerun after every trap) hurt as much as many cheap ones.
const FAILING_MS_TO_QUARANTINE: u64 = 1_000;
const FIRST_BACKOFF_MS: u64 = 30_000;
const MAX_BACKOFF_MS: u64 = 300_000;

/// One worker's counts for one module since it last published them. A shared counter bumped
/// per call is a locked instruction, and a locked instruction waits for every store before it
/// (a new flow's cache insert, a likely miss), so a worker counts here and adds once per batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Decision calls made.
    pub calls: u64,
    /// Nanoseconds spent in decision calls (sampled, scaled).
    pub call_ns: u64,
    verdicts: [u64; 6],
}

impl Tally {
    /// Counts one verdict.
    #[inline]
    pub fn verdict(&mut self, k: VerdictKind) {
        self.verdicts[k as usize] += 1;
    }
}

impl ModuleStats {
    /// Counts one verdict.
    pub fn verdict(&self, k: VerdictKind) {
        self.verdicts[k as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds what a worker counted, and zeroes its tally.
    pub fn publish(&self, t: &mut Tally) {
        if *t == Tally::default() {
            return;
        }
        let add = |c: &AtomicU64, n: u64| {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&self.calls, t.calls);
        add(&self.call_ns, t.call_ns);
        for (c, n) in self.verdicts.iter().zip(t.verdicts) {
            add(c, n);
        }
        *t = Tally::default();
    }

    /// Verdicts of one kind so far.
    pub fn verdicts(&self, k: VerdictKind) -> u64 {
        self.verdicts[k as usize].load(Ordering::Relaxed)
    }

    /// The shared cell of the counter `name`, defining it; `None` for a bad name or when the
    /// module already has [`MAX_COUNTERS`].
    pub fn counter(&self, name: &str) -> Option<Arc<AtomicI64>> {
        let valid =
            !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return None;
        }
        let mut cs = self.counters.lock().ok()?;
        if let Some((_, c)) = cs.iter().find(|(n, _)| n == name) {
            return Some(c.clone());
        }
        if cs.len() >= MAX_COUNTERS {
            return None;
        }
        let c = Arc::new(AtomicI64::new(0));
        cs.push((name.to_string(), c.clone()));
        Some(c)
    }

    /// The module's own counters, by name.
    pub fn counters(&self) -> Vec<(String, i64)> {
        self.counters
            .lock()
            .map(|cs| cs.iter().map(|(n, c)| (n.clone(), c.load(Ordering::Relaxed))).collect())
            .unwrap_or_default()
    }

    /// Whether one more guest log line may go out now.
    pub fn log_allowed(&self) -> bool {
        let Ok(mut b) = self.log_bucket.lock() else {
            return false;
        };
        let now = Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * LOG_PER_SEC).min(LOG_BURST);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            self.logs_suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Records the outcome of a call; true when this failure put the module in quarantine.
    pub fn outcome(&self, ok: bool, now_ms: u64) -> bool {
        // A module that has not failed lately costs no lock per call.
        if ok && !self.failing.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(mut q) = self.quarantine.lock() else {
            return false;
        };
        if q.roll(now_ms) {
            self.failing.store(!ok, Ordering::Relaxed);
        }
        if ok {
            q.successes = q.successes.saturating_add(1);
            // A clean run after a quarantine earns the short backoff back.
            if q.successes > 1000 {
                q.backoff_ms = 0;
            }
            return false;
        }
        q.failures += 1;
        self.failing.store(true, Ordering::Relaxed);
        if q.failures >= FAILURES_TO_QUARANTINE && q.failures > q.successes && now_ms >= q.until_ms {
            self.bench(&mut q, now_ms);
            return true;
        }
        false
    }

    /// Records `spent` of work a failure caused (making an instance to replace one that
    /// trapped, or one that could not be made); true when this put the module in quarantine.
    pub fn failed_for(&self, spent: std::time::Duration, now_ms: u64) -> bool {
        let Ok(mut q) = self.quarantine.lock() else {
            return false;
        };
        q.roll(now_ms);
        self.failing.store(true, Ordering::Relaxed);
        q.failing_ms = q.failing_ms.saturating_add(spent.as_millis() as u64);
        if q.failing_ms >= FAILING_MS_TO_QUARANTINE && now_ms >= q.until_ms {
            self.bench(&mut q, now_ms);
            return true;
        }
        false
    }

    fn bench(&self, q: &mut Quarantine, now_ms: u64) {
        let until = q.bench(now_ms);
        self.benched_until_ms.store(until, Ordering::Relaxed);
        self.quarantines.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(until_ms = until, "module quarantined");
    }

    /// Records a decision in the bounded trace (the oldest goes first). A forwarding thread
    /// never waits for it: while another holds the trace, this record is skipped.
    pub fn trace(&self, e: TraceRecord) {
        if let Ok(mut t) = self.trace.try_lock() {
            if t.len() == TRACE_LEN {
                t.pop_front();
            }
            t.push_back(e);
        }
    }

    /// The trace, oldest first, as the API shows it.
    pub fn traced(&self, module: &str) -> Vec<TraceEntry> {
        let records: Vec<TraceRecord> = self
            .trace
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        records
            .into_iter()
            .map(|r| TraceEntry {
                at_ms: r.at_ms,
                module: module.to_string(),
                direction: if r.egress {
                    TraceDirection::Egress
                } else {
                    TraceDirection::Ingress
                },
                protocol: r.protocol,
                src: format!("{}:{}", r.src.0, r.src.1),
                dst: format!("{}:{}", r.dst.0, r.dst.1),
                verdict: r.verdict,
                reason: r.reason.to_string(),
            })
            .collect()
    }

    /// Whether the module is benched at `now_ms`.
    #[inline]
    pub fn quarantined(&self, now_ms: u64) -> bool {
        now_ms < self.benched_until_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_quarantine_with_growing_backoff_but_rare_ones_do_not() {
        let s = ModuleStats::default();
        for i in 0..200 {
            assert!(!s.outcome(i % 10 != 0, 1_000 + i));
        }
        assert!(
            !s.quarantined(2_000),
            "1 failure in 10 is contained per flow, not benched"
        );
        let mut hit = None;
        for i in 0..FAILURES_TO_QUARANTINE as u64 {
            if s.outcome(false, 20_000 + i) {
                hit = Some(i);
            }
        }
        assert_eq!(hit, Some(u64::from(FAILURES_TO_QUARANTINE) - 1));
        assert!(s.quarantined(20_000 + FIRST_BACKOFF_MS - 1));
        assert!(!s.quarantined(20_100 + FIRST_BACKOFF_MS));
        for i in 0..FAILURES_TO_QUARANTINE as u64 {
            s.outcome(false, 60_000 + i);
        }
        assert!(
            s.quarantined(60_000 + 2 * FIRST_BACKOFF_MS - 100),
            "the second backoff is longer"
        );
        assert_eq!(s.quarantines.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn few_slow_failures_quarantine_by_the_time_they_cost() {
        let s = ModuleStats::default();
        let slow = std::time::Duration::from_millis(300);
        // Three traps, each followed by a 300 ms rebuild: far below the count, not yet a second.
        for i in 0..3 {
            s.outcome(false, 1_000 + i * 400);
            assert!(!s.failed_for(slow, 1_000 + i * 400 + 300));
        }
        assert!(!s.quarantined(2_500));
        s.outcome(false, 2_200);
        assert!(
            s.failed_for(slow, 2_500),
            "the fourth rebuild makes 1.2 s spent failing"
        );
        assert!(s.quarantined(2_501));
        // A new window forgets old failing time.
        let t = s.quarantines.load(Ordering::Relaxed);
        let later = 2_500 + FIRST_BACKOFF_MS + WINDOW_MS;
        assert!(!s.failed_for(std::time::Duration::from_millis(900), later));
        assert!(!s.failed_for(std::time::Duration::from_millis(900), later + WINDOW_MS));
        assert_eq!(s.quarantines.load(Ordering::Relaxed), t);
    }

    #[test]
    fn counters_are_named_bounded_and_shared() {
        let s = ModuleStats::default();
        let a = s.counter("hits").unwrap();
        a.fetch_add(2, Ordering::Relaxed);
        s.counter("hits").unwrap().fetch_add(3, Ordering::Relaxed);
        assert_eq!(s.counters(), vec![("hits".to_string(), 5)]);
        assert!(s.counter("bad name").is_none());
        assert!(s.counter("").is_none());
        for i in 1..MAX_COUNTERS {
            assert!(s.counter(&format!("c{i}")).is_some());
        }
        assert!(s.counter("one_too_many").is_none());
    }

    #[test]
    fn guest_logs_are_rate_limited() {
        let s = ModuleStats::default();
        let allowed = (0..100).filter(|_| s.log_allowed()).count();
        assert!((20..=21).contains(&allowed), "{allowed}");
        assert!(s.logs_suppressed.load(Ordering::Relaxed) >= 79);
    }
}
