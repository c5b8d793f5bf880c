//! What the API returns: plain JSON shapes, documented in the OpenAPI schema.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::lease::Lease;
use crate::wasm::rollout::Rollout;
use crate::wasm::signature::Signature;
use crate::wasm::spec::{FailurePolicy, ModuleSpec, ModuleStatus, NodeStatus};
use crate::wasm::stats::{ModuleStats, VerdictKind};

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds from now until `t` (negative once past).
pub fn secs_until(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// One lease.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseView {
    /// The leased subnet, CIDR.
    pub subnet: String,
    /// The subnet as flannel keys it (`10.244.3.0-24`), usable in `/leases/{subnet}`.
    pub key: String,
    /// The owner's underlay address: the node's identity.
    pub public_ip: String,
    /// The owner's backend.
    pub backend_type: String,
    /// The owner's backend data (flannel's `BackendData`).
    /// (Null for backends that publish none, as flannel's `udp`.)
    #[schema(value_type = Option<Object>)]
    pub backend_data: serde_json::Value,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
    /// Seconds left before expiry.
    pub expires_in: i64,
    /// True for the lease of the agent answering.
    pub own: bool,
}

impl LeaseView {
    /// The view of `l`; `own` marks the answering node's lease.
    pub fn of(l: &Lease, own: bool) -> Self {
        LeaseView {
            subnet: l.subnet.to_string(),
            key: crate::subnet::subnet_key(&l.subnet),
            public_ip: l.attrs.public_ip.to_string(),
            backend_type: l.attrs.backend_type.clone(),
            backend_data: l.attrs.backend_data.clone(),
            expires_at: unix(l.expiration),
            expires_in: secs_until(l.expiration),
            own,
        }
    }
}

/// The network config.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigView {
    /// The cluster network.
    pub network: String,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// First subnet handed out.
    pub subnet_min: String,
    /// Last subnet handed out.
    pub subnet_max: String,
    /// The backend type.
    pub backend: String,
    /// The config exactly as stored.
    #[schema(value_type = Object)]
    pub raw: serde_json::Value,
    /// Whether the nodes' reports show a removed module leaving them (false on Kubernetes,
    /// where a module's reports are deleted with it), which `weft module rm --wait` needs.
    pub removal_reported: bool,
}

/// A node: its lease and what it last reported.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    /// The node's underlay address.
    pub public_ip: String,
    /// Its lease.
    pub lease: LeaseView,
    /// Seconds since the node last reported (module status heartbeat); absent if never.
    pub last_seen_secs: Option<u64>,
    /// The modules it reported, with the code it loaded.
    pub modules: Vec<ModuleStatusView>,
}

/// A node's report on one module.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModuleStatusView {
    /// The reporting node (with a module listing) or the module (with a node listing).
    pub name: String,
    /// sha256 of the code loaded.
    pub sha256: String,
    /// The revision of the code and settings loaded (absent from older agents).
    pub revision: Option<String>,
    /// Whether it loaded.
    pub state: LoadState,
    /// Why loading failed.
    pub error: Option<String>,
}

/// Whether a node runs a module's code or its failure policy in its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoadState {
    /// Compiled, configured and in the chain, deciding traffic.
    Loaded,
    /// Loaded, but the kernel path does not ask it yet (its rules are being installed, or
    /// cannot be: `error` says why).
    Pending,
    /// Could not load; its failure policy decides in its place.
    Failed,
}

impl ModuleStatusView {
    /// From a node's report.
    pub fn of(m: &ModuleStatus) -> Self {
        ModuleStatusView {
            name: m.name.clone(),
            sha256: m.sha256.clone(),
            revision: m.revision.clone(),
            state: match m.state.as_str() {
                crate::wasm::spec::LOADED => LoadState::Loaded,
                crate::wasm::spec::PENDING => LoadState::Pending,
                _ => LoadState::Failed,
            },
            error: m.error.clone(),
        }
    }
}

/// A module's counters on the answering node.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ModuleMetrics {
    /// Decision calls.
    pub calls: u64,
    /// Mean nanoseconds per call.
    pub ns_per_call: u64,
    /// Calls that trapped.
    pub traps: u64,
    /// Calls interrupted at the deadline.
    pub timeouts: u64,
    /// Packets answered from the cache.
    pub cache_hits: u64,
    /// Drops asked for in dry-run mode.
    pub dry_run_drops: u64,
    /// Whether the module is quarantined now.
    pub quarantined: bool,
    /// Verdicts by kind.
    pub verdicts: BTreeMap<String, u64>,
    /// The module's own counters.
    pub counters: BTreeMap<String, i64>,
}

