//! `weft module add|set --wait`: after the store took a change, wait until every node holding a
//! lease runs that revision in force, and fail with the nodes' reasons when one cannot load it
//! or the time runs out. A deploy script then knows the module decides traffic everywhere
//! instead of polling `weft module ls` itself.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use weft::lease::LeaseStore;
use weft::wasm::rollout::Rollout;

/// How often the rollout is read again: a node reports within a few hundred milliseconds of a
/// change, and a poll costs one listing of the leases and the modules.
const POLL: Duration = Duration::from_millis(250);

/// Waits up to `secs` for revision `revision` of module `name` to be in force on every node,
/// reading the rollout with `look`. Fails at once when a node reports that it failed to load
/// it, or when the module is changed or removed meanwhile.
pub(crate) async fn wait_in_force(
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

/// The rollout of module `name` read from the store: the leases say which nodes count.
pub(crate) async fn from_store(store: &dyn LeaseStore, name: &str) -> Result<Option<Rollout>> {
    let nodes: Vec<String> = store
        .list_leases()
        .await?
        .leases
        .iter()
        .map(|l| l.attrs.public_ip.to_string())
        .collect();
    Ok(weft::wasm::registry::rollout(store, name, &nodes).await?)
}

/// The rollout of module `name` as an agent's API answers it.
pub(crate) async fn from_api(c: &weft::client::Client, name: &str) -> Result<Option<Rollout>> {
    match c.call("GET", &format!("/modules/{name}/rollout"), None, b"").await {
        Ok(r) => Ok(Some(r)),
        Err(weft::client::ClientError::Api { status: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
