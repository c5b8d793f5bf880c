//! `weft module add|set|rm --wait`: after the store took a change, wait until every node
//! holding a lease runs that revision in force (or, after `rm`, no longer runs the module), and
//! fail with the nodes' reasons when one cannot load it or the time runs out. A deploy script
//! then knows the change decides traffic everywhere instead of polling `weft module ls` itself.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Deserialize;
use weft::client::Client;
use weft::lease::LeaseStore;
use weft::wasm::rollout::{Removal, Rollout};
use weft::wasm::spec::{ModuleStatus, NodeStatus};

/// What the store took, and so what `--wait` waits for.
pub(crate) enum Written {
    /// This revision of the module, to be in force on every node.
    Revision { name: String, revision: String },
    /// The module, to be gone from every node.
    Removed(String),
}

/// Where the nodes' reports are read: the store, or an agent's API (`--server`).
pub(crate) enum Source<'a> {
    Store(&'a dyn LeaseStore),
    Api(&'a Client),
}

/// Waits up to `secs` for what the store took to be in force on every node.
pub(crate) async fn wait_for(written: &Written, secs: u64, from: Source<'_>) -> Result<()> {
    match written {
        Written::Revision { name, revision } => {
            wait_in_force(name, revision, secs, async || from.rollout(name).await).await
        }
        Written::Removed(name) => wait_removed(name, secs, async || from.removal(name).await).await,
    }
}

impl Source<'_> {
    /// The rollout of module `name`; none when it is not stored.
    async fn rollout(&self, name: &str) -> Result<Option<Rollout>> {
        match self {
            Source::Store(s) => from_store(*s, name).await,
            Source::Api(c) => from_api(c, name).await,
        }
    }

    /// Where the removed module `name` still runs.
    async fn removal(&self, name: &str) -> Result<Removal> {
        match self {
            Source::Store(s) => removal_from_store(*s, name).await,
            Source::Api(c) => removal_from_api(c, name).await,
        }
    }
}

/// How often the rollout is read again: a node reports within a few hundred milliseconds of a
/// change, and a poll costs one listing of the leases and the modules.
const POLL: Duration = Duration::from_millis(250);

/// Waits up to `secs` for revision `revision` of module `name` to be in force on every node,
/// reading the rollout with `look`. Fails at once when a node reports that it failed to load
/// it, or when the module is changed or removed meanwhile.
async fn wait_in_force(
    name: &str,
    revision: &str,
    secs: u64,
    mut look: impl AsyncFnMut() -> Result<Option<Rollout>>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let Some(r) = look().await? else {
            bail!("module {name} was removed while waiting for it to be in force");
        };
        if r.revision != revision {
            bail!(
                "module {name} was changed again (now revision {}) while waiting for revision {revision}",
                r.revision
            );
        }
        if r.complete() {
            println!(
                "module {name} in force on all {} node(s) (revision {revision})",
                r.nodes
            );
            return Ok(());
        }
        if !r.failed.is_empty() {
            bail!("module {name} cannot load on every node: {}", r.summary());
        }
        if Instant::now() >= deadline {
            bail!(
                "module {name} not in force on every node after {secs} s: {}",
                r.summary()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits up to `secs` until no node holding a lease still runs the removed module `name`,
/// reading where it runs with `look`.
async fn wait_removed(name: &str, secs: u64, mut look: impl AsyncFnMut() -> Result<Removal>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = look().await?;
        if r.complete() {
            println!("module {name} removed from all {} node(s)", r.nodes);
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("module {name} still runs after {secs} s: {}", r.summary());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The PublicIPs of the nodes holding a lease: the nodes that count.
pub(crate) async fn lease_nodes(store: &dyn LeaseStore) -> Result<Vec<String>> {
    let leases = store.list_leases().await?.leases;
    Ok(leases.iter().map(|l| l.attrs.public_ip.to_string()).collect())
}

/// The rollout of module `name` read from the store: the leases say which nodes count.
async fn from_store(store: &dyn LeaseStore, name: &str) -> Result<Option<Rollout>> {
    let nodes = lease_nodes(store).await?;
    Ok(weft::wasm::registry::rollout(store, name, &nodes).await?)
}

/// Where the removed module `name` still runs, read from the store.
async fn removal_from_store(store: &dyn LeaseStore, name: &str) -> Result<Removal> {
    let nodes = lease_nodes(store).await?;
    let (_, reports) = weft::wasm::registry::list(store).await?;
    Ok(Removal::of(name, &nodes, &reports))
}

/// A node as `GET /nodes` answers: its lease's PublicIP and its last report's modules.
#[derive(Deserialize)]
struct NodeReport {
    public_ip: String,
    modules: Vec<ModuleStatus>,
}

/// Where the removed module `name` still runs, as an agent's API answers (`/nodes` lists the
/// leases, each with its node's report).
async fn removal_from_api(c: &Client, name: &str) -> Result<Removal> {
    let listed: Vec<NodeReport> = c.call("GET", "/nodes", None, b"").await?;
    let nodes: Vec<String> = listed.iter().map(|n| n.public_ip.clone()).collect();
    let reports: Vec<NodeStatus> = listed
        .into_iter()
        .map(|n| NodeStatus {
            node: n.public_ip,
            updated: 0,
            modules: n.modules,
        })
        .collect();
    Ok(Removal::of(name, &nodes, &reports))
}

/// The rollout of module `name` as an agent's API answers it.
pub(crate) async fn from_api(c: &Client, name: &str) -> Result<Option<Rollout>> {
    match c.call("GET", &format!("/modules/{name}/rollout"), None, b"").await {
        Ok(r) => Ok(Some(r)),
        Err(weft::client::ClientError::Api { status: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
