//! The cluster's lease table as one node follows it, and the updates its consumers apply.
//!
//! The table is a persistent map: a copy costs O(1) and a change O(log n), so every consumer
//! (the data path, the Wasm lease view, the API) can hold the version it last saw while the
//! follower moves on, and no lease change ever costs a walk over the whole table. Updates say
//! what changed, with the old value, so a consumer undoes exactly that and touches nothing else.

use imbl::OrdMap;
use ipnet::Ipv4Net;

use super::{Lease, LeaseEvent};

/// One lease's change, with what it was before.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A lease appeared.
    Added(Lease),
    /// A lease's attributes changed (a renewal that changes nothing else is not a change).
    Changed {
        /// The lease before.
        old: Lease,
        /// The lease now.
        new: Lease,
    },
    /// A lease went away (deleted or expired).
    Removed(Lease),
}

impl Change {
    /// The subnet that changed.
    pub fn subnet(&self) -> Ipv4Net {
        match self {
            Change::Added(l) | Change::Removed(l) => l.subnet,
            Change::Changed { new, .. } => new.subnet,
        }
    }

    /// The lease before the change, if there was one.
    pub fn before(&self) -> Option<&Lease> {
        match self {
            Change::Added(_) => None,
            Change::Changed { old, .. } | Change::Removed(old) => Some(old),
        }
    }

    /// The lease after the change, if there is one.
    pub fn after(&self) -> Option<&Lease> {
        match self {
            Change::Removed(_) => None,
            Change::Changed { new, .. } | Change::Added(new) => Some(new),
        }
    }
}

/// What changed since a consumer's last update.
#[derive(Debug, Clone, PartialEq)]
pub enum Changes {
    /// Take the whole table: the first listing, a re-listing after the watch broke, or this
    /// node's own subnet changed. A consumer makes its state equal to the table.
    Snapshot,
    /// Apply these changes, one per subnet, in subnet order.
    Delta(Vec<Change>),
}

/// One update of the lease table, in the order consumers must apply them.
#[derive(Debug, Clone)]
pub struct TableUpdate {
    /// Counts updates from 1; a consumer reports the last one it holds.
    pub generation: u64,
    /// This node's own subnet (never routed to).
    pub own: Ipv4Net,
    /// The table after the update.
    pub table: LeaseTable,
    /// What changed.
    pub changes: Changes,
}

impl TableUpdate {
    /// The number of subnets this update touches: the table for a snapshot.
    pub fn size(&self) -> usize {
        match &self.changes {
            Changes::Snapshot => self.table.len(),
            Changes::Delta(d) => d.len(),
        }
    }
}

/// The lease table, in subnet order.
#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    leases: OrdMap<Ipv4Net, Lease>,
    version: u64,
}

impl LeaseTable {
    /// The leases, in subnet order.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The leases after `after` (or from the first), in subnet order: a page's start.
    pub fn leases_after(&self, after: Option<Ipv4Net>) -> impl Iterator<Item = &Lease> {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        self.leases.range((start, std::ops::Bound::Unbounded)).map(|(_, l)| l)
    }

    /// The lease on `subnet`, if known.
    pub fn get(&self, subnet: &Ipv4Net) -> Option<&Lease> {
        self.leases.get(subnet)
    }

    /// Number of leases known.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when no lease is known.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Bumps on every write to the table, renewals included: what a cache of it is keyed by.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Applies one watched event; returns the change if it is one a consumer cares about (a
    /// renewal that only moves the expiry or revision is stored, but is not news).
    pub fn apply(&mut self, ev: LeaseEvent) -> Option<Change> {
        match ev {
            LeaseEvent::Upserted(l) => {
                self.version += 1;
                match self.leases.insert(l.subnet, l.clone()) {
                    None => Some(Change::Added(l)),
                    Some(old) if old.attrs != l.attrs => Some(Change::Changed { old, new: l }),
                    Some(_) => None,
                }
            }
            LeaseEvent::Removed(net) => {
                let gone = self.leases.remove(&net)?;
                self.version += 1;
                Some(Change::Removed(gone))
            }
        }
    }

