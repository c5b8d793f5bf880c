//! The etcd v3 lease store, in flannel's key layout: `<prefix>/config` and
//! `<prefix>/subnets/<a.b.c.d-len>`, each lease key attached to an etcd lease carrying its TTL.

pub mod client;
pub mod proto;
pub mod unsettled;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ipnet::Ipv4Net;

use self::client::{Cluster, ClusterOptions, EtcdError};
use self::proto::{
    path, prefix_end, Compare, DeleteRangeRequest, DeleteRangeResponse, EventType, KeyValue, LeaseGrantRequest,
    LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    Request, RequestOp, Response, TxnRequest, TxnResponse, WatchCreateRequest,
};
use self::unsettled::Unsettled;
use super::{
    readable, Doc, DocKind, DocWatchStream, Lease, LeaseAttrs, LeaseEvent, LeaseSnapshot, LeaseStore, LeaseWatchStream,
    StoreError,
};
use crate::subnet::{parse_subnet_key, subnet_key};

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix, flannel's `/coreos.com/network` by default.
    pub prefix: String,
    /// CA bundle to verify etcd's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Key of the client certificate.
    pub key_file: Option<PathBuf>,
}

/// The etcd store.
#[derive(Clone)]
pub struct EtcdStore {
    cluster: Cluster,
    prefix: String,
    /// Grants of lease writes whose answer was lost.
    unsettled: Unsettled,
}

/// Leases read per request when listing: a listing of 20,000 leases stays a few pages of
/// well under a megabyte each, all read at the first page's revision.
const PAGE: i64 = 2_000;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn read_pem(flag: &str, p: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(p).map_err(|e| unavailable(format!("{flag} {}: {e}", p.display())))
}

fn put_op(key: &str, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::Put(PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
        })),
    }
}

