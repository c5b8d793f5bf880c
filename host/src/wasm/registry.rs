//! Modules in the lease store: what `weft module add|set|rm|ls` do, and the loop by which every
//! agent follows the stored modules and reports which code it has loaded.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::enforcement::Enforcement;
use super::spec::{valid_name, FailurePolicy, ModuleSpec, ModuleStatus, NodeStatus};
use super::{check, Pipeline, Runtime, WasmError};
use crate::lease::{Doc, DocKind, LeaseStore, StoreError};

/// Why a module command failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// (The error is shown, not chained: a chain would print it twice.)
    #[error("module {name}: {error}")]
    Module { name: String, error: WasmError },
    #[error("module {0} already exists (use `weft module set` to change it)")]
    Exists(String),
    #[error("no module named {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

/// Changes `weft module set` may make; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// New code.
    pub wasm: Option<Vec<u8>>,
    /// New config.
    pub config: Option<String>,
    /// New place in the chain.
    pub order: Option<i32>,
    /// New failure policy.
    pub failure: Option<FailurePolicy>,
    /// New dry-run setting.
    pub dry_run: Option<bool>,
    /// A signature for the code and config after the change.
    pub signature: Option<super::signature::Signature>,
}

async fn get(store: &dyn LeaseStore, name: &str) -> Result<Option<ModuleSpec>, RegistryError> {
    let docs = store.list_docs(DocKind::Module, true).await?;
    docs.into_iter()
        .find(|d| d.name == name)
        .map(|d| {
            ModuleSpec::from_json(&d.value).map_err(|error| RegistryError::Module {
                name: name.into(),
                error,
            })
        })
        .transpose()
}

/// The most one add or change may spend compiling and checking a module.
pub const CHECK_CAP: Duration = Duration::from_secs(20);

/// Runs the add-time checks on the runtime's compile pool, never on the caller's thread.
async fn checked(rt: &Arc<Runtime>, spec: &ModuleSpec) -> Result<(), RegistryError> {
    let module = |error| RegistryError::Module {
        name: spec.name.clone(),
        error,
    };
    let wasm = spec.code().map_err(module)?;
    rt.verify(&wasm, spec.config.as_bytes(), spec.signature.as_ref())
        .map_err(module)?;
    let (r, config) = (rt.clone(), spec.config.clone());
    rt.pool()
        .run(CHECK_CAP, move || check(&r, &wasm, config.as_bytes()))
        .await
        .map_err(|e| module(WasmError::Pool(e)))?
        .map_err(module)?;
    Ok(())
}

/// Adds a new module after checking it here: code, ABI, config and a probe decision.
pub async fn add(store: &dyn LeaseStore, rt: &Arc<Runtime>, spec: ModuleSpec) -> Result<(), RegistryError> {
    valid_name(&spec.name).map_err(RegistryError::Invalid)?;
    if get(store, &spec.name).await?.is_some() {
        return Err(RegistryError::Exists(spec.name));
    }
    checked(rt, &spec).await?;
    store.put_doc(DocKind::Module, &spec.name, &spec.to_json()).await?;
    Ok(())
}

/// Changes a stored module, checking the result as `add` does; returns the new spec.
pub async fn set(
    store: &dyn LeaseStore,
    rt: &Arc<Runtime>,
    name: &str,
    c: Changes,
) -> Result<ModuleSpec, RegistryError> {
    let mut spec = get(store, name)
        .await?
        .ok_or_else(|| RegistryError::NotFound(name.into()))?;
    // A signature covers code and config: changing either needs a new one (or none).
    if c.wasm.is_some() || c.config.is_some() || c.signature.is_some() {
        spec.signature = c.signature;
    }
    if let Some(w) = &c.wasm {
        spec.set_wasm(w);
    }
    if let Some(cfg) = c.config {
        spec.config = cfg;
    }
    if let Some(o) = c.order {
        spec.order = o;
    }
    if let Some(f) = c.failure {
        spec.failure = f;
    }
    if let Some(d) = c.dry_run {
        spec.dry_run = d;
    }
    checked(rt, &spec).await?;
    store.put_doc(DocKind::Module, name, &spec.to_json()).await?;
    Ok(spec)
}

