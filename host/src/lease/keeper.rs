//! Acquiring and renewing this node's own lease.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;

use super::alloc::{choose, Choice};
use super::{Assignment, Lease, LeaseAttrs, LeaseStore, StoreError};
use crate::config::NetworkConfig;

/// How many times one acquisition re-lists after losing races before giving up for a while.
const LIST_ROUNDS: usize = 20;
/// How many subnets one listing may be tried on before re-listing.
const CREATES_PER_LIST: usize = 10;
/// How often a node waiting for its assigned subnet looks again.
const ASSIGNMENT_POLL: Duration = Duration::from_secs(2);

/// Why no lease could be had.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Every subnet in the range is leased.
    #[error("no free subnet left in {network}: all {range_size} subnets from SubnetMin {min} to SubnetMax {max} are leased ({leased} leases)")]
    Exhausted {
        network: Ipv4Net,
        min: Ipv4Addr,
        max: Ipv4Addr,
        range_size: u64,
        leased: usize,
    },
    /// The subnet assigned to this node lies outside the network config's network.
    #[error("the subnet assigned to this node, {subnet}, is outside the network {network} of the network config: the cluster CIDR and net-conf.json's Network must agree")]
    Outside { subnet: Ipv4Net, network: Ipv4Net },
    /// Other nodes kept winning every subnet this node tried.
    #[error("lost the race for a subnet {0} times in a row; the store is too contended")]
    Contended(usize),
}

/// Acquires and renews one node's lease.
pub struct LeaseKeeper {
    store: Arc<dyn LeaseStore>,
    config: NetworkConfig,
    attrs: LeaseAttrs,
    ttl: Duration,
    renew_margin: Duration,
}

impl LeaseKeeper {
    /// A keeper for the node described by `attrs`.
    pub fn new(
        store: Arc<dyn LeaseStore>,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        ttl: Duration,
        renew_margin: Duration,
    ) -> Self {
        LeaseKeeper {
            store,
            config,
            attrs,
            ttl,
            renew_margin,
        }
    }

    /// Gets this node a lease: its existing one (same PublicIP), else `preferred` if free,
    /// else a random free subnet; a lost creation race moves on to another subnet.
    /// On a store that assigns subnets (Kubernetes), takes the assigned one instead, waiting
    /// for it to be assigned.
    pub async fn acquire(&self, preferred: Option<Ipv4Net>) -> Result<Lease, AcquireError> {
        match self.store.assignment().await {
            Ok(Assignment::Free) => self.pick(preferred).await,
            _ => self.take_assigned().await,
        }
    }

    /// Waits for the subnet someone else assigns, then publishes this node's lease on it. An
    /// unreachable store or a missing assignment is waited out, said once at warning level.
    async fn take_assigned(&self) -> Result<Lease, AcquireError> {
        let mut said: Option<String> = None;
        loop {
            let why = match self.store.assignment().await {
                Ok(Assignment::Assigned(subnet)) => {
                    if !self.config.network.contains(&subnet) {
                        return Err(AcquireError::Outside {
                            subnet,
                            network: self.config.network,
                        });
                    }
                    match self.store.create_lease(subnet, &self.attrs, self.ttl).await {
                        Ok(Some(l)) => return Ok(l),
                        // Reassigned between the two reads: look again.
                        Ok(None) => continue,
                        Err(e) => e.to_string(),
                    }
                }
                Ok(Assignment::Pending(why)) => why,
                Ok(Assignment::Free) => return self.pick(None).await,
                Err(e) => e.to_string(),
            };
            if said.as_deref() != Some(why.as_str()) {
                tracing::warn!("{why}");
                said = Some(why);
            }
            tokio::time::sleep(ASSIGNMENT_POLL).await;
        }
    }

    /// Picks a free subnet (this PublicIP's existing lease first) and leases it.
    async fn pick(&self, preferred: Option<Ipv4Net>) -> Result<Lease, AcquireError> {
        let range = self.config.range();
        let mut tried: HashSet<Ipv4Net> = HashSet::new();
        let mut lost = 0usize;
        for _ in 0..LIST_ROUNDS {
            let snap = self.store.list_leases().await?;
            let mut leases = snap.leases;
            for _ in 0..CREATES_PER_LIST {
                let choice = choose(
                    &range,
                    &leases,
                    self.attrs.public_ip,
                    preferred,
                    &tried,
                    &mut rand::rng(),
                );
                match choice {
                    Choice::Reuse(existing) => {
                        match self.store.update_lease(&existing, &self.attrs, self.ttl).await? {
                            Some(l) => {
                                tracing::info!(subnet = %l.subnet, "adopted the existing lease for this PublicIP");
                                return Ok(l);
                            }
                            // Changed under us (its owner renewed it?): look again.
                            None => {
                                tried.insert(existing.subnet);
                                lost += 1;
                                break;
                            }
                        }
                    }
                    Choice::Create(net) => match self.store.create_lease(net, &self.attrs, self.ttl).await? {
                        Some(l) => {
                            tracing::info!(subnet = %l.subnet, "leased a new subnet");
                            return Ok(l);
                        }
                        None => {
                            tracing::debug!(subnet = %net, "lost the race for a subnet; trying another");
                            tried.insert(net);
                            lost += 1;
                            // Count it as taken so the next pick in this round avoids it.
                            leases.retain(|l| l.subnet != net);
                        }
                    },
                    Choice::Exhausted { range_size, leased } => {
                        if tried.is_empty() {
                            return Err(AcquireError::Exhausted {
                                network: self.config.network,
                                min: self.config.subnet_min,
                                max: self.config.subnet_max,
                                range_size,
                                leased,
                            });
                        }
                        // Subnets we lost may have freed up again; look at a fresh listing.
                        tried.clear();
                        break;
                    }
                }
            }
        }
        Err(AcquireError::Contended(lost))
    }

    /// When `lease` should be renewed: its expiry minus the margin, but never later than
    /// halfway through its TTL, so a short TTL with the default margin still renews in time.
    pub fn renew_at(&self, lease: &Lease) -> SystemTime {
        let margin = self.renew_margin.min(self.ttl / 2);
        lease.expiration.checked_sub(margin).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Renews `lease`; `Ok(None)` when it vanished or was rewritten by someone else.
    pub async fn renew(&self, lease: &Lease) -> Result<Option<Lease>, StoreError> {
        self.store.update_lease(lease, &self.attrs, self.ttl).await
    }
}
