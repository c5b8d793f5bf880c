//! Subnet leases: the data, the store trait every backend of record implements, and the
//! logic that acquires, renews and watches them.

pub mod alloc;
pub mod embedded;
pub mod etcd;
pub mod keeper;
pub mod kube;
pub mod table;
pub mod watch;

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The default lease time to live, as flannel's: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The JSON value stored under a lease key, byte-compatible with flannel's `LeaseAttrs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// The node's underlay address: where its peers send encapsulated traffic.
    #[serde(rename = "PublicIP", alias = "publicIP", alias = "publicip")]
    pub public_ip: Ipv4Addr,
    /// The node's IPv6 underlay address (kept for flannel compatibility; unused by Weft yet).
    #[serde(
        rename = "PublicIPv6",
        alias = "publicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<String>,
    /// Name of the backend the node runs (`udp`, `vxlan`, `host-gw`).
    #[serde(rename = "BackendType", alias = "backendType", default)]
    pub backend_type: String,
    /// Backend-specific data, e.g. `{"VNI":1,"VtepMAC":"..."}` for vxlan.
    #[serde(rename = "BackendData", alias = "backendData", default)]
    pub backend_data: Value,
    /// Fields written by other tools (or newer flannel versions), kept so a rewrite loses nothing.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl LeaseAttrs {
    /// Attributes for a node at `public_ip` running `backend_type`.
    pub fn new(public_ip: Ipv4Addr, backend_type: &str, backend_data: Value) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: backend_type.to_string(),
            backend_data,
            extra: Map::new(),
        }
    }
}

/// One leased subnet as read from a store.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The leased subnet.
    pub subnet: Ipv4Net,
    /// What the owner published about itself.
    pub attrs: LeaseAttrs,
    /// When the lease lapses unless renewed.
    pub expiration: SystemTime,
    /// The store's revision of the last write to this lease (etcd mod_revision).
    pub revision: i64,
    /// The store's handle on the lease's time to live (etcd lease id; 0 when the store has none).
    pub ttl_handle: i64,
}

/// A consistent listing of every lease, and the revision it was taken at.
#[derive(Debug, Clone, Default)]
pub struct LeaseSnapshot {
    /// All live leases.
    pub leases: Vec<Lease>,
    /// The store revision the listing reflects; a watch continues from the one after it.
    pub revision: i64,
}

/// A change to the lease table.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// A lease was created or rewritten (renewed, or its attributes changed).
    Upserted(Lease),
    /// A lease was deleted or expired.
    Removed(Ipv4Net),
}

/// Errors from a lease store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or answered with an error.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
    /// The watch revision was compacted away; the caller must list again.
    #[error("lease store compacted revision {0}; re-list needed")]
    Compacted(i64),
    /// Stored data that cannot be read.
    #[error("lease store holds invalid data at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The local database failed.
    #[error("embedded lease store {path}: {reason}")]
    Embedded { path: String, reason: String },
}

/// A stream of lease changes from a store, in revision order, each batch with the revision a
/// watch resumes after.
pub type LeaseWatchStream = tokio::sync::mpsc::Receiver<Result<(Vec<LeaseEvent>, i64), StoreError>>;

/// A stream of signals that documents of one kind changed (the store's revision of the change).
pub type DocWatchStream = tokio::sync::mpsc::Receiver<Result<i64, StoreError>>;

/// Kinds of named documents a store keeps beside the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    /// Wasm module specs (`<prefix>/modules/<name>` in etcd).
    Module,
    /// Each node's report of the modules it runs (`<prefix>/module-status/<node>`).
    ModuleStatus,
}

impl DocKind {
    /// The key segment (etcd) or kind column (embedded) of this kind.
    pub fn segment(self) -> &'static str {
        match self {
            DocKind::Module => "modules",
            DocKind::ModuleStatus => "module-status",
        }
    }
}

/// One named document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Its name.
    pub name: String,
    /// Its bytes (empty when listed without values).
    pub value: Vec<u8>,
    /// The store's revision of its last write; changes whenever the document does.
    pub revision: i64,
}

/// Who picks a node's subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// The node picks a free one from the network config's range (embedded store, etcd).
    Free,
    /// Someone else assigned this one (Kubernetes: the node's `spec.podCIDR`).
    Assigned(Ipv4Net),
    /// Someone else assigns it and has not yet; the reason says who and how.
    Pending(String),
}

/// Where leases and the network config live: the embedded database, etcd or Kubernetes.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Human-readable description of the store, for logs.
    fn describe(&self) -> String;

    /// Whether a node's report of the modules it runs outlives a module's removal, so that
    /// the removal can be followed to the nodes (`weft module rm --wait`). On Kubernetes a
    /// node's report of a module lives in that WasmModule's status and is deleted with it.
    fn reports_outlive_modules(&self) -> bool {
        true
    }

    /// The raw network config JSON, if the store has one.
    async fn network_config(&self) -> Result<Option<String>, StoreError>;

    /// Writes the network config unless one is already there; true if this call wrote it.
    async fn init_network_config(&self, json: &str) -> Result<bool, StoreError>;

    /// Who picks this node's subnet; stores that let nodes choose need not say.
    async fn assignment(&self) -> Result<Assignment, StoreError> {
        Ok(Assignment::Free)
    }

    /// Every live lease and the revision of the listing.
    async fn list_leases(&self) -> Result<LeaseSnapshot, StoreError>;

    /// Creates a lease on a subnet nobody holds; `None` when somebody already does.
    async fn create_lease(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError>;

    /// Rewrites `prev` with new attributes and a fresh TTL, only if nobody changed it since it
    /// was read; `None` when it changed or vanished. Renewal and adoption both go through here.
    async fn update_lease(&self, prev: &Lease, attrs: &LeaseAttrs, ttl: Duration) -> Result<Option<Lease>, StoreError>;

    /// Deletes a lease whatever its state; true if it existed.
    async fn delete_lease(&self, subnet: Ipv4Net) -> Result<bool, StoreError>;

    /// Streams lease changes made after `revision`. The stream ends or yields an error when the
    /// store goes away or compacts past `revision`; the caller then lists again.
    async fn watch_leases(&self, revision: i64) -> Result<LeaseWatchStream, StoreError>;

    /// Every document of `kind`, by name; with `values` false only names and revisions (cheap
    /// enough to poll).
    async fn list_docs(&self, kind: DocKind, values: bool) -> Result<Vec<Doc>, StoreError>;

    /// Creates or replaces a document.
    async fn put_doc(&self, kind: DocKind, name: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Deletes a document; true if it existed.
    async fn delete_doc(&self, kind: DocKind, name: &str) -> Result<bool, StoreError>;

    /// Signals every change to documents of `kind` made from now on. The stream ends or yields
    /// an error when the store goes away; the caller then lists and watches again.
    async fn watch_docs(&self, kind: DocKind) -> Result<DocWatchStream, StoreError>;
}

/// The readable leases of a listing. One stray or corrupt key must not hide every other lease
/// from the node, so unreadable entries are logged and skipped.
pub(crate) fn readable(items: impl IntoIterator<Item = Result<Lease, StoreError>>) -> Vec<Lease> {
    items
        .into_iter()
        .filter_map(|r| r.map_err(|err| tracing::warn!(%err, "skipping unreadable lease")).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_lease_json_round_trips() {
        let flannel = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let a: LeaseAttrs = serde_json::from_str(flannel).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(a.backend_type, "vxlan");
        assert_eq!(a.backend_data["VtepMAC"], "c6:d2:32:6f:8f:44");
        let back: Value = serde_json::to_value(&a).unwrap();
        assert_eq!(back["PublicIP"], "192.168.64.3");
        assert_eq!(back["BackendData"]["VNI"], 1);
    }

    #[test]
    fn weft_lease_json_has_flannel_field_names() {
        let a = LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 11), "udp", Value::Null);
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(
            s,
            r#"{"PublicIP":"198.18.0.11","BackendType":"udp","BackendData":null}"#
        );
    }

    #[test]
    fn unknown_fields_survive_a_rewrite() {
        let a: LeaseAttrs = serde_json::from_str(r#"{"PublicIP":"10.0.0.1","BackendType":"udp","Future":42}"#).unwrap();
        assert_eq!(serde_json::to_value(&a).unwrap()["Future"], 42);
    }

    #[test]
    fn missing_public_ip_is_an_error() {
        assert!(serde_json::from_str::<LeaseAttrs>(r#"{"BackendType":"udp"}"#).is_err());
    }
}
