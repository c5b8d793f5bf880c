//! The lease table the node informer keeps, and the numbered change log a watch replays from.
//! The API server's resourceVersions are per object and opaque; the lease store trait wants
//! one revision a watch resumes after, so the feed numbers its own changes. Node updates
//! that do not change a lease (kubelet's status heartbeats, every node every few seconds) are
//! absorbed here and never reach the data path.

use std::collections::{HashMap, VecDeque};

use k8s_openapi::api::core::v1::Node;
use tokio::sync::mpsc;

use super::super::{Lease, LeaseEvent, LeaseSnapshot, LeaseWatchStream, StoreError};
use super::annotations::{self, Keys};
use super::informer::Change;

/// Most change batches kept for watches to resume from.
const LOG_LEN: usize = 1024;
/// Room in a watcher's channel beyond what is replayed; a watcher that falls this far behind
/// is dropped and resumes from the log.
const CHANNEL_SLACK: usize = 256;

type Sub = mpsc::Sender<Result<(Vec<LeaseEvent>, i64), StoreError>>;

/// The leases of every node, as last seen.
pub struct LeaseFeed {
    keys: Keys,
    by_node: HashMap<String, Lease>,
    seq: i64,
    log: VecDeque<(i64, Vec<LeaseEvent>)>,
    subs: Vec<Sub>,
    listed: bool,
    up: bool,
    last_error: Option<String>,
}

impl LeaseFeed {
    /// An empty feed reading annotations under `keys`.
    pub fn new(keys: Keys) -> LeaseFeed {
        LeaseFeed {
            keys,
            by_node: HashMap::new(),
            seq: 0,
            log: VecDeque::new(),
            subs: Vec::new(),
            listed: false,
            up: false,
            last_error: None,
        }
    }

    /// Whether the first listing has arrived, or an attempt at it failed.
    pub fn tried(&self) -> bool {
        self.listed || self.last_error.is_some()
    }

    /// Takes in what the informer saw.
    pub fn on_change(&mut self, change: Change<Node>) {
        let events = match change {
            Change::Listed(nodes) => self.relist(&nodes),
            Change::Applied(n) => {
                let lease = annotations::lease_of(&n, &self.keys);
                self.apply(annotations::name(&n), lease)
            }
            Change::Deleted(n) => self.apply(annotations::name(&n), None),
            Change::Connected => {
                self.mark_up();
                Vec::new()
            }
            Change::Disconnected(why) => {
                self.down(why);
                Vec::new()
            }
        };
        self.emit(events);
    }

    fn down(&mut self, why: String) {
        if self.up || self.last_error.is_none() {
            tracing::warn!(error = %why, "Kubernetes API unreachable; keeping the last known routes");
        }
        self.up = false;
        for s in self.subs.drain(..) {
            let _ = s.try_send(Err(StoreError::Unavailable(why.clone())));
        }
        self.last_error = Some(why);
    }

    /// The changes that take node `name` from its last lease to `lease`.
    fn apply(&mut self, name: &str, lease: Option<Lease>) -> Vec<LeaseEvent> {
        let old = match &lease {
            Some(l) => self.by_node.insert(name.to_string(), l.clone()),
            None => self.by_node.remove(name),
        };
        match (old, lease) {
            (None, None) => Vec::new(),
            (None, Some(new)) => vec![LeaseEvent::Upserted(new)],
            (Some(old), None) => vec![LeaseEvent::Removed(old.subnet)],
            (Some(old), Some(new)) if old.subnet != new.subnet => {
                vec![LeaseEvent::Removed(old.subnet), LeaseEvent::Upserted(new)]
            }
            (Some(old), Some(new)) if old.attrs == new.attrs => Vec::new(),
            (Some(_), Some(new)) => vec![LeaseEvent::Upserted(new)],
        }
    }

    fn relist(&mut self, nodes: &[Node]) -> Vec<LeaseEvent> {
        let fresh: HashMap<&str, &Node> = nodes.iter().map(|n| (annotations::name(n), n)).collect();
        let gone: Vec<String> = self
            .by_node
            .keys()
            .filter(|k| !fresh.contains_key(k.as_str()))
            .cloned()
            .collect();
        let mut events = Vec::new();
        for name in gone {
            events.extend(self.apply(&name, None));
        }
        for (name, n) in fresh {
            let lease = annotations::lease_of(n, &self.keys);
            events.extend(self.apply(name, lease));
        }
        // A listing that arrived proves the server answers: a watch may start at once, without
        // waiting for the informer's own watch request to be accepted.
        self.listed = true;
        self.mark_up();
        events
    }

    fn mark_up(&mut self) {
        if !self.up && self.last_error.is_some() {
            tracing::info!("Kubernetes API reachable again; following nodes");
        }
        self.up = true;
    }

    fn emit(&mut self, events: Vec<LeaseEvent>) {
        if events.is_empty() {
            return;
        }
        self.seq += 1;
        let seq = self.seq;
        self.subs.retain(|s| s.try_send(Ok((events.clone(), seq))).is_ok());
        self.log.push_back((seq, events));
        while self.log.len() > LOG_LEN {
            self.log.pop_front();
        }
    }

    fn unavailable(&self, what: &str) -> StoreError {
        let why = self.last_error.as_deref().unwrap_or("no answer yet");
        StoreError::Unavailable(format!("{what}: {why}"))
    }