fn get_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::Range(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

fn revision(h: &Option<proto::ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

impl EtcdStore {
    /// Connects to etcd; fails with a clear error when no member answers within a few seconds.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, StoreError> {
        let ca_pem = opts
            .ca_file
            .as_deref()
            .map(|p| read_pem("etcd CA file", p))
            .transpose()?;
        let identity_pem = match (&opts.cert_file, &opts.key_file) {
            (Some(c), Some(k)) => Some((read_pem("etcd cert file", c)?, read_pem("etcd key file", k)?)),
            (None, None) => None,
            _ => return Err(unavailable("--etcd-certfile and --etcd-keyfile must be given together")),
        };
        let cluster = Cluster::new(&ClusterOptions {
            endpoints: opts.endpoints.clone(),
            ca_pem,
            identity_pem,
        })
        .map_err(unavailable)?;
        let store = EtcdStore {
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            cluster,
            unsettled: Unsettled::default(),
        };
        // One linearizable read proves that some member answers and that the cluster has a
        // leader to answer through.
        store
            .range(RangeRequest {
                key: store.config_key().into_bytes(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(format!("cannot reach etcd at {}: {e}", store.cluster.endpoints())))?;
        Ok(store)
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn doc_prefix(&self, kind: DocKind) -> String {
        format!("{}/{}/", self.prefix, kind.segment())
    }

    fn lease_key(&self, net: &Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(net))
    }

    fn kv_to_lease(&self, kv: &KeyValue) -> Result<Lease, StoreError> {
        let key = String::from_utf8_lossy(&kv.key).to_string();
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
        };
        let tail = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key);
        let subnet = parse_subnet_key(tail).ok_or_else(|| corrupt("not a subnet key".into()))?;
        let attrs: LeaseAttrs = serde_json::from_slice(&kv.value).map_err(|e| corrupt(e.to_string()))?;
        Ok(Lease {
            subnet,
            attrs,
            // etcd does not return the remaining TTL with a read; the owner knows its own.
            expiration: SystemTime::now() + super::DEFAULT_TTL,
            revision: kv.mod_revision,
            ttl_handle: kv.lease,
        })
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, EtcdError> {
        self.cluster.unary(path::RANGE, req).await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, StoreError> {
        self.cluster.unary(path::TXN, req).await.map_err(unavailable)
    }

    /// Every key under `prefix`, page by page at the first page's revision, so the listing is
    /// one consistent snapshot however large; returns it and its revision.
    async fn list_prefix(&self, prefix: &str, keys_only: bool) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut key = prefix.as_bytes().to_vec();
        let (mut kvs, mut at) = (Vec::new(), 0);
        loop {
            let page = self
                .range(RangeRequest {
                    key: key.clone(),
                    range_end: end.clone(),
                    limit: PAGE,
                    revision: at,
                    keys_only,
                })
                .await;
            let page = match page {
                Ok(p) => p,
                // The revision was compacted between two pages: start over at a newer one.
                Err(e) if e.is_compacted() && at != 0 => {
                    (kvs, at, key) = (Vec::new(), 0, prefix.as_bytes().to_vec());
                    continue;
                }
                Err(e) => return Err(unavailable(e)),
            };
            if at == 0 {
                at = revision(&page.header);
            }
            let more = page.more;
            if let Some(last) = page.kvs.last() {
                key = last.key.clone();
                key.push(0);
            }
            kvs.extend(page.kvs);
            if !more {
                return Ok((kvs, at));
            }
        }
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let r: LeaseGrantResponse = self
            .cluster
            .unary(path::LEASE_GRANT, LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(unavailable)?;
        if !r.error.is_empty() {
            return Err(unavailable(format!("etcd refused a lease: {}", r.error)));
        }
        Ok(r.id)
    }

    async fn revoke_quietly(&self, id: i64) {
        if id == 0 {
            return;
        }
        let r: Result<LeaseRevokeResponse, _> = self.cluster.unary(path::LEASE_REVOKE, LeaseRevokeRequest { id }).await;
        if let Err(e) = r {
            tracing::debug!(id, error = %e, "revoking an unused etcd lease failed; it will expire");
        }
    }

    /// Puts `attrs` under `key` on a fresh etcd lease if `cmp` holds, returning the new revision
    /// and etcd lease. A request retried on another member after its first try was applied
    /// finds the compare failing on its own write: the key then rides on the lease this call
    /// granted, which nobody else can hold, so that still counts as success. A write whose
    /// answer never came keeps its grant ([`Unsettled`]): if it was applied, the key rides on
    /// that grant, and the next write recognises it and writes over it instead of failing.
    async fn conditional_put(
        &self,
        key: String,
        cmp: Compare,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let value = serde_json::to_vec(attrs).map_err(|e| StoreError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let id = self.grant(ttl).await?;
        let mut cmp = cmp;
        // A second try only after finding one of this node's own unanswered writes in place.
        for _ in 0..2 {
            let txn = TxnRequest {
                compare: vec![cmp],
                success: vec![put_op(&key, value.clone(), id)],
                failure: vec![get_op(&key)],
            };
            let resp = match self.txn(txn).await {
                Ok(r) => r,
                Err(e) => {
                    // Perhaps applied: revoking the grant would delete the key.
                    self.unsettled.note(id);
                    return Err(e);
                }
            };
            let found = resp.responses.iter().find_map(|r| match &r.response {
                Some(Response::Range(g)) => g.kvs.first().map(|kv| (kv.lease, kv.mod_revision)),
                _ => None,
            });
            match found {
                _ if resp.succeeded => return Ok(Some((self.settled(revision(&resp.header), id).await, id))),
                Some((lease, rev)) if lease == id => return Ok(Some((self.settled(rev, id).await, id))),
                Some((lease, rev)) if self.unsettled.holds(lease) => {
                    tracing::info!(%key, "the lease key holds this node's own write whose answer was lost; writing over it");
                    cmp = Compare::mod_revision_is(&key, rev);
                }
                _ => break,
            }
        }
        self.revoke_quietly(id).await;
        Ok(None)
    }

    /// A write landed on grant `id` at `revision`: grants of earlier unanswered writes hold
    /// nothing any more and are revoked. Returns `revision`.
    async fn settled(&self, revision: i64, id: i64) -> i64 {
        for old in self.unsettled.settle(id) {
            self.revoke_quietly(old).await;
        }
        revision
    }

    async fn delete(&self, key: String) -> Result<bool, StoreError> {
        let r: DeleteRangeResponse = self
            .cluster
            .unary(
                path::DELETE_RANGE,
                DeleteRangeRequest {
                    key: key.into_bytes(),
                    range_end: Vec::new(),
                },
            )
            .await
            .map_err(unavailable)?;
        Ok(r.deleted > 0)
    }

    /// The lease events of one watch response.
    fn lease_events(&self, events: &[proto::Event]) -> Vec<LeaseEvent> {
        let prefix = self.subnets_prefix();
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            if ev.r#type == EventType::Delete as i32 {
                let key = String::from_utf8_lossy(&kv.key);
                if let Some(net) = key.strip_prefix(&prefix).and_then(parse_subnet_key) {
                    out.push(LeaseEvent::Removed(net));
                }
                continue;
            }
            match self.kv_to_lease(kv) {
                Ok(l) => out.push(LeaseEvent::Upserted(l)),
                Err(err) => tracing::warn!(%err, "skipping unreadable lease event"),
            }
        }
        out
    }
}

#[async_trait]
impl LeaseStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.cluster.endpoints(), self.prefix)
    }

    async fn network_config(&self) -> Result<Option<String>, StoreError> {
        let r = self
            .range(RangeRequest {
                key: self.config_key().into_bytes(),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        Ok(r.kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).to_string()))
    }

    async fn init_network_config(&self, json: &str) -> Result<bool, StoreError> {
        let key = self.config_key();
        let r = self
            .txn(TxnRequest {
                compare: vec![Compare::version_is(&key, 0)],
                success: vec![put_op(&key, json.as_bytes().to_vec(), 0)],
                failure: Vec::new(),
            })
            .await?;
        Ok(r.succeeded)
    }

    async fn list_leases(&self) -> Result<LeaseSnapshot, StoreError> {
        let (kvs, revision) = self.list_prefix(&self.subnets_prefix(), false).await?;
        let leases = readable(kvs.iter().map(|kv| self.kv_to_lease(kv)));
        Ok(LeaseSnapshot { leases, revision })
    }

    async fn create_lease(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let key = self.lease_key(&subnet);
        let cmp = Compare::version_is(&key, 0);
        Ok(self
            .conditional_put(key, cmp, attrs, ttl)
            .await?
            .map(|(revision, id)| Lease {
                subnet,
                attrs: attrs.clone(),
                expiration: SystemTime::now() + ttl,
                revision,
                ttl_handle: id,
            }))
    }

    async fn update_lease(&self, prev: &Lease, attrs: &LeaseAttrs, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let key = self.lease_key(&prev.subnet);
        let cmp = Compare::mod_revision_is(&key, prev.revision);
        let Some((revision, id)) = self.conditional_put(key, cmp, attrs, ttl).await? else {
            return Ok(None);
        };
        // The key now rides on the new etcd lease; the old one holds nothing any more.
        if prev.ttl_handle != id {
            self.revoke_quietly(prev.ttl_handle).await;
        }
        Ok(Some(Lease {
            subnet: prev.subnet,
            attrs: attrs.clone(),
            expiration: SystemTime::now() + ttl,
            revision,
            ttl_handle: id,
        }))
    }

    async fn delete_lease(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        self.delete(self.lease_key(&subnet)).await
    }

    async fn list_docs(&self, kind: DocKind, values: bool) -> Result<Vec<Doc>, StoreError> {
        let prefix = self.doc_prefix(kind);
        let (kvs, _) = self.list_prefix(&prefix, !values).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let name = std::str::from_utf8(&kv.key).ok()?.strip_prefix(&prefix)?.to_string();
                Some(Doc {
                    name,
                    value: kv.value,
                    revision: kv.mod_revision,
                })
            })
            .collect())
    }

    async fn put_doc(&self, kind: DocKind, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = format!("{}{name}", self.doc_prefix(kind));
        let _: PutResponse = self
            .cluster
            .unary(
                path::PUT,
                PutRequest {
                    key: key.into_bytes(),
                    value: value.to_vec(),
                    lease: 0,
                },
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn delete_doc(&self, kind: DocKind, name: &str) -> Result<bool, StoreError> {
        self.delete(format!("{}{name}", self.doc_prefix(kind))).await
    }

    async fn watch_docs(&self, kind: DocKind) -> Result<DocWatchStream, StoreError> {
        let prefix = self.doc_prefix(kind);
        let create = WatchCreateRequest {
            range_end: prefix_end(prefix.as_bytes()),
            key: prefix.into_bytes(),
            start_revision: 0,
            progress_notify: false,
        };
        let (mut stream, member) = self
            .cluster
            .watch(create)
            .await
            .map_err(|e| unavailable(format!("cannot watch {}: {e}", kind.segment())))?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                let item = match msg {
                    Ok(Some(r)) if r.canceled || r.compact_revision > 0 => Err(unavailable(format!(
                        "etcd member {member} ended the watch: {}",
                        r.cancel_reason
                    ))),
                    Ok(Some(r)) if r.events.is_empty() => continue,
                    Ok(Some(r)) => Ok(revision_of(&r)),
                    Ok(None) => Err(unavailable(format!("etcd member {member} ended the watch"))),
                    Err(e) => Err(unavailable(format!("etcd watch on {member} failed: {}", e.message()))),
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn watch_leases(&self, revision: i64) -> Result<LeaseWatchStream, StoreError> {
        let prefix = self.subnets_prefix();
        let create = WatchCreateRequest {
            range_end: prefix_end(prefix.as_bytes()),
            key: prefix.into_bytes(),
            start_revision: revision + 1,
            progress_notify: false,
        };
        let (mut stream, member) = match self.cluster.watch(create).await {
            Ok(s) => s,
            Err(e) if e.is_compacted() => return Err(StoreError::Compacted(revision)),
            Err(e) => return Err(unavailable(format!("cannot watch leases: {e}"))),
        };
        tracing::debug!(%member, revision, "watching leases");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(unavailable(format!("etcd member {member} ended the watch"))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let why = format!("etcd watch on {member} failed: {}", e.message());
                        let _ = tx.send(Err(unavailable(why))).await;
                        return;
                    }
                };
                if resp.compact_revision > 0 {
                    let _ = tx.send(Err(StoreError::Compacted(resp.compact_revision))).await;
                    return;
                }
                if resp.canceled {
                    let why = format!("etcd member {member} cancelled the watch: {}", resp.cancel_reason);
                    let _ = tx.send(Err(unavailable(why))).await;
                    return;
                }
                let events = me.lease_events(&resp.events);
                if events.is_empty() {
                    continue;
                }
                if tx.send(Ok((events, revision_of(&resp)))).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

/// The revision a watch resumes after: the last event's. A response's header may name a later
/// revision while a watch catches up in batches, so resuming there could skip events.
fn revision_of(r: &proto::WatchResponse) -> i64 {
    r.events
        .iter()
        .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
        .max()
        .unwrap_or_else(|| revision(&r.header))
}