impl ModuleMetrics {
    /// A snapshot of `s`.
    pub fn of(s: &ModuleStats, now_ms: u64) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let calls = s.calls.load(Relaxed);
        ModuleMetrics {
            calls,
            ns_per_call: s.call_ns.load(Relaxed).checked_div(calls).unwrap_or(0),
            traps: s.traps.load(Relaxed),
            timeouts: s.timeouts.load(Relaxed),
            cache_hits: s.cache_hits.load(Relaxed),
            dry_run_drops: s.dry_run_drops.load(Relaxed),
            quarantined: s.quarantined(now_ms),
            verdicts: VerdictKind::ALL
                .iter()
                .map(|k| (k.label().to_string(), s.verdicts(*k)))
                .collect(),
            counters: s.counters().into_iter().collect(),
        }
    }
}

/// A stored module, where it runs, and how it does here.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModuleView {
    /// Name.
    pub name: String,
    /// sha256 of the code.
    pub sha256: String,
    /// Which version of the code and settings this is: nodes report the revision they run.
    pub revision: String,
    /// Size of the code in bytes.
    pub size: usize,
    /// Place in the chain (lower first).
    pub order: i32,
    /// Whether its drops are enforced.
    pub mode: Mode,
    /// What its failures mean.
    pub failure: FailurePolicy,
    /// Config text.
    pub config: String,
    /// Id of the key it is signed with (verified by every node that trusts keys), if signed.
    pub signed_by: Option<String>,
    /// Each node's report on this module.
    pub nodes: Vec<ModuleStatusView>,
    /// Counters on the answering node.
    pub metrics: ModuleMetrics,
}

impl ModuleView {
    /// The view of `s` with the reports in `nodes` and local `metrics`.
    pub fn of(s: &ModuleSpec, nodes: &[NodeStatus], metrics: ModuleMetrics) -> Self {
        ModuleView {
            name: s.name.clone(),
            sha256: s.sha256.clone(),
            revision: s.revision(),
            size: s.wasm.len() / 4 * 3,
            order: s.order,
            mode: Mode::of(s.dry_run),
            failure: s.failure,
            config: s.config.clone(),
            signed_by: s.signature.as_ref().map(|g| g.key_id.clone()),
            nodes: nodes
                .iter()
                .filter_map(|n| {
                    n.modules.iter().find(|m| m.name == s.name).map(|m| ModuleStatusView {
                        name: n.node.clone(),
                        ..ModuleStatusView::of(m)
                    })
                })
                .collect(),
            metrics,
        }
    }
}

/// A module's rollout as the API answers it: the counts and lists, and the verdict and the one
/// line `weft module add --wait` prints, so every client words a rollout the same way.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    /// Every node holding a lease runs this revision in force.
    pub complete: bool,
    /// How far it is and what holds it up, in one line (a few nodes named per list).
    pub summary: String,
}

impl From<Rollout> for RolloutView {
    fn from(rollout: Rollout) -> Self {
        RolloutView {
            complete: rollout.complete(),
            summary: rollout.summary(),
            rollout,
        }
    }
}

/// Changes to a module; absent fields stay as they are.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModulePatch {
    /// New place in the chain.
    pub order: Option<i32>,
    /// New mode.
    pub mode: Option<Mode>,
    /// New failure policy.
    pub failure: Option<FailurePolicy>,
    /// New config text.
    pub config: Option<String>,
    /// New code, base64: a hot swap (checked as an upload is, then loaded by every node).
    pub wasm_base64: Option<String>,
    /// Signature of the code and config after the change (as `weft module sign` writes it);
    /// changing either without one leaves the module unsigned.
    pub signature: Option<Signature>,
}

/// Whether a module's drops are enforced (`enforce`) or only counted (`dry_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Drops are enforced.
    Enforce,
    /// Drops are counted and traced, never enforced.
    DryRun,
}

impl Mode {
    /// The mode of a module whose dry-run flag is `dry_run`.
    pub fn of(dry_run: bool) -> Mode {
        if dry_run {
            Mode::DryRun
        } else {
            Mode::Enforce
        }
    }
}

/// Traffic with one peer node, from the answering node.
#[derive(Debug, Serialize, ToSchema)]
pub struct PeerView {
    /// The peer's underlay address.
    pub public_ip: String,
    /// Packets sent to it.
    pub tx_packets: u64,
    /// Inner bytes sent to it.
    pub tx_bytes: u64,
    /// Packets from it delivered here.
    pub rx_packets: u64,
    /// Inner bytes from it delivered here.
    pub rx_bytes: u64,
}

/// The data path's counters on the answering node.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsView {
    /// Backend name.
    pub backend: String,
    /// Packets sent to peers.
    pub tx_packets: u64,
    /// Inner bytes sent to peers.
    pub tx_bytes: u64,
    /// Packets received and delivered.
    pub rx_packets: u64,
    /// Inner bytes received and delivered.
    pub rx_bytes: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// Packets answered from verdict caches.
    pub flow_cache_hits: u64,
    /// Packets that needed the module chain.
    pub flow_cache_misses: u64,
    /// Remote subnets routed, as (subnet, PublicIP).
    pub routes: Vec<(String, String)>,
    /// Traffic with each peer node.
    pub peers: Vec<PeerView>,
    /// Why the data path stopped, if it did.
    pub failure: Option<String>,
}
