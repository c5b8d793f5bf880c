//! The loop every kernel backend (`vxlan`, `host-gw`) runs to keep its kernel entries equal to
//! the lease table, and the rules it keeps:
//!
//! - nothing is written before the first listing is in: a restarted agent adopts what the kernel
//!   holds, so no entry that will be re-added is ever deleted and pods lose no peer;
//! - a snapshot is one full round (read what the kernel holds, write the difference), so the first
//!   listing of 5,000 leases is one round, however it arrived;
//! - a delta writes the entries of the subnets it names and reads nothing: a new lease costs
//!   three netlink requests, whatever the table's size;
//! - a timer round re-reads the kernel and repairs what someone changed by hand;
//! - each update's generation is reported once the kernel holds it, which is what readiness
//!   waits for.
//!
//! What a round writes is decided by the backend's [`Kernel`] (over a sans-IO planner); this
//! loop only orders the work.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::netlink::NlError;
use crate::lease::table::{Changes, TableUpdate};
use crate::lease::Lease;
use crate::stats::DataplaneStats;

/// Wanted peers, by subnet.
pub type Peers<P> = BTreeMap<Ipv4Net, P>;

/// What one subnet wanted before a change and wants after it.
pub type Transition<P> = (Option<P>, Option<P>);

/// Entries written to the kernel, by what was done.
#[derive(Debug, Default)]
pub struct KernelWrites {
    /// Entries added or replaced.
    pub added: AtomicU64,
    /// Entries deleted.
    pub deleted: AtomicU64,
    /// Full rounds (kernel read back and compared).
    pub full_rounds: AtomicU64,
}

impl KernelWrites {
    /// Counts one round's writes.
    pub fn count(&self, added: usize, deleted: usize) {
        self.added.fetch_add(added as u64, Ordering::Relaxed);
        self.deleted.fetch_add(deleted as u64, Ordering::Relaxed);
    }
}

/// What a full round found wrong beyond repair.
pub type Fatal = String;

/// A backend's kernel state, as the reconcile loop drives it.
pub trait Kernel: Send + 'static {
    /// What one remote subnet wants.
    type Peer: Clone + PartialEq + Send + Sync + 'static;

    /// Reads what the kernel holds and writes the difference from `peers`. `first` is the
    /// round after the first listing; `Ok(Some(why))` means the node cannot run this backend.
    fn full(
        &mut self,
        peers: &Peers<Self::Peer>,
        first: bool,
    ) -> impl Future<Output = Result<Option<Fatal>, NlError>> + Send;

    /// Writes the entries of subnets whose peer went from `.0` to `.1`, reading nothing.
    fn delta(
        &mut self,
        peers: &Peers<Self::Peer>,
        changed: &[Transition<Self::Peer>],
    ) -> impl Future<Output = Result<(), NlError>> + Send;
}

/// One update, as peers.
#[derive(Debug, Clone)]
pub enum Work<P> {
    /// Every wanted peer.
    Snapshot(u64, Peers<P>),
    /// The subnets that changed and what each wants now.
    Delta(u64, Vec<(Ipv4Net, Option<P>)>),
}

impl<P> Work<P> {
    fn generation(&self) -> u64 {
        match self {
            Work::Snapshot(g, _) | Work::Delta(g, _) => *g,
        }
    }
}

/// The work `update` gives a backend that reads each lease with `peer_of` (None: the lease is
/// not one this backend can reach). This node's own subnet is never a peer.
pub fn work<P>(update: &TableUpdate, peer_of: impl Fn(&Lease) -> Option<P>) -> Work<P> {
    let own = update.own;
    match &update.changes {
        Changes::Snapshot => Work::Snapshot(
            update.generation,
            update
                .table
                .leases()
                .filter(|l| l.subnet != own)
                .filter_map(|l| peer_of(l).map(|p| (l.subnet, p)))
                .collect(),
        ),
        Changes::Delta(d) => Work::Delta(
            update.generation,
            d.iter()
                .filter(|c| c.subnet() != own)
                .map(|c| (c.subnet(), c.after().and_then(&peer_of)))
                .collect(),
        ),
    }
}