/// Removes a module from every node.
pub async fn remove(store: &dyn LeaseStore, name: &str) -> Result<(), RegistryError> {
    if store.delete_doc(DocKind::Module, name).await? {
        Ok(())
    } else {
        Err(RegistryError::NotFound(name.into()))
    }
}

/// Every stored module (unreadable records are skipped with a warning) and every node's report.
pub async fn list(store: &dyn LeaseStore) -> Result<(Vec<ModuleSpec>, Vec<NodeStatus>), RegistryError> {
    let specs = readable_specs(store.list_docs(DocKind::Module, true).await?);
    let nodes = store
        .list_docs(DocKind::ModuleStatus, true)
        .await?
        .into_iter()
        .filter_map(|d| serde_json::from_slice(&d.value).ok())
        .collect();
    Ok((specs, nodes))
}

/// How far module `name`'s stored code has reached on `nodes` (the leases' PublicIPs); `None`
/// when no such module is stored.
pub async fn rollout(
    store: &dyn LeaseStore,
    name: &str,
    nodes: &[String],
) -> Result<Option<super::rollout::Rollout>, RegistryError> {
    let (specs, reports) = list(store).await?;
    Ok(specs
        .iter()
        .find(|s| s.name == name)
        .map(|s| super::rollout::Rollout::of(s, nodes, &reports)))
}

fn readable_specs(docs: Vec<Doc>) -> Vec<ModuleSpec> {
    docs.into_iter()
        .filter_map(|d| match ModuleSpec::from_json(&d.value) {
            Ok(s) if s.name == d.name => Some(s),
            Ok(s) => {
                tracing::warn!(key = %d.name, name = %s.name, "skipping module stored under another name");
                None
            }
            Err(e) => {
                tracing::warn!(key = %d.name, error = %e, "skipping unreadable module record");
                None
            }
        })
        .collect()
}

/// Follows the stored modules forever: watches them (a change is noticed at once, without
/// polling the store), reloads the chain when they change, and reports what this node runs.
/// The report is repeated every 30 s as the node's heartbeat, and again whenever the kernel
/// path puts a pending chain in force (or fails to). While the store cannot be watched, the
/// modules are re-read every `fallback`. A store outage keeps the current chain running.
/// `first` turns true after the first attempt, successful or not.
pub async fn follow(
    store: Arc<dyn LeaseStore>,
    pipeline: Arc<Pipeline>,
    node: Ipv4Addr,
    fallback: Duration,
    first: tokio::sync::watch::Sender<bool>,
) {
    let mut seen: Option<Vec<(String, i64)>> = None;
    let mut failing = false;
    let mut reported = std::time::Instant::now();
    let mut report: Option<Report> = None;
    let mut enforcement = pipeline.enforcer().subscribe();
    loop {
        // Watch first, then read: a change between the two is then never missed.
        let mut changes = match store.watch_docs(DocKind::Module).await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the stored modules; re-reading them periodically");
                None
            }
        };
        loop {
            if reported.elapsed() >= HEARTBEAT {
                seen = None;
            }
            match sync_once(&*store, &pipeline, node, &mut seen).await {
                Ok(Some(r)) => {
                    failing = false;
                    reported = std::time::Instant::now();
                    report = Some(r);
                }
                Ok(None) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot read modules from the store; the current chain keeps running");
                    }
                    failing = true;
                }
            }
            let _ = first.send(true);
            // A change seen during sync_once wakes the loop once more: the report is compared
            // again (no store access when it stands), so one that came just after it is not missed.
            let wake = loop {
                let wait = HEARTBEAT.saturating_sub(reported.elapsed());
                match next_wake(changes.as_mut(), &mut enforcement, wait, fallback).await {
                    Wake::Enforcement => {
                        if let Some(r) = &mut report {
                            if let Err(e) = r.follow(&*store, &pipeline.enforcer().current()).await {
                                tracing::warn!(error = %e, "cannot report the modules now in force");
                            }
                        }
                    }
                    w => break w,
                }
            };
            if wake == Wake::Rewatch {
                break;
            }
        }
    }
}

/// Why [`follow`] stopped waiting.
#[derive(Debug, PartialEq, Eq)]
enum Wake {
    /// Read the modules again (a change, the heartbeat, the fallback period).
    Look,
    /// The watch broke: read again and watch anew.
    Rewatch,
    /// The kernel path put a chain in force or failed to.
    Enforcement,
}

