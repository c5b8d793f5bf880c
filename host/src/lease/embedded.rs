//! The embedded lease store: one SQLite database file (WAL mode) that every agent on a machine
//! may open at once. Writers serialise on SQLite's write lock; watchers poll a change log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ipnet::Ipv4Net;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    readable, Doc, DocKind, DocWatchStream, Lease, LeaseAttrs, LeaseEvent, LeaseSnapshot, LeaseStore, LeaseWatchStream,
    StoreError,
};
use crate::subnet::{parse_subnet_key, subnet_key};

/// How many change-log entries are kept for watchers; older ones are compacted away.
const EVENT_RETENTION: i64 = 10_000;
/// How often watchers look for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The embedded store: a SQLite file.
pub struct EmbeddedStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    retention: i64,
}

fn now_ms() -> i64 {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::Embedded {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        // Agents starting together race to create the file and its schema; SQLite answers some
        // of those races (journal-mode switch, lock upgrades) with an immediate "busy" that the
        // busy handler does not cover, so opening retries for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let conn = loop {
            match Connection::open(path).and_then(|c| init_schema(&c).map(|()| c)) {
                Ok(c) => break c,
                Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20 + u64::from(rand::random::<u8>() % 80)));
                }
                Err(e) => return Err(err(&e)),
            }
        };
        Ok(EmbeddedStore {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            retention: EVENT_RETENTION,
        })
    }

    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.display().to_string();
        let path2 = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Embedded {
                path: path.clone(),
                reason: "connection lock poisoned".into(),
            })?;
            f(&mut guard).map_err(|e| StoreError::Embedded {
                path,
                reason: e.to_string(),
            })
        })
        .await
        .map_err(|e| StoreError::Embedded {
            path: path2,
            reason: e.to_string(),
        })?
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    // Several agent processes share the file: wait for the write lock rather than fail.
    conn.busy_timeout(Duration::from_secs(30))?;
    // WAL is a property of the file: only the first opener switches it.
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS leases(
             subnet TEXT PRIMARY KEY, value TEXT NOT NULL,
             expires_ms INTEGER NOT NULL, revision INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS events(
             revision INTEGER PRIMARY KEY, subnet TEXT NOT NULL, value TEXT,
             expires_ms INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE IF NOT EXISTS docs(
             kind TEXT NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL,
             revision INTEGER NOT NULL, PRIMARY KEY(kind, name));
         COMMIT;",
    )
}

fn meta_i64(tx: &Connection, name: &str) -> rusqlite::Result<i64> {
    let v: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|s| s.parse().ok()).unwrap_or(0))
}

fn set_meta(tx: &Connection, name: &str, value: &str) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta(name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![name, value],
    )?;
    Ok(())
}

/// The meta key holding the revision of the last change to documents of `kind`.
fn docs_changed(kind: DocKind) -> String {
    format!("docs_changed_{}", kind.segment())
}

/// Takes the next revision number and records a change under it.
fn log_change(
    tx: &Connection,
    subnet: &str,
    value: Option<&str>,
    expires_ms: i64,
    retention: i64,
) -> rusqlite::Result<i64> {
    let rev = meta_i64(tx, "revision")? + 1;
    set_meta(tx, "revision", &rev.to_string())?;
    tx.execute(
        "INSERT INTO events(revision, subnet, value, expires_ms) VALUES (?1, ?2, ?3, ?4)",
        params![rev, subnet, value, expires_ms],
    )?;
    let floor = rev - retention;
    if floor > 0 && tx.execute("DELETE FROM events WHERE revision <= ?1", [floor])? > 0 {
        set_meta(tx, "compacted", &floor.to_string())?;
    }
    Ok(rev)
}

/// Deletes expired leases, logging each removal, so watchers see expiry like a delete.
fn sweep_expired(tx: &Connection, retention: i64) -> rusqlite::Result<()> {
    let now = now_ms();
    let expired: Vec<String> = tx
        .prepare("SELECT subnet FROM leases WHERE expires_ms <= ?1")?
        .query_map([now], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for subnet in expired {
        tx.execute("DELETE FROM leases WHERE subnet = ?1", [&subnet])?;
        log_change(tx, &subnet, None, 0, retention)?;
    }
    Ok(())
}

fn row_to_lease(key: &str, value: &str, expires_ms: i64, revision: i64) -> Result<Lease, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_string(),
        reason,
    };
    let subnet = parse_subnet_key(key).ok_or_else(|| corrupt("not a subnet key".into()))?;
    let attrs: LeaseAttrs = serde_json::from_str(value).map_err(|e| corrupt(e.to_string()))?;
    Ok(Lease {
        subnet,
        attrs,
        expiration: SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(expires_ms).unwrap_or(0)),
        revision,
        ttl_handle: 0,
    })
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4)
}

