//! Following the lease table: a snapshot, then a watch from its revision, re-listing and
//! diffing whenever the watch breaks (store outage, compaction), so the consumer only ever
//! sees a consistent sequence of upserts and removals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;

use super::{Lease, LeaseEvent, LeaseStore};

/// The lease table as last seen, and the pure logic that keeps it current.
#[derive(Debug, Default, Clone)]
pub struct LeaseTable {
    leases: HashMap<Ipv4Net, Lease>,
}

impl LeaseTable {
    /// The leases currently known.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
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

    /// Applies one watched event; returns it if it changed anything a consumer cares about
    /// (a renewal that only moves the expiry or revision is not news to the data path).
    pub fn apply(&mut self, ev: LeaseEvent) -> Option<LeaseEvent> {
        match ev {
            LeaseEvent::Upserted(l) => {
                let news = self.leases.get(&l.subnet).is_none_or(|old| old.attrs != l.attrs);
                self.leases.insert(l.subnet, l.clone());
                news.then_some(LeaseEvent::Upserted(l))
            }
            LeaseEvent::Removed(net) => self.leases.remove(&net).map(|_| LeaseEvent::Removed(net)),
        }
    }

    /// Replaces the table with a fresh listing and returns the events that turn the old view
    /// into the new one: what a watch would have said had it not broken.
    pub fn resync(&mut self, snapshot: Vec<Lease>) -> Vec<LeaseEvent> {
        let fresh: HashMap<Ipv4Net, Lease> = snapshot.into_iter().map(|l| (l.subnet, l)).collect();
        let mut events: Vec<LeaseEvent> = self
            .leases
            .keys()
            .filter(|k| !fresh.contains_key(k))
            .map(|k| LeaseEvent::Removed(*k))
            .collect();
        for (k, l) in &fresh {
            if self.leases.get(k).is_none_or(|old| old.attrs != l.attrs) {
                events.push(LeaseEvent::Upserted(l.clone()));
            }
        }
        self.leases = fresh;
        events
    }
}

/// Health of the connection to the store, shared with metrics.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// Whether the last store operation succeeded.
    pub connected: AtomicBool,
    /// How many times the watch was re-established after breaking.
    pub watch_restarts: AtomicU64,
}

/// Follows the store's leases forever, calling `on_event` for each change, in order.
/// Never returns; store errors are retried with backoff.
pub async fn follow<F>(store: Arc<dyn LeaseStore>, health: Arc<StoreHealth>, mut on_event: F)
where
    F: FnMut(&LeaseTable, LeaseEvent) + Send,
{
    let mut table = LeaseTable::default();
    let mut backoff = Duration::from_millis(250);
    let mut first = true;
    loop {
        let snap = match store.list_leases().await {
            Ok(s) => s,
            Err(e) => {
                if health.connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "lease store unreachable; keeping the last known routes");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if !health.connected.swap(true, Ordering::Relaxed) && !first {
            tracing::info!(store = %store.describe(), "lease store reachable again");
        }
        if !first {
            health.watch_restarts.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        backoff = Duration::from_millis(250);
        for ev in table.resync(snap.leases) {
            on_event(&table, ev);
        }
        let mut stream = match store.watch_leases(snap.revision).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch leases; will re-list");
                health.connected.store(false, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        while let Some(item) = stream.recv().await {
            match item {
                Ok((events, _rev)) => {
                    for ev in events {
                        if let Some(ev) = table.apply(ev) {
                            on_event(&table, ev);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease watch broke; re-listing");
                    if !matches!(e, super::StoreError::Compacted(_)) {
                        health.connected.store(false, Ordering::Relaxed);
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
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

    #[test]
    fn renewals_are_not_news_but_changes_are() {
        let mut t = LeaseTable::default();
        assert!(t
            .apply(LeaseEvent::Upserted(lease("10.1.1.0/24", "1.1.1.1", 1)))
            .is_some());
        assert!(t
            .apply(LeaseEvent::Upserted(lease("10.1.1.0/24", "1.1.1.1", 2)))
            .is_none());
        assert!(t
            .apply(LeaseEvent::Upserted(lease("10.1.1.0/24", "1.1.1.9", 3)))
            .is_some());
        assert!(t.apply(LeaseEvent::Removed("10.1.1.0/24".parse().unwrap())).is_some());
        assert!(t.apply(LeaseEvent::Removed("10.1.1.0/24".parse().unwrap())).is_none());
    }

    #[test]
    fn resync_synthesises_the_missed_events() {
        let mut t = LeaseTable::default();
        t.resync(vec![
            lease("10.1.1.0/24", "1.1.1.1", 1),
            lease("10.1.2.0/24", "1.1.1.2", 1),
        ]);
        let mut ev = t.resync(vec![
            lease("10.1.2.0/24", "1.1.1.2", 5),
            lease("10.1.3.0/24", "1.1.1.3", 6),
        ]);
        ev.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev.contains(&LeaseEvent::Removed("10.1.1.0/24".parse().unwrap())));
        assert!(ev
            .iter()
            .any(|e| matches!(e, LeaseEvent::Upserted(l) if l.subnet.to_string() == "10.1.3.0/24")));
        assert_eq!(t.len(), 2);
    }
}