async fn next_wake(
    changes: Option<&mut crate::lease::DocWatchStream>,
    enforcement: &mut tokio::sync::watch::Receiver<super::enforcement::Enforcement>,
    wait: Duration,
    fallback: Duration,
) -> Wake {
    let Some(w) = changes else {
        tokio::select! {
            Ok(()) = enforcement.changed() => return Wake::Enforcement,
            () = tokio::time::sleep(wait.min(fallback)) => return Wake::Rewatch,
        }
    };
    tokio::select! {
        c = w.recv() => match c {
            Some(Ok(_)) => {
                while let Ok(Ok(_)) = w.try_recv() {}
                Wake::Look
            }
            _ => Wake::Rewatch,
        },
        Ok(()) = enforcement.changed() => Wake::Enforcement,
        () = tokio::time::sleep(wait) => Wake::Look,
    }
}

/// What this node loaded last, and what it reported of it.
struct Report {
    node: Ipv4Addr,
    /// The chain generation that holds the modules.
    generation: u64,
    /// The modules as the chain loaded them.
    loaded: Vec<ModuleStatus>,
    /// As last reported (pending while not in force).
    sent: Vec<ModuleStatus>,
}

impl Report {
    /// Reports again if `now` changes what the report says.
    async fn follow(&mut self, store: &dyn LeaseStore, now: &Enforcement) -> Result<(), StoreError> {
        let modules = now.report(self.generation, &self.loaded);
        if modules == self.sent {
            return Ok(());
        }
        put_status(store, self.node, &modules).await?;
        self.sent = modules;
        Ok(())
    }
}

/// How long a report waits for the kernel path to put a new chain in force (its rules are an
/// `iptables-restore` away) before it says the modules are pending.
const IN_FORCE_WAIT: Duration = Duration::from_secs(3);

/// Where the kernel path stands once the chain of `generation` is in force, it has failed, or
/// [`IN_FORCE_WAIT`] has passed.
async fn enforcement_of(pipeline: &Pipeline, generation: u64) -> Enforcement {
    let mut rx = pipeline.enforcer().subscribe();
    let settled = |e: &Enforcement| e.in_force(generation) || e.error.is_some();
    let _ = tokio::time::timeout(IN_FORCE_WAIT, rx.wait_for(settled)).await;
    pipeline.enforcer().current()
}

async fn put_status(store: &dyn LeaseStore, node: Ipv4Addr, modules: &[ModuleStatus]) -> Result<(), StoreError> {
    let status = NodeStatus {
        node: node.to_string(),
        updated: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        modules: modules.to_vec(),
    };
    store
        .put_doc(
            DocKind::ModuleStatus,
            &node.to_string(),
            &serde_json::to_vec(&status).unwrap_or_default(),
        )
        .await
}

/// Loads the stored modules if they changed since `seen` and reports them; the report, or none
/// when nothing changed.
async fn sync_once(
    store: &dyn LeaseStore,
    pipeline: &Arc<Pipeline>,
    node: Ipv4Addr,
    seen: &mut Option<Vec<(String, i64)>>,
) -> Result<Option<Report>, StoreError> {
    let heads: Vec<(String, i64)> = store
        .list_docs(DocKind::Module, false)
        .await?
        .into_iter()
        .map(|d| (d.name, d.revision))
        .collect();
    if seen.as_ref() == Some(&heads) {
        return Ok(None);
    }
    let specs = readable_specs(store.list_docs(DocKind::Module, true).await?);
    let p = pipeline.clone();
    // Compiling is CPU work: it runs on the compile pool, never on the runtime's workers.
    let loaded = pipeline
        .runtime()
        .pool()
        .run(LOAD_CAP, move || p.load(specs))
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot load the stored modules: {e}")))?;
    let generation = pipeline.generation();
    let sent = enforcement_of(pipeline, generation).await.report(generation, &loaded);
    put_status(store, node, &sent).await?;
    *seen = Some(heads);
    Ok(Some(Report {
        node,
        generation,
        loaded,
        sent,
    }))
}

/// The most loading the stored modules may take (each checked by shape, so each compiles in
/// bounded time).
const LOAD_CAP: Duration = Duration::from_secs(120);

/// How often a node re-reports (and so shows it is alive) when nothing changed.
const HEARTBEAT: Duration = Duration::from_secs(30);