impl EmbeddedStore {
    /// Writes a lease only if the row's revision is still `expect` (`None`: no row at all), in
    /// one write transaction, so racing agents in other processes cannot both win.
    async fn write_if(
        &self,
        subnet: Ipv4Net,
        expect: Option<i64>,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let retention = self.retention;
        let key = subnet_key(&subnet);
        let value = serde_json::to_string(attrs).map_err(|e| StoreError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let written = self
            .with_conn(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                sweep_expired(&tx, retention)?;
                let current: Option<i64> = tx
                    .query_row("SELECT revision FROM leases WHERE subnet = ?1", [&key], |r| r.get(0))
                    .optional()?;
                if current != expect {
                    return Ok(None);
                }
                let expires = now_ms().saturating_add(ttl_ms(ttl));
                let rev = log_change(&tx, &key, Some(&value), expires, retention)?;
                tx.execute(
                    "INSERT INTO leases(subnet, value, expires_ms, revision) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(subnet) DO UPDATE SET value = excluded.value,
                         expires_ms = excluded.expires_ms, revision = excluded.revision",
                    params![key, value, expires, rev],
                )?;
                tx.commit()?;
                Ok(Some((expires, rev)))
            })
            .await?;
        Ok(written.map(|(expires, revision)| Lease {
            subnet,
            attrs: attrs.clone(),
            expiration: SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(expires).unwrap_or(0)),
            revision,
            ttl_handle: 0,
        }))
    }
}