    /// Every lease, and the revision a watch continues after.
    pub fn snapshot(&self) -> Result<LeaseSnapshot, StoreError> {
        if !self.listed {
            return Err(self.unavailable("the nodes have not been listed yet"));
        }
        Ok(LeaseSnapshot {
            leases: self.by_node.values().cloned().collect(),
            revision: self.seq,
        })
    }

    /// A stream of the changes after `after`, replayed from the log, then live.
    pub fn subscribe(&mut self, after: i64) -> Result<LeaseWatchStream, StoreError> {
        if !self.up {
            return Err(self.unavailable("nodes cannot be watched"));
        }
        let oldest = self.log.front().map_or(self.seq + 1, |(s, _)| *s);
        if after < self.seq && after + 1 < oldest {
            return Err(StoreError::Compacted(after));
        }
        let (tx, rx) = mpsc::channel(self.log.len() + CHANNEL_SLACK);
        for (seq, events) in self.log.iter().filter(|(s, _)| *s > after) {
            let _ = tx.try_send(Ok((events.clone(), *seq)));
        }
        self.subs.push(tx);
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, cidr: &str, ip: &str, rv: u32) -> Node {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "resourceVersion": rv.to_string(),
                "annotations": {
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                    "flannel.alpha.coreos.com/backend-type": "host-gw",
                    "flannel.alpha.coreos.com/backend-data": "null",
                    "flannel.alpha.coreos.com/public-ip": ip,
                }
            },
            "spec": { "podCIDR": cidr }
        }))
        .unwrap()
    }

    fn feed() -> LeaseFeed {
        let mut f = LeaseFeed::new(Keys::new("flannel.alpha.coreos.com"));
        f.on_change(Change::Listed(vec![
            node("a", "10.244.1.0/24", "198.18.0.2", 1),
            node("b", "10.244.2.0/24", "198.18.0.3", 2),
        ]));
        f.on_change(Change::Connected);
        f
    }

    #[tokio::test]
    async fn heartbeats_are_absorbed_and_real_changes_numbered() {
        let mut f = feed();
        assert_eq!(f.snapshot().unwrap().leases.len(), 2);
        let mut rx = f.subscribe(f.seq).unwrap();
        f.on_change(Change::Applied(node("a", "10.244.1.0/24", "198.18.0.2", 9)));
        assert!(rx.try_recv().is_err(), "a new resourceVersion alone is no news");
        f.on_change(Change::Applied(node("a", "10.244.1.0/24", "198.18.0.9", 10)));
        let (ev, seq) = rx.try_recv().unwrap().unwrap();
        assert!(matches!(&ev[..], [LeaseEvent::Upserted(l)] if l.attrs.public_ip.octets()[3] == 9));
        f.on_change(Change::Deleted(node("b", "10.244.2.0/24", "198.18.0.3", 11)));
        let (ev, seq2) = rx.try_recv().unwrap().unwrap();
        assert_eq!(ev, vec![LeaseEvent::Removed("10.244.2.0/24".parse().unwrap())]);
        assert_eq!(seq2, seq + 1);
    }

    #[tokio::test]
    async fn a_relist_reports_what_vanished_and_a_watch_replays_the_log() {
        let mut f = feed();
        let before = f.seq;
        f.on_change(Change::Listed(vec![node("a", "10.244.5.0/24", "198.18.0.2", 20)]));
        let mut rx = f.subscribe(before).unwrap();
        let (ev, _) = rx.try_recv().unwrap().unwrap();
        assert_eq!(ev.len(), 3, "b removed, a moved (removed + upserted): {ev:?}");
    }

    #[tokio::test]
    async fn an_outage_ends_every_watch_and_refuses_new_ones_until_reconnected() {
        let mut f = feed();
        let mut rx = f.subscribe(f.seq).unwrap();
        f.on_change(Change::Disconnected("connection refused".into()));
        assert!(matches!(rx.try_recv(), Ok(Err(StoreError::Unavailable(_)))));
        assert!(matches!(f.subscribe(f.seq), Err(StoreError::Unavailable(m)) if m.contains("connection refused")));
        assert_eq!(f.snapshot().unwrap().leases.len(), 2, "the last known leases stand");
        f.on_change(Change::Connected);
        assert!(f.subscribe(f.seq).is_ok());
    }

    #[test]
    fn a_watch_may_start_right_after_the_listing() {
        let mut f = LeaseFeed::new(Keys::new("flannel.alpha.coreos.com"));
        assert!(f.subscribe(0).is_err(), "nothing listed, nothing to watch");
        f.on_change(Change::Listed(vec![node("a", "10.244.1.0/24", "198.18.0.2", 1)]));
        assert!(
            f.subscribe(f.seq).is_ok(),
            "no spurious outage before the informer's watch is accepted"
        );
    }

    #[test]
    fn a_watch_from_before_the_log_must_list_again() {
        let mut f = feed();
        for i in 0..(LOG_LEN as u32 + 10) {
            f.on_change(Change::Applied(node(
                "a",
                "10.244.1.0/24",
                &format!("198.18.{}.{}", i / 200, i % 200 + 1),
                100 + i,
            )));
        }
        assert!(matches!(f.subscribe(0), Err(StoreError::Compacted(0))));
        assert!(f.subscribe(f.seq - 5).is_ok());
    }
}
