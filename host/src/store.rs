//! Opening the lease store the command line asks for.

use std::path::PathBuf;
use std::sync::Arc;

use crate::lease::embedded::EmbeddedStore;
use crate::lease::etcd::{EtcdOptions, EtcdStore};
use crate::lease::{LeaseStore, StoreError};

/// Where the leases live.
#[derive(Debug, Clone)]
pub enum StoreOptions {
    /// The embedded database file.
    Embedded(PathBuf),
    /// An etcd cluster.
    Etcd(EtcdOptions),
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

    /// Opens the store.
    pub async fn open(&self) -> Result<Arc<dyn LeaseStore>, StoreError> {
        Ok(match self {
            StoreOptions::Embedded(p) => Arc::new(EmbeddedStore::open(p)?),
            StoreOptions::Etcd(o) => Arc::new(EtcdStore::connect(o).await?),
        })
    }
}
