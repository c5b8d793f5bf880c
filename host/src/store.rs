//! Opening the lease store the command line asks for.

use std::path::PathBuf;
use std::sync::Arc;

use crate::lease::embedded::EmbeddedStore;
use crate::lease::etcd::{EtcdOptions, EtcdStore};
use crate::lease::kube::{KubeOptions, KubeStore};
use crate::lease::{LeaseStore, StoreError};

/// Where the leases live.
#[derive(Debug, Clone)]
pub enum StoreOptions {
    /// The embedded database file.
    Embedded(PathBuf),
    /// An etcd cluster.
    Etcd(EtcdOptions),
    /// Node objects of a Kubernetes cluster (`--kube-subnet-mgr`).
    Kube(KubeOptions),
}

impl StoreOptions {
    /// etcd when endpoints are given, else the embedded store at `path`.
    pub fn from_flags(etcd: EtcdOptions, path: PathBuf) -> Self {
        if etcd.endpoints.iter().any(|e| !e.trim().is_empty()) {
            StoreOptions::Etcd(etcd)
        } else {
            StoreOptions::Embedded(path)
        }
    }

    /// Opens the store, creating an embedded one that does not exist yet (the agent's way).
    pub async fn open(&self) -> Result<Arc<dyn LeaseStore>, StoreError> {
        Ok(match self {
            StoreOptions::Embedded(p) => Arc::new(EmbeddedStore::open(p)?),
            StoreOptions::Etcd(o) => Arc::new(EtcdStore::connect(o).await?),
            StoreOptions::Kube(o) => Arc::new(KubeStore::connect(o).await?),
        })
    }

    /// Opens a store that must exist already (the command line's way): a mistyped `--store`
    /// path is an error naming it, never a new empty store that lists nothing.
    pub async fn open_existing(&self) -> Result<Arc<dyn LeaseStore>, StoreError> {
        match self {
            StoreOptions::Embedded(p) if !p.exists() => Err(StoreError::Embedded {
                path: p.display().to_string(),
                reason: "no such file (an agent creates its store on first start; check --store)".into(),
            }),
            _ => self.open().await,
        }
    }
}