    /// Applies a batch of events and returns its net effect, one change per subnet in subnet
    /// order: a lease added and removed within the batch is no change at all.
    pub fn apply_all(&mut self, events: impl IntoIterator<Item = LeaseEvent>) -> Vec<Change> {
        let mut net: std::collections::BTreeMap<Ipv4Net, (Option<Lease>, Option<Lease>)> = Default::default();
        for ev in events {
            let subnet = match &ev {
                LeaseEvent::Upserted(l) => l.subnet,
                LeaseEvent::Removed(n) => *n,
            };
            let before = self.leases.get(&subnet).cloned();
            if self.apply(ev).is_none() {
                continue;
            }
            let after = self.leases.get(&subnet).cloned();
            net.entry(subnet).or_insert((before, None)).1 = after;
        }
        net.into_values()
            .filter_map(|(before, after)| match (before, after) {
                (None, Some(n)) => Some(Change::Added(n)),
                (Some(o), None) => Some(Change::Removed(o)),
                (Some(o), Some(n)) if o.attrs != n.attrs => Some(Change::Changed { old: o, new: n }),
                _ => None,
            })
            .collect()
    }

    /// Replaces the table with a fresh listing.
    pub fn replace(&mut self, snapshot: Vec<Lease>) {
        self.version += 1;
        self.leases = snapshot.into_iter().map(|l| (l.subnet, l)).collect();
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(net: &str, ip: &str, rev: i64) -> Lease {
        Lease {
            subnet: net.parse().unwrap(),
            attrs: LeaseAttrs::new(ip.parse().unwrap(), "udp", serde_json::Value::Null),
            expiration: SystemTime::now(),
            revision: rev,
            ttl_handle: 0,
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn renewals_are_stored_but_not_news() {
        let mut t = LeaseTable::default();
        assert!(matches!(
            t.apply(LeaseEvent::Upserted(lease("10.1.1.0/24", "1.1.1.1", 1))),
            Some(Change::Added(_))
        ));
        let v = t.version();
        assert!(t
            .apply(LeaseEvent::Upserted(lease("10.1.1.0/24", "1.1.1.1", 2)))
            .is_none());
        assert_eq!(t.get(&net("10.1.1.0/24")).unwrap().revision, 2, "the renewal is kept");
        assert!(t.version() > v, "a cache of the table must see the renewal");
        match t.apply(LeaseEvent::Upserted(lease("10.1.1.0/24", "1.1.1.9", 3))) {
            Some(Change::Changed { old, new }) => {
                assert_eq!(old.attrs.public_ip.to_string(), "1.1.1.1");
                assert_eq!(new.attrs.public_ip.to_string(), "1.1.1.9");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.apply(LeaseEvent::Removed(net("10.1.1.0/24"))),
            Some(Change::Removed(l)) if l.revision == 3
        ));
        assert!(t.apply(LeaseEvent::Removed(net("10.1.1.0/24"))).is_none());
    }

    #[test]
    fn a_batch_reports_its_net_effect_per_subnet() {
        let mut t = LeaseTable::default();
        t.replace(vec![
            lease("10.1.1.0/24", "1.1.1.1", 1),
            lease("10.1.2.0/24", "1.1.1.2", 1),
        ]);
        let changes = t.apply_all([
            LeaseEvent::Upserted(lease("10.1.9.0/24", "1.1.1.9", 2)),
            LeaseEvent::Removed(net("10.1.9.0/24")),
            LeaseEvent::Upserted(lease("10.1.3.0/24", "1.1.1.3", 3)),
            LeaseEvent::Upserted(lease("10.1.3.0/24", "1.1.1.4", 4)),
            LeaseEvent::Removed(net("10.1.1.0/24")),
            LeaseEvent::Upserted(lease("10.1.2.0/24", "1.1.1.2", 5)),
        ]);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(&changes[0], Change::Removed(l) if l.subnet == net("10.1.1.0/24")));
        assert!(matches!(&changes[1], Change::Added(l) if l.attrs.public_ip.to_string() == "1.1.1.4"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn pages_resume_after_the_last_subnet() {
        let mut t = LeaseTable::default();
        t.replace(
            (1..=5)
                .map(|i| lease(&format!("10.1.{i}.0/24"), "1.1.1.1", 1))
                .collect(),
        );
        let first: Vec<_> = t.leases_after(None).take(2).map(|l| l.subnet).collect();
        assert_eq!(first, vec![net("10.1.1.0/24"), net("10.1.2.0/24")]);
        let rest: Vec<_> = t.leases_after(Some(net("10.1.2.0/24"))).map(|l| l.subnet).collect();
        assert_eq!(rest, vec![net("10.1.3.0/24"), net("10.1.4.0/24"), net("10.1.5.0/24")]);
    }

    #[test]
    fn a_copy_is_a_snapshot() {
        let mut t = LeaseTable::default();
        t.replace(vec![lease("10.1.1.0/24", "1.1.1.1", 1)]);
        let before = t.clone();
        t.apply(LeaseEvent::Removed(net("10.1.1.0/24")));
        assert_eq!((before.len(), t.len()), (1, 0));
    }
}
