//! The etcd v3 lease store, in flannel's key layout: `<prefix>/config` and
//! `<prefix>/subnets/<a.b.c.d-len>`, each lease key attached to an etcd lease carrying its TTL.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use ipnet::Ipv4Net;

use super::{
    readable, Doc, DocKind, Lease, LeaseAttrs, LeaseEvent, LeaseSnapshot, LeaseStore, LeaseWatchStream, StoreError,
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
    client: Client,
    prefix: String,
    endpoints: String,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EtcdStore {
    /// Connects to etcd; fails with a clear error when no endpoint answers within a few seconds.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, StoreError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            // Keep-alives notice a dead server on an idle watch stream, so the watch re-lists.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if opts.ca_file.is_some() || opts.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.ca_file {
                let pem = std::fs::read(ca).map_err(|e| unavailable(format!("etcd CA file {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&opts.cert_file, &opts.key_file) {
                (Some(c), Some(k)) => {
                    let cert =
                        std::fs::read(c).map_err(|e| unavailable(format!("etcd cert file {}: {e}", c.display())))?;
                    let key =
                        std::fs::read(k).map_err(|e| unavailable(format!("etcd key file {}: {e}", k.display())))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => return Err(unavailable("--etcd-certfile and --etcd-keyfile must be given together")),
            }
            co = co.with_tls(tls);
        }
        let endpoints = opts.endpoints.join(",");
        let mut client = Client::connect(&opts.endpoints, Some(co))
            .await
            .map_err(|e| unavailable(format!("cannot reach etcd at {endpoints}: {e}")))?;
        // Connecting is lazy in places; one cheap read proves the cluster answers.
        client
            .status()
            .await
            .map_err(|e| unavailable(format!("cannot reach etcd at {endpoints}: {e}")))?;
        Ok(EtcdStore {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            endpoints,
        })
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
        let key = String::from_utf8_lossy(kv.key()).to_string();
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
        };
        let tail = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key);
        let subnet = parse_subnet_key(tail).ok_or_else(|| corrupt("not a subnet key".into()))?;
        let attrs: LeaseAttrs = serde_json::from_slice(kv.value()).map_err(|e| corrupt(e.to_string()))?;
        Ok(Lease {
            subnet,
            attrs,
            // etcd does not return the remaining TTL with a read; the owner knows its own.
            expiration: SystemTime::now() + super::DEFAULT_TTL,
            revision: kv.mod_revision(),
            ttl_handle: kv.lease(),
        })
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let r = self.client.clone().lease_grant(secs, None).await.map_err(unavailable)?;
        Ok(r.id())
    }

    async fn revoke_quietly(&self, id: i64) {
        if id != 0 {
            if let Err(e) = self.client.clone().lease_revoke(id).await {
                tracing::debug!(id, error = %e, "revoking an unused etcd lease failed; it will expire");
            }
        }
    }

    /// Puts `attrs` under `key` on a fresh etcd lease if `cmp` holds, returning the new revision.
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
        let txn =
            Txn::new()
                .when(vec![cmp])
                .and_then(vec![TxnOp::put(key, value, Some(PutOptions::new().with_lease(id)))]);
        let resp = match self.client.clone().txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke_quietly(id).await;
                return Err(unavailable(e));
            }
        };
        if !resp.succeeded() {
            self.revoke_quietly(id).await;
            return Ok(None);
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Some((rev, id)))
    }
}

#[async_trait]
impl LeaseStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints, self.prefix)
    }

    async fn network_config(&self) -> Result<Option<String>, StoreError> {
        let r = self
            .client
            .clone()
            .get(self.config_key(), None)
            .await
            .map_err(unavailable)?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).to_string()))
    }

    async fn init_network_config(&self, json: &str) -> Result<bool, StoreError> {
        let key = self.config_key();
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key, json, None)]);
        let r = self.client.clone().txn(txn).await.map_err(unavailable)?;
        Ok(r.succeeded())
    }

    async fn list_leases(&self) -> Result<LeaseSnapshot, StoreError> {
        let r = self
            .client
            .clone()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        let leases = readable(r.kvs().iter().map(|kv| self.kv_to_lease(kv)));
        Ok(LeaseSnapshot { leases, revision })
    }

    async fn create_lease(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let key = self.lease_key(&subnet);
        let cmp = Compare::version(key.clone(), CompareOp::Equal, 0);
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
        let cmp = Compare::mod_revision(key.clone(), CompareOp::Equal, prev.revision);
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
        let r = self
            .client
            .clone()
            .delete(self.lease_key(&subnet), None)
            .await
            .map_err(unavailable)?;
        Ok(r.deleted() > 0)
    }

    async fn list_docs(&self, kind: DocKind, values: bool) -> Result<Vec<Doc>, StoreError> {
        let prefix = self.doc_prefix(kind);
        let mut opts = GetOptions::new().with_prefix();
        if !values {
            opts = opts.with_keys_only();
        }
        let resp = self
            .client
            .clone()
            .get(prefix.clone(), Some(opts))
            .await
            .map_err(unavailable)?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let name = kv.key_str().ok()?.strip_prefix(&prefix)?.to_string();
                Some(Doc {
                    name,
                    value: kv.value().to_vec(),
                    revision: kv.mod_revision(),
                })
            })
            .collect())
    }

    async fn put_doc(&self, kind: DocKind, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = format!("{}{name}", self.doc_prefix(kind));
        self.client
            .clone()
            .put(key, value.to_vec(), None)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn delete_doc(&self, kind: DocKind, name: &str) -> Result<bool, StoreError> {
        let key = format!("{}{name}", self.doc_prefix(kind));
        let resp = self.client.clone().delete(key, None).await.map_err(unavailable)?;
        Ok(resp.deleted() > 0)
    }

    async fn watch_leases(&self, revision: i64) -> Result<LeaseWatchStream, StoreError> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = self
            .client
            .clone()
            .watch(self.subnets_prefix(), Some(opts))
            .await
            .map_err(unavailable)?;
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
                        let _ = tx.send(Err(unavailable("etcd watch stream ended"))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(format!("etcd watch failed: {e}")))).await;
                        return;
                    }
                };
                if resp.compact_revision() > 0 {
                    let _ = tx.send(Err(StoreError::Compacted(resp.compact_revision()))).await;
                    return;
                }
                if resp.canceled() {
                    let _ = tx
                        .send(Err(unavailable(format!(
                            "etcd cancelled the watch: {}",
                            resp.cancel_reason()
                        ))))
                        .await;
                    return;
                }
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                let mut events = Vec::new();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Put => match me.kv_to_lease(kv) {
                            Ok(l) => events.push(LeaseEvent::Upserted(l)),
                            Err(err) => tracing::warn!(%err, "skipping unreadable lease event"),
                        },
                        EventType::Delete => {
                            let key = String::from_utf8_lossy(kv.key()).to_string();
                            if let Some(net) = key.strip_prefix(&me.subnets_prefix()).and_then(parse_subnet_key) {
                                events.push(LeaseEvent::Removed(net));
                            }
                        }
                    }
                }
                if events.is_empty() && resp.created() {
                    continue;
                }
                if tx.send(Ok((events, rev))).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
