//! The lease follower: turns what the store reports ([`Feed`]s) into numbered table updates and
//! hands each, in order, to the node's consumers (the data path, the API's table, the event
//! stream). The first listing is one snapshot, so a node joining a cluster of 5,000 leases does
//! one reconcile, not 5,000; after that each update carries only the subnets that changed, and
//! whatever arrived together is one update. It also notices when this node's own lease vanishes
//! or is taken, so the keeper re-acquires it.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch, Notify};

use crate::lease::table::{Changes, LeaseTable, TableUpdate};
use crate::lease::watch::Feed;
use crate::lease::LeaseEvent;

/// Whether this node still holds its lease, as the table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnLease {
    /// The table holds it, with this node's address.
    Held,
    /// It is gone from the table.
    Vanished,
    /// Another node holds the subnet.
    Taken(Ipv4Addr),
}

/// The follower's state: the table and the update count.
#[derive(Debug)]
pub struct Follower {
    table: LeaseTable,
    generation: u64,
    own: Ipv4Net,
    node_ip: Ipv4Addr,
    synced: bool,
}

impl Follower {
    /// A follower for the node at `node_ip` holding `own`.
    pub fn new(own: Ipv4Net, node_ip: Ipv4Addr) -> Self {
        Follower {
            table: LeaseTable::default(),
            generation: 0,
            own,
            node_ip,
            synced: false,
        }
    }

    /// The table as last updated.
    pub fn table(&self) -> &LeaseTable {
        &self.table
    }

    fn update(&mut self, changes: Changes) -> TableUpdate {
        self.generation += 1;
        TableUpdate {
            generation: self.generation,
            own: self.own,
            table: self.table.clone(),
            changes,
        }
    }

    /// Folds `feeds` (in order) into one update. A listing among them makes it a snapshot;
    /// otherwise it carries the net change per subnet. `None` when the table did not change.
    pub fn absorb(&mut self, feeds: impl IntoIterator<Item = Feed>) -> Option<TableUpdate> {
        let version = self.table.version();
        let mut listed = false;
        let mut events: Vec<LeaseEvent> = Vec::new();
        for f in feeds {
            match f {
                Feed::Listing(leases) => {
                    self.table.replace(leases);
                    events.clear();
                    listed = true;
                }
                Feed::Events(e) if listed || !self.synced => {
                    for ev in e {
                        self.table.apply(ev);
                    }
                }
                Feed::Events(e) => events.extend(e),
            }
        }
        if listed || !self.synced {
            if !listed && !self.synced {
                // Events before any listing say nothing about the rest of the table.
                return None;
            }
            self.synced = true;
            return Some(self.update(Changes::Snapshot));
        }
        let changes = self.table.apply_all(events);
        // Renewals change no route but do change the table others serve (expiries).
        (self.table.version() != version).then(|| self.update(Changes::Delta(changes)))
    }

    /// This node's subnet changed (it re-acquired another): every consumer starts over.
    pub fn set_own(&mut self, own: Ipv4Net) -> Option<TableUpdate> {
        if own == self.own {
            return None;
        }
        self.own = own;
        self.synced.then(|| self.update(Changes::Snapshot))
    }

    /// What the table says of this node's lease.
    pub fn own_lease(&self) -> OwnLease {
        match self.table.get(&self.own) {
            None => OwnLease::Vanished,
            Some(l) if l.attrs.public_ip != self.node_ip => OwnLease::Taken(l.attrs.public_ip),
            Some(_) => OwnLease::Held,
        }
    }

    /// Whether `u` could have changed this node's lease.
    fn touches_own(&self, u: &TableUpdate) -> bool {
        match &u.changes {
            Changes::Snapshot => true,
            Changes::Delta(d) => d.iter().any(|c| c.subnet() == self.own),
        }
    }
}

/// A consumer of table updates.
pub type Sink = Box<dyn Fn(&TableUpdate) + Send + Sync>;

/// Most feeds folded into one update.
const MAX_FOLD: usize = 1024;