#[async_trait]
impl LeaseStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn network_config(&self) -> Result<Option<String>, StoreError> {
        self.with_conn(|c| {
            c.query_row("SELECT value FROM meta WHERE name = 'config'", [], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn init_network_config(&self, json: &str) -> Result<bool, StoreError> {
        let json = json.to_string();
        self.with_conn(move |c| {
            let n = c.execute(
                "INSERT INTO meta(name, value) VALUES ('config', ?1) ON CONFLICT(name) DO NOTHING",
                [json],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn list_leases(&self) -> Result<LeaseSnapshot, StoreError> {
        let (rows, revision) = self
            .with_conn(|c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Deferred)?;
                let rows: Vec<(String, String, i64, i64)> = tx
                    .prepare(
                        "SELECT subnet, value, expires_ms, revision FROM leases WHERE expires_ms > ?1 ORDER BY subnet",
                    )?
                    .query_map([now_ms()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                let rev = meta_i64(&tx, "revision")?;
                tx.commit()?;
                Ok((rows, rev))
            })
            .await?;
        let leases = readable(rows.iter().map(|(k, v, e, r)| row_to_lease(k, v, *e, *r)));
        Ok(LeaseSnapshot { leases, revision })
    }

    async fn create_lease(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.write_if(subnet, None, attrs, ttl).await
    }

    async fn update_lease(&self, prev: &Lease, attrs: &LeaseAttrs, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        self.write_if(prev.subnet, Some(prev.revision), attrs, ttl).await
    }

    async fn delete_lease(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        let retention = self.retention;
        let key = subnet_key(&subnet);
        self.with_conn(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute("DELETE FROM leases WHERE subnet = ?1", [&key])?;
            if n > 0 {
                log_change(&tx, &key, None, 0, retention)?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_docs(&self, kind: DocKind, values: bool) -> Result<Vec<Doc>, StoreError> {
        self.with_conn(move |c| {
            let sql = if values {
                "SELECT name, value, revision FROM docs WHERE kind = ?1 ORDER BY name"
            } else {
                "SELECT name, x'', revision FROM docs WHERE kind = ?1 ORDER BY name"
            };
            let mut st = c.prepare(sql)?;
            let rows = st.query_map([kind.segment()], |r| {
                Ok(Doc {
                    name: r.get(0)?,
                    value: r.get(1)?,
                    revision: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn put_doc(&self, kind: DocKind, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let (name, value) = (name.to_string(), value.to_vec());
        self.with_conn(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rev = meta_i64(&tx, "doc_revision")? + 1;
            set_meta(&tx, "doc_revision", &rev.to_string())?;
            tx.execute(
                "INSERT INTO docs(kind, name, value, revision) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(kind, name) DO UPDATE SET value = excluded.value, revision = excluded.revision",
                params![kind.segment(), name, value, rev],
            )?;
            set_meta(&tx, &docs_changed(kind), &rev.to_string())?;
            tx.commit()
        })
        .await
    }

    async fn delete_doc(&self, kind: DocKind, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with_conn(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "DELETE FROM docs WHERE kind = ?1 AND name = ?2",
                params![kind.segment(), name],
            )?;
            if n > 0 {
                let rev = meta_i64(&tx, "doc_revision")? + 1;
                set_meta(&tx, "doc_revision", &rev.to_string())?;
                set_meta(&tx, &docs_changed(kind), &rev.to_string())?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    async fn watch_docs(&self, kind: DocKind) -> Result<DocWatchStream, StoreError> {
        let key = docs_changed(kind);
        let read = {
            let key = key.clone();
            move |c: &mut Connection| meta_i64(c, &key)
        };
        let mut last = self.with_conn(read.clone()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let conn = self.conn.clone();
        let path = self.path.display().to_string();
        tokio::spawn(async move {
            // A meta row read every poll: one indexed lookup on a local file.
            while !tx.is_closed() {
                tokio::time::sleep(POLL_INTERVAL).await;
                let c = conn.clone();
                let read = read.clone();
                let now = tokio::task::spawn_blocking(move || {
                    c.lock()
                        .map_err(|_| rusqlite::Error::InvalidQuery)
                        .and_then(|mut g| read(&mut g))
                })
                .await;
                let msg = match now {
                    Ok(Ok(r)) if r == last => continue,
                    Ok(Ok(r)) => {
                        last = r;
                        Ok(r)
                    }
                    Ok(Err(e)) => Err(StoreError::Embedded {
                        path: path.clone(),
                        reason: e.to_string(),
                    }),
                    Err(e) => Err(StoreError::Embedded {
                        path: path.clone(),
                        reason: e.to_string(),
                    }),
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn watch_leases(&self, revision: i64) -> Result<LeaseWatchStream, StoreError> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let conn = self.conn.clone();
        let path = self.path.display().to_string();
        let retention = self.retention;
        tokio::spawn(async move {
            let mut since = revision;
            let mut ticks: u32 = 0;
            loop {
                ticks = ticks.wrapping_add(1);
                // Someone must turn expiry into delete events; every watcher sweeps now and then.
                let sweep = ticks.is_multiple_of(5);
                let conn2 = conn.clone();
                let polled = tokio::task::spawn_blocking(move || poll_events(&conn2, since, sweep, retention)).await;
                let msg = match polled {
                    Ok(Ok(None)) => None,
                    Ok(Ok(Some((events, rev)))) => {
                        since = rev;
                        Some(Ok((events, rev)))
                    }
                    Ok(Err(PollError::Compacted(r))) => Some(Err(StoreError::Compacted(r))),
                    Ok(Err(PollError::Db(e))) => Some(Err(StoreError::Embedded {
                        path: path.clone(),
                        reason: e.to_string(),
                    })),
                    Err(e) => Some(Err(StoreError::Embedded {
                        path: path.clone(),
                        reason: e.to_string(),
                    })),
                };
                if let Some(m) = msg {
                    let is_err = m.is_err();
                    if tx.send(m).await.is_err() || is_err {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        });
        Ok(rx)
    }
}

enum PollError {
    Compacted(i64),
    Db(rusqlite::Error),
}

impl From<rusqlite::Error> for PollError {
    fn from(e: rusqlite::Error) -> Self {
        PollError::Db(e)
    }
}

type Polled = Option<(Vec<LeaseEvent>, i64)>;

fn poll_events(conn: &Mutex<Connection>, since: i64, sweep: bool, retention: i64) -> Result<Polled, PollError> {
    let mut c = conn.lock().map_err(|_| PollError::Db(rusqlite::Error::InvalidQuery))?;
    if sweep {
        let due: i64 = c.query_row("SELECT COUNT(*) FROM leases WHERE expires_ms <= ?1", [now_ms()], |r| {
            r.get(0)
        })?;
        if due > 0 {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            sweep_expired(&tx, retention)?;
            tx.commit()?;
        }
    }
    let tx = c.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let compacted = meta_i64(&tx, "compacted")?;
    if since < compacted {
        return Err(PollError::Compacted(since));
    }
    let rows: Vec<(i64, String, Option<String>, i64)> = tx
        .prepare("SELECT revision, subnet, value, expires_ms FROM events WHERE revision > ?1 ORDER BY revision")?
        .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    tx.commit()?;
    let Some(last) = rows.last().map(|r| r.0) else {
        return Ok(None);
    };
    let mut events = Vec::with_capacity(rows.len());
    for (rev, key, value, expires) in rows {
        match value {
            None => {
                if let Some(net) = parse_subnet_key(&key) {
                    events.push(LeaseEvent::Removed(net));
                }
            }
            Some(v) => match row_to_lease(&key, &v, expires, rev) {
                Ok(l) => events.push(LeaseEvent::Upserted(l)),
                Err(err) => tracing::warn!(%err, "skipping unreadable lease event"),
            },
        }
    }
    Ok(Some((events, last)))
}

/// Seconds until a lease expires, for tests.
#[cfg(test)]
fn expires_in(l: &Lease) -> i64 {
    l.expiration
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs::new(ip.parse().unwrap(), "udp", serde_json::Value::Null)
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn create_is_exclusive_and_update_is_conditional() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("s.db")).unwrap();
        let ttl = Duration::from_secs(3600);
        let a = s
            .create_lease(net("10.244.1.0/24"), &attrs("1.1.1.1"), ttl)
            .await
            .unwrap()
            .unwrap();
        assert!(expires_in(&a) > 3500);
        assert!(s
            .create_lease(net("10.244.1.0/24"), &attrs("2.2.2.2"), ttl)
            .await
            .unwrap()
            .is_none());
        let b = s.update_lease(&a, &attrs("1.1.1.1"), ttl).await.unwrap().unwrap();
        assert!(b.revision > a.revision);
        // The stale copy loses: somebody (we) rewrote it since.
        assert!(s.update_lease(&a, &attrs("3.3.3.3"), ttl).await.unwrap().is_none());
        let snap = s.list_leases().await.unwrap();
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(snap.leases[0].attrs.public_ip.to_string(), "1.1.1.1");
        assert!(s.delete_lease(net("10.244.1.0/24")).await.unwrap());
        assert!(!s.delete_lease(net("10.244.1.0/24")).await.unwrap());
        assert!(s.list_leases().await.unwrap().leases.is_empty());
    }

    #[tokio::test]
    async fn config_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(s.network_config().await.unwrap(), None);
        assert!(s.init_network_config("{\"Network\":\"10.1.0.0/16\"}").await.unwrap());
        assert!(!s.init_network_config("{\"Network\":\"10.2.0.0/16\"}").await.unwrap());
        assert_eq!(
            s.network_config().await.unwrap().unwrap(),
            "{\"Network\":\"10.1.0.0/16\"}"
        );
    }

    #[tokio::test]
    async fn expired_leases_vanish_and_are_watched_as_removals() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("s.db")).unwrap();
        let snap = s.list_leases().await.unwrap();
        let mut w = s.watch_leases(snap.revision).await.unwrap();
        s.create_lease(net("10.244.2.0/24"), &attrs("1.1.1.1"), Duration::from_millis(300))
            .await
            .unwrap()
            .unwrap();
        let (ev, _) = w.recv().await.unwrap().unwrap();
        assert!(matches!(&ev[0], LeaseEvent::Upserted(l) if l.subnet == net("10.244.2.0/24")));
        let removed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let (ev, _) = w.recv().await.unwrap().unwrap();
                if ev.contains(&LeaseEvent::Removed(net("10.244.2.0/24"))) {
                    return;
                }
            }
        })
        .await;
        assert!(removed.is_ok(), "expiry was never reported");
        assert!(s.list_leases().await.unwrap().leases.is_empty());
    }

    #[tokio::test]
    async fn two_handles_on_one_file_never_share_a_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let p = path.clone();
            tasks.push(tokio::spawn(async move {
                let s = EmbeddedStore::open(&p).unwrap();
                s.create_lease(
                    net("10.244.9.0/24"),
                    &attrs(&format!("1.1.1.{i}")),
                    Duration::from_secs(60),
                )
                .await
                .unwrap()
            }));
        }
        let mut won = 0;
        for t in tasks {
            if t.await.unwrap().is_some() {
                won += 1;
            }
        }
        assert_eq!(won, 1);
    }

    #[test]
    fn many_processes_opening_a_new_file_at_once_all_succeed() {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("s{round}.db"));
            let barrier = Arc::new(std::sync::Barrier::new(12));
            let handles: Vec<_> = (0..12)
                .map(|_| {
                    let (p, b) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        EmbeddedStore::open(&p).map(|_| ()).map_err(|e| e.to_string())
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap().unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_watcher_left_behind_compaction_is_told_to_relist() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EmbeddedStore::open(&dir.path().join("s.db")).unwrap();
        s.retention = 5;
        let start = s.list_leases().await.unwrap().revision;
        for i in 1..=8 {
            s.create_lease(
                net(&format!("10.244.{i}.0/24")),
                &attrs("1.1.1.1"),
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .unwrap();
        }
        let mut behind = s.watch_leases(start).await.unwrap();
        assert!(matches!(behind.recv().await, Some(Err(StoreError::Compacted(_)))));
        // A watcher that is not behind still gets every change.
        let now = s.list_leases().await.unwrap().revision;
        let mut current = s.watch_leases(now - 2).await.unwrap();
        let (events, rev) = current.recv().await.unwrap().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(rev, now);
    }

    #[tokio::test]
    async fn unreadable_rows_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("s.db")).unwrap();
        s.create_lease(net("10.244.1.0/24"), &attrs("1.1.1.1"), Duration::from_secs(60))
            .await
            .unwrap();
        s.with_conn(|c| {
            c.execute(
                "INSERT INTO leases VALUES ('10.244.7.0-24', 'not json', 9999999999999, 99)",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(s.list_leases().await.unwrap().leases.len(), 1);
    }
}