/// What a batch of work asks of the kernel.
#[derive(Debug, PartialEq)]
enum Step<P> {
    Full,
    Delta(Vec<(Option<P>, Option<P>)>),
}

/// Folds a batch into `peers` and says what to write: a full round if the batch holds a
/// snapshot, else each touched subnet's (before, after).
fn fold<P: Clone + PartialEq>(peers: &mut Peers<P>, batch: Vec<Work<P>>) -> Step<P> {
    let mut full = false;
    let mut before: HashMap<Ipv4Net, Option<P>> = HashMap::new();
    for w in batch {
        match w {
            Work::Snapshot(_, all) => {
                *peers = all;
                full = true;
            }
            Work::Delta(_, changes) => {
                for (net, now) in changes {
                    let was = match now {
                        Some(p) => peers.insert(net, p),
                        None => peers.remove(&net),
                    };
                    before.entry(net).or_insert(was);
                }
            }
        }
    }
    if full {
        return Step::Full;
    }
    let mut changed: Vec<_> = before
        .into_iter()
        .map(|(net, was)| (was, peers.get(&net).cloned()))
        .filter(|(was, now)| was != now)
        .collect();
    changed.sort_by_key(|(was, now)| was.is_none() as u8 + 2 * now.is_none() as u8);
    Step::Delta(changed)
}