/// Runs the follower: applies every feed, hands each update to every sink in order, follows
/// this node's subnet through `own`, and wakes `lost` when this node's lease vanishes or is
/// taken. Ends when the feed does.
pub async fn run(
    mut f: Follower,
    mut feeds: mpsc::UnboundedReceiver<Feed>,
    mut own: watch::Receiver<Ipv4Net>,
    sinks: Vec<Sink>,
    lost: Arc<Notify>,
) {
    loop {
        let update = tokio::select! {
            first = feeds.recv() => {
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_FOLD {
                    match feeds.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                f.absorb(batch)
            }
            r = own.changed() => {
                if r.is_err() {
                    return;
                }
                let now = *own.borrow_and_update();
                f.set_own(now)
            }
        };
        let Some(u) = update else { continue };
        for sink in &sinks {
            sink(&u);
        }
        if f.touches_own(&u) {
            match f.own_lease() {
                OwnLease::Held => {}
                OwnLease::Vanished => {
                    tracing::warn!(subnet = %f.own, "this node's lease vanished from the store; re-acquiring");
                    lost.notify_one();
                }
                OwnLease::Taken(other) => {
                    tracing::error!(subnet = %f.own, %other, "another node took this node's subnet; re-acquiring");
                    lost.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::lease::table::Change;
    use crate::lease::{Lease, LeaseAttrs};

    fn lease(i: u32) -> Lease {
        Lease {
            subnet: Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::from(0xc612_0000 | i), "udp", serde_json::Value::Null),
            expiration: SystemTime::now(),
            revision: 1,
            ttl_handle: 0,
        }
    }

    fn follower() -> Follower {
        Follower::new(lease(1).subnet, lease(1).attrs.public_ip)
    }

    #[test]
    fn the_first_listing_of_n_leases_is_one_snapshot() {
        let mut f = follower();
        let u = f
            .absorb([Feed::Listing((1..=5_000).map(lease).collect())])
            .expect("an update");
        assert_eq!((u.generation, u.size()), (1, 5_000));
        assert_eq!(u.changes, Changes::Snapshot);
        assert_eq!(f.own_lease(), OwnLease::Held);
    }

    #[test]
    fn later_events_cost_what_changed() {
        let mut f = follower();
        f.absorb([Feed::Listing((1..=5_000).map(lease).collect())]);
        let u = f
            .absorb([
                Feed::Events(vec![LeaseEvent::Upserted(lease(6_000))]),
                Feed::Events(vec![LeaseEvent::Removed(lease(7).subnet)]),
            ])
            .expect("an update");
        assert_eq!(u.generation, 2);
        match &u.changes {
            Changes::Delta(d) => {
                assert_eq!(d.len(), 2, "{d:?}");
                assert!(matches!(&d[0], Change::Removed(l) if l.subnet == lease(7).subnet));
                assert!(matches!(&d[1], Change::Added(l) if l.subnet == lease(6_000).subnet));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(u.table.len(), 5_000);
    }

    #[test]
    fn a_renewal_updates_the_table_with_no_change_and_nothing_is_no_update() {
        let mut f = follower();
        f.absorb([Feed::Listing(vec![lease(1), lease(2)])]);
        let mut renewed = lease(2);
        renewed.revision = 9;
        let u = f
            .absorb([Feed::Events(vec![LeaseEvent::Upserted(renewed)])])
            .expect("an update");
        assert_eq!(u.changes, Changes::Delta(vec![]));
        assert_eq!(u.table.get(&lease(2).subnet).unwrap().revision, 9);
        assert!(f
            .absorb([Feed::Events(vec![LeaseEvent::Removed(lease(3).subnet)])])
            .is_none());
    }

    #[test]
    fn a_relisting_is_a_snapshot_and_events_before_the_first_listing_wait() {
        let mut f = follower();
        assert!(f.absorb([Feed::Events(vec![LeaseEvent::Upserted(lease(2))])]).is_none());
        let u = f
            .absorb([
                Feed::Events(vec![LeaseEvent::Upserted(lease(3))]),
                Feed::Listing(vec![lease(1), lease(4)]),
                Feed::Events(vec![LeaseEvent::Upserted(lease(5))]),
            ])
            .unwrap();
        assert_eq!(u.changes, Changes::Snapshot);
        let subnets: Vec<_> = u.table.leases().map(|l| l.subnet).collect();
        assert_eq!(subnets, vec![lease(1).subnet, lease(4).subnet, lease(5).subnet]);
    }

    #[test]
    fn losing_the_own_lease_is_noticed() {
        let mut f = follower();
        f.absorb([Feed::Listing(vec![lease(1), lease(2)])]);
        let mut taken = lease(1);
        taken.attrs.public_ip = "198.51.100.7".parse().unwrap();
        let u = f.absorb([Feed::Events(vec![LeaseEvent::Upserted(taken)])]).unwrap();
        assert!(f.touches_own(&u));
        assert_eq!(f.own_lease(), OwnLease::Taken("198.51.100.7".parse().unwrap()));
        f.absorb([Feed::Events(vec![LeaseEvent::Removed(lease(1).subnet)])]);
        assert_eq!(f.own_lease(), OwnLease::Vanished);
        let u = f
            .absorb([Feed::Events(vec![LeaseEvent::Removed(lease(2).subnet)])])
            .unwrap();
        assert!(!f.touches_own(&u), "another lease's change says nothing of ours");
    }

    #[test]
    fn a_new_own_subnet_restarts_every_consumer() {
        let mut f = follower();
        assert!(
            f.set_own(lease(9).subnet).is_none(),
            "nothing to restart before the first listing"
        );
        f.absorb([Feed::Listing(vec![lease(1), lease(2)])]);
        let u = f.set_own(lease(3).subnet).unwrap();
        assert_eq!((u.changes.clone(), u.own), (Changes::Snapshot, lease(3).subnet));
        assert!(f.set_own(lease(3).subnet).is_none());
    }

    #[tokio::test]
    async fn run_hands_every_update_to_every_sink_in_order() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (_own_tx, own_rx) = watch::channel(lease(1).subnet);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let lost = Arc::new(Notify::new());
        tx.send(Feed::Listing((1..=100).map(lease).collect())).unwrap();
        tx.send(Feed::Events(vec![LeaseEvent::Removed(lease(1).subnet)]))
            .unwrap();
        drop(tx);
        let sink: Sink = Box::new(move |u| s2.lock().unwrap().push((u.generation, u.size())));
        run(follower(), rx, own_rx, vec![sink], lost.clone()).await;
        // Both feeds were queued together: one snapshot holds them.
        assert_eq!(*seen.lock().unwrap(), vec![(1, 99)]);
        tokio::time::timeout(std::time::Duration::from_secs(1), lost.notified())
            .await
            .expect("the vanished own lease woke the keeper");
    }
}
