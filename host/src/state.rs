//! What a running agent knows, in one place: the data path, the lease table it follows, the
//! store's health, this node's lease and the module chain. The admin endpoint (metrics,
//! health) and the API read it; the agent's tasks write it. It depends on neither side.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;

use crate::backend::Backend;
use crate::lease::table::{LeaseTable, TableUpdate};
use crate::lease::watch::StoreHealth;
use crate::lease::Lease;
use crate::nfq::PolicyStats;
use crate::wasm::Pipeline;

/// How many past versions of the lease table are kept for paged reads to finish on.
const RECENT_TABLES: usize = 16;

/// The agent's state, shared by its tasks, its metrics and its API.
pub struct AgentState {
    /// True once every lease of the first listing is in the data path and the subnet file is
    /// written.
    pub ready: AtomicBool,
    /// The data path.
    pub backend: Arc<dyn Backend>,
    /// Lease store health.
    pub store_health: Arc<StoreHealth>,
    /// Times this node acquired its lease.
    pub acquisitions: AtomicU64,
    /// Successful renewals.
    pub renewals: AtomicU64,
    /// The Wasm decision chain.
    pub modules: Arc<Pipeline>,
    /// The kernel-path policy's counters, on backends whose packets stay in the kernel.
    pub kernel_policy: Option<Arc<PolicyStats>>,
    /// Lease table updates handed to the data path.
    pub table_updates: AtomicU64,
    /// Subnets those updates named (a snapshot names every lease).
    pub table_update_subnets: AtomicU64,
    leases: ArcSwap<LeaseTable>,
    leases_synced: AtomicBool,
    leases_known: AtomicUsize,
    recent: Mutex<VecDeque<LeaseTable>>,
    own: Mutex<Option<Lease>>,
}

impl AgentState {
    /// The state of an agent that holds `own` and runs `backend` and `modules`.
    pub fn new(backend: Arc<dyn Backend>, modules: Arc<Pipeline>, store_health: Arc<StoreHealth>, own: Lease) -> Self {
        AgentState {
            ready: AtomicBool::new(false),
            kernel_policy: backend.kernel_path().then(Default::default),
            backend,
            store_health,
            acquisitions: AtomicU64::new(1),
            renewals: AtomicU64::new(0),
            modules,
            table_updates: AtomicU64::new(0),
            table_update_subnets: AtomicU64::new(0),
            leases: ArcSwap::from_pointee(LeaseTable::default()),
            leases_synced: AtomicBool::new(false),
            leases_known: AtomicUsize::new(0),
            recent: Mutex::new(VecDeque::new()),
            own: Mutex::new(Some(own)),
        }
    }

    /// This node's current lease.
    pub fn own_lease(&self) -> Option<Lease> {
        self.own.lock().ok().and_then(|g| g.clone())
    }

    /// This node's subnet.
    pub fn own_subnet(&self) -> Option<Ipv4Net> {
        self.own_lease().map(|l| l.subnet)
    }

    /// Records this node's lease (renewed or re-acquired).
    pub fn set_own(&self, l: Lease) {
        if let Ok(mut g) = self.own.lock() {
            *g = Some(l);
        }
    }

    /// The lease table as this node follows it, once the first listing is in.
    pub fn leases(&self) -> Option<Arc<LeaseTable>> {
        self.leases_synced
            .load(Ordering::Acquire)
            .then(|| self.leases.load_full())
    }

    /// A recent version of the lease table, for a paged read that started on it.
    pub fn leases_at(&self, version: u64) -> Option<LeaseTable> {
        let recent = self.recent.lock().ok()?;
        recent.iter().find(|t| t.version() == version).cloned()
    }

    /// Leases known in the cluster.
    pub fn leases_known(&self) -> usize {
        self.leases_known.load(Ordering::Relaxed)
    }

    /// Takes the table of `u` as the one reads are served from. O(1): the table is persistent.
    pub fn publish(&self, u: &TableUpdate) {
        self.table_updates.fetch_add(1, Ordering::Relaxed);
        self.table_update_subnets.fetch_add(u.size() as u64, Ordering::Relaxed);
        self.leases_known.store(u.table.len(), Ordering::Relaxed);
        self.leases.store(Arc::new(u.table.clone()));
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT_TABLES {
                recent.pop_front();
            }
            recent.push_back(u.table.clone());
        }
        self.leases_synced.store(true, Ordering::Release);
    }
}