/// How soon a failed round is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Runs `kernel` on the work from `rx` until the sender goes, reporting each generation the
/// kernel holds on `applied`; a fatal finding stops the data path through `stats`.
pub async fn drive<K: Kernel>(
    mut kernel: K,
    mut rx: mpsc::UnboundedReceiver<Work<K::Peer>>,
    applied: watch::Sender<u64>,
    check: Duration,
    stats: Arc<DataplaneStats>,
) {
    let mut peers: Peers<K::Peer> = BTreeMap::new();
    // Nothing is written before the first listing: until then the kernel's entries stand.
    let mut batch = loop {
        match rx.recv().await {
            None => return,
            Some(w @ Work::Snapshot(..)) => break vec![w],
            Some(Work::Delta(..)) => continue,
        }
    };
    let mut first = true;
    // Set by the timer and after a failed round: read the kernel back and write what it lacks.
    let mut want_full = false;
    // The newest update folded into `peers`: what a successful round makes the kernel hold.
    let mut generation = 0;
    loop {
        generation = batch.iter().map(Work::generation).fold(generation, u64::max);
        let folded = fold(&mut peers, batch);
        let step = if want_full { Step::Full } else { folded };
        let result = match &step {
            Step::Full => kernel.full(&peers, first).await,
            Step::Delta(changed) if changed.is_empty() => Ok(None),
            Step::Delta(changed) => kernel.delta(&peers, changed).await.map(|()| None),
        };
        let next_full = match result {
            Ok(Some(fatal)) => {
                stats.fail(fatal);
                return;
            }
            Ok(None) => {
                first &= !matches!(step, Step::Full);
                want_full = false;
                applied.send_replace(generation);
                Instant::now() + check
            }
            Err(e) => {
                tracing::warn!(error = %e, "kernel reconcile failed; a full round follows");
                want_full = true;
                Instant::now() + RETRY
            }
        };
        batch = tokio::select! {
            w = rx.recv() => {
                let Some(w) = w else { return };
                let mut b = vec![w];
                while let Ok(more) = rx.try_recv() {
                    b.push(more);
                }
                b
            }
            () = tokio::time::sleep_until(next_full) => {
                want_full = true;
                Vec::new()
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(i: u8) -> Ipv4Net {
        format!("10.0.{i}.0/24").parse().unwrap()
    }

    #[test]
    fn a_batch_with_a_snapshot_is_one_full_round() {
        let mut peers = Peers::new();
        let all: Peers<u8> = (1..=200).map(|i| (net(i), i)).collect();
        let step = fold(
            &mut peers,
            vec![
                Work::Delta(1, vec![(net(1), Some(9))]),
                Work::Snapshot(2, all),
                Work::Delta(3, vec![(net(2), None)]),
            ],
        );
        assert_eq!(step, Step::Full);
        assert_eq!(peers.len(), 199);
        assert_eq!(peers.get(&net(1)), Some(&1));
    }

    #[test]
    fn deltas_fold_to_each_subnets_net_change() {
        let mut peers: Peers<u8> = (1..=3).map(|i| (net(i), i)).collect();
        let step = fold(
            &mut peers,
            vec![
                Work::Delta(1, vec![(net(9), Some(9)), (net(1), None)]),
                Work::Delta(2, vec![(net(9), None), (net(2), Some(20))]),
                Work::Delta(3, vec![(net(3), Some(3))]),
            ],
        );
        // 9 came and went, 3 did not change: only 1 (gone) and 2 (changed) remain.
        assert_eq!(step, Step::Delta(vec![(Some(2), Some(20)), (Some(1), None)]));
    }

    /// A kernel that counts what it is asked to do.
    #[derive(Clone, Default)]
    struct Counting {
        full: Arc<AtomicU64>,
        delta_writes: Arc<AtomicU64>,
        fail_deltas: Arc<AtomicU64>,
    }

    impl Kernel for Counting {
        type Peer = u8;
        async fn full(&mut self, _: &Peers<u8>, _: bool) -> Result<Option<Fatal>, NlError> {
            self.full.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        }
        async fn delta(&mut self, _: &Peers<u8>, changed: &[(Option<u8>, Option<u8>)]) -> Result<(), NlError> {
            if self.fail_deltas.load(Ordering::Relaxed) > 0 {
                self.fail_deltas.fetch_sub(1, Ordering::Relaxed);
                return Err(NlError::NoIface("test".into()));
            }
            self.delta_writes.fetch_add(changed.len() as u64, Ordering::Relaxed);
            Ok(())
        }
    }

    fn start(
        k: &Counting,
    ) -> (
        mpsc::UnboundedSender<Work<u8>>,
        watch::Receiver<u64>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (applied, seen) = watch::channel(0);
        let stats = Arc::new(DataplaneStats::default());
        let task = tokio::spawn(drive(k.clone(), rx, applied, Duration::from_secs(3600), stats));
        (tx, seen, task)
    }

    #[tokio::test]
    async fn nothing_runs_before_the_first_snapshot_and_generations_are_reported() {
        let k = Counting::default();
        let (tx, mut seen, task) = start(&k);
        tx.send(Work::Delta(1, vec![(net(1), Some(1))])).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*seen.borrow(), 0, "a delta before the first listing writes nothing");
        assert_eq!(
            k.full.load(Ordering::Relaxed) + k.delta_writes.load(Ordering::Relaxed),
            0
        );
        tx.send(Work::Snapshot(2, (1..=100).map(|i| (net(i), i)).collect()))
            .unwrap();
        seen.wait_for(|g| *g == 2).await.unwrap();
        tx.send(Work::Delta(3, vec![(net(101), Some(101))])).unwrap();
        seen.wait_for(|g| *g == 3).await.unwrap();
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_snapshot_then_single_changes_cost_one_round_then_one_write_each() {
        let k = Counting::default();
        let (tx, mut seen, task) = start(&k);
        tx.send(Work::Snapshot(1, (1..=200).map(|i| (net(i), i)).collect()))
            .unwrap();
        for g in 2..=11u8 {
            tx.send(Work::Delta(u64::from(g), vec![(net(g + 200), Some(1))]))
                .unwrap();
        }
        seen.wait_for(|g| *g == 11).await.unwrap();
        assert_eq!(k.full.load(Ordering::Relaxed), 1);
        assert_eq!(k.delta_writes.load(Ordering::Relaxed), 10);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_delta_is_repaired_by_a_full_round() {
        let k = Counting::default();
        let (tx, mut seen, task) = start(&k);
        tx.send(Work::Snapshot(1, (1..=5).map(|i| (net(i), i)).collect()))
            .unwrap();
        seen.wait_for(|g| *g == 1).await.unwrap();
        k.fail_deltas.store(1, Ordering::Relaxed);
        tx.send(Work::Delta(2, vec![(net(9), Some(9))])).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*seen.borrow(), 1, "a failed write is not reported as held");
        seen.wait_for(|g| *g == 2).await.unwrap();
        assert_eq!(k.full.load(Ordering::Relaxed), 2, "the repair was a full round");
        drop(tx);
        task.await.unwrap();
    }
}
