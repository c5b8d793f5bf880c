//! Ready instances of each module, made off the data path. A forwarding thread never compiles,
//! instantiates or configures a module: it takes an instance some other thread prepared, and
//! when it has to throw one away (a trap leaves memory inconsistent) it takes the next. A module
//! whose `weft_configure` is slow therefore slows down nobody's packets; while it has no ready
//! instance, its flows get its failure policy (briefly, so they are asked again soon).
//!
//! One preparer thread per node refills every module's spares to one per worker plus one, when
//! a worker takes one and when a chain is loaded. The time it spends making instances that
//! replace failed ones counts as time the module spent failing (quarantine).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::chain::LoadedModule;
use super::instance::{HostCtx, Instance, Leases};
use super::runtime::Runtime;

/// A module's ready instances.
#[derive(Default)]
pub struct Spares {
    ready: Mutex<Vec<Instance>>,
    /// Instances taken to replace one that failed, not yet made again.
    replacing: AtomicUsize,
}

impl Spares {
    /// A ready instance, if there is one. The lock is only ever held to push or pop (an
    /// instance is made before its lock is taken), so this waits nanoseconds at most. Giving up
    /// when another thread held it instead made a worker that met a new chain at the same
    /// moment as its partner, or as the preparer's refill, apply the failure policy to the
    /// flow: a closed module dropped a TCP flow's window, and the flow stalled for its 200 ms
    /// retransmission timeout.
    #[inline]
    pub fn take(&self) -> Option<Instance> {
        self.ready.lock().ok().and_then(|mut r| r.pop())
    }

    /// How many are ready.
    pub fn len(&self) -> usize {
        self.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// True when none is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn put(&self, i: Instance) {
        if let Ok(mut r) = self.ready.lock() {
            r.push(i);
        }
    }
}

/// Asks the preparer for more instances.
#[derive(Clone)]
pub struct Preparer {
    tx: SyncSender<Weak<LoadedModule>>,
    workers: Arc<AtomicUsize>,
}

impl Preparer {
    /// Starts the preparer thread for modules run by `rt`, seeing `leases`.
    pub fn start(rt: Arc<Runtime>, leases: Arc<Leases>) -> std::io::Result<Preparer> {
        // Requests beyond this wait for the next take: the thread refills a module fully anyway.
        let (tx, rx) = sync_channel(256);
        let workers = Arc::new(AtomicUsize::new(0));
        let w = workers.clone();
        std::thread::Builder::new()
            .name("weft-wasm-prepare".into())
            .spawn(move || prepare(&rx, &rt, &leases, &w))?;
        Ok(Preparer { tx, workers })
    }

    /// A worker came (true) or went (false): each wants its own instance of every module.
    pub fn worker(&self, arrived: bool) {
        if arrived {
            self.workers.fetch_add(1, Ordering::Relaxed);
        } else {
            self.workers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// How many spares each module keeps.
    pub fn target(&self) -> usize {
        self.workers.load(Ordering::Relaxed) + 1
    }

    /// Refill `m` soon (without waiting; a full request queue means a refill is due anyway).
    pub fn refill(&self, m: &Arc<LoadedModule>, replacing: bool) {
        if replacing {
            m.spares.replacing.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.tx.try_send(Arc::downgrade(m));
    }

    /// Makes `m`'s spares now, on the calling thread (the compile pool, while a chain loads),
    /// so a new chain starts with every worker's instance ready.
    pub fn fill_now(&self, rt: &Runtime, leases: &Arc<Leases>, m: &LoadedModule) {
        fill(rt, leases, m, self.target());
    }
}

fn fill(rt: &Runtime, leases: &Arc<Leases>, m: &LoadedModule, target: usize) {
    let Ok(compiled) = &m.compiled else { return };
    while m.spares.len() < target {
        let t = Instant::now();
        let ctx = HostCtx::new(rt, m.name.clone(), m.stats.clone(), leases.clone());
        let made = Instance::new(rt, compiled, ctx, &m.config);
        let spent = t.elapsed();
        let replacing = m
            .spares
            .replacing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        let now_ms = super::chain::clock_ms();
        match made {
            Ok(i) => {
                if replacing {
                    // Rebuilding after a failure is time the module made everyone spend failing.
                    m.stats.failed_for(spent, now_ms);
                }
                m.spares.put(i);
            }
            Err(e) => {
                m.stats.outcome(false, now_ms);
                m.stats.failed_for(spent, now_ms);
                tracing::debug!(module = %m.name, error = %e, "cannot prepare an instance");
                return;
            }
        }
        if m.stats.quarantined(now_ms) {
            return;
        }
    }
}

fn prepare(rx: &Receiver<Weak<LoadedModule>>, rt: &Runtime, leases: &Arc<Leases>, workers: &AtomicUsize) {
    while let Ok(m) = rx.recv() {
        let Some(m) = m.upgrade() else { continue };
        fill(rt, leases, &m, workers.load(Ordering::Relaxed) + 1);
    }
}
