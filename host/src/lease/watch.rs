//! Following the store's leases: a listing, then a watch from its revision. A watch that
//! breaks (a member died, a store outage) is resumed from the last revision seen, on whichever
//! member answers; only a compaction past that revision costs a new listing. What arrives
//! together is handed on together, so a burst of changes is one batch for the consumer while a
//! lone change is never held back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Lease, LeaseEvent, LeaseStore, LeaseWatchStream, StoreError};

/// What the store said.
#[derive(Debug, Clone, PartialEq)]
pub enum Feed {
    /// A full listing: the table is exactly these leases.
    Listing(Vec<Lease>),
    /// Changes after the previous feed, in revision order.
    Events(Vec<LeaseEvent>),
}

/// Health of the connection to the store, shared with metrics.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// Whether the lease watch is established and the store answered last.
    pub connected: AtomicBool,
    /// How many times the watch was re-established after breaking.
    pub watch_restarts: AtomicU64,
    /// How many full listings were read.
    pub listings: AtomicU64,
}

impl StoreHealth {
    fn down(&self, what: &str, e: &StoreError) {
        if self.connected.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "{what}; keeping the last known routes");
        }
    }

    fn up(&self, store: &dyn LeaseStore) {
        if !self.connected.swap(true, Ordering::Relaxed) && self.listings.load(Ordering::Relaxed) > 0 {
            tracing::info!(store = %store.describe(), "lease store reachable again");
        }
    }
}

/// Most queued watch messages folded into one feed.
const MAX_FOLD: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows the store's leases forever, calling `on_feed` in order. Never returns; store errors
/// are retried with backoff.
pub async fn follow<F>(store: Arc<dyn LeaseStore>, health: Arc<StoreHealth>, mut on_feed: F)
where
    F: FnMut(Feed) + Send,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let snap = match store.list_leases().await {
            Ok(s) => s,
            Err(e) => {
                health.down("lease store unreachable", &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        health.listings.fetch_add(1, Ordering::Relaxed);
        on_feed(Feed::Listing(snap.leases));
        watch_from(&*store, &health, snap.revision, &mut on_feed).await;
    }
}

/// Watches from `revision` on, resuming after each break, until the store compacted past the
/// last revision seen (the caller then lists again).
async fn watch_from<F: FnMut(Feed)>(store: &dyn LeaseStore, health: &StoreHealth, mut revision: i64, on_feed: &mut F) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        let mut stream = match store.watch_leases(revision).await {
            Ok(s) => s,
            Err(StoreError::Compacted(_)) => return,
            Err(e) => {
                health.down("cannot watch leases", &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if !first {
            health.watch_restarts.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        // A member that lost its leader a moment ago still accepts a watch; only a
        // linearizable read proves the cluster behind it has a quorum.
        if let Err(e) = store.network_config().await {
            health.down("the store answers no quorum read", &e);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        health.up(store);
        backoff = BACKOFF_MIN;
        match drain(&mut stream, &mut revision, on_feed).await {
            Err(StoreError::Compacted(_)) => return,
            Err(e) => health.down("lease watch broke", &e),
            Ok(()) => health.down("lease watch ended", &StoreError::Unavailable("stream closed".into())),
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Hands on every message of `stream`, folding what is already queued behind one message into
/// the same feed; returns how the stream ended.
async fn drain<F: FnMut(Feed)>(
    stream: &mut LeaseWatchStream,
    revision: &mut i64,
    on_feed: &mut F,
) -> Result<(), StoreError> {
    while let Some(first) = stream.recv().await {
        let (mut events, rev) = first?;
        *revision = (*revision).max(rev);
        let mut ended = None;
        for _ in 0..MAX_FOLD {
            match stream.try_recv() {
                Ok(Ok((more, rev))) => {
                    events.extend(more);
                    *revision = (*revision).max(rev);
                }
                Ok(Err(e)) => {
                    ended = Some(e);
                    break;
                }
                Err(_) => break,
            }
        }
        if !events.is_empty() {
            on_feed(Feed::Events(events));
        }
        if let Some(e) = ended {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::lease::LeaseAttrs;

    fn lease(i: u8) -> Lease {
        Lease {
            subnet: format!("10.1.{i}.0/24").parse().unwrap(),
            attrs: LeaseAttrs::new([1, 1, 1, i].into(), "udp", serde_json::Value::Null),
            expiration: SystemTime::now(),
            revision: i64::from(i),
            ttl_handle: 0,
        }
    }

    #[tokio::test]
    async fn queued_messages_are_one_feed_and_a_lone_one_is_not_held() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        for i in 1..=3 {
            tx.send(Ok((vec![LeaseEvent::Upserted(lease(i))], i64::from(i))))
                .await
                .unwrap();
        }
        let mut feeds = Vec::new();
        let mut rev = 0;
        let task = tokio::spawn(async move {
            drain(&mut rx, &mut rev, &mut |f| feeds.push(f)).await.unwrap();
            (feeds, rev)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(Ok((vec![LeaseEvent::Removed(lease(1).subnet)], 9)))
            .await
            .unwrap();
        drop(tx);
        let (feeds, rev) = task.await.unwrap();
        assert_eq!(feeds.len(), 2, "{feeds:?}");
        assert!(matches!(&feeds[0], Feed::Events(e) if e.len() == 3));
        assert!(matches!(&feeds[1], Feed::Events(e) if e.len() == 1));
        assert_eq!(rev, 9);
    }

    #[tokio::test]
    async fn an_error_behind_events_still_delivers_them() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        tx.send(Ok((vec![LeaseEvent::Upserted(lease(1))], 1))).await.unwrap();
        tx.send(Err(StoreError::Compacted(1))).await.unwrap();
        let mut feeds = Vec::new();
        let mut rev = 0;
        let end = drain(&mut rx, &mut rev, &mut |f| feeds.push(f)).await;
        assert!(matches!(end, Err(StoreError::Compacted(1))));
        assert_eq!(feeds.len(), 1);
    }
}
