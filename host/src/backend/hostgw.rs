//! The `host-gw` backend: no encapsulation, a kernel route per remote subnet via the node that
//! leases it (`<subnet> via <PublicIP> dev <underlay>`), as flannel's host-gw. Every node must be
//! on one L2 segment. Routes are programmed over netlink, tagged with Weft's own route protocol
//! number so reconciliation (on every lease change and on a timer) touches only Weft's routes and
//! leaves none stale after a restart.
//!
//! Packets never reach userspace on this backend, so Wasm modules are not consulted here.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::sync::watch;

use super::route::RouteTable;
use super::{Backend, BackendError, NodeEnv};
use crate::config::NetworkConfig;
use crate::lease::watch::LeaseTable;
use crate::lease::Lease;
use crate::stats::DataplaneStats;

/// The route protocol number marking Weft's routes (`ip route show proto 87`).
pub const ROUTE_PROTO: u8 = 87;
/// How often routes are re-checked when nothing changed (flannel: 10 s).
pub const DEFAULT_CHECK: Duration = Duration::from_secs(10);

/// A route: remote subnet via a peer's PublicIP.
pub type Route = (Ipv4Net, Ipv4Addr);

/// What to change so the kernel holds exactly `want`: (to delete, to add).
pub fn plan(want: &[Route], have: &[Route]) -> (Vec<Route>, Vec<Route>) {
    let del = have.iter().filter(|r| !want.contains(r)).copied().collect();
    let add = want.iter().filter(|r| !have.contains(r)).copied().collect();
    (del, add)
}

/// Whether `peer` is directly reachable on one of the underlay's networks.
pub fn on_link(peer: Ipv4Addr, nets: &[Ipv4Net]) -> bool {
    nets.iter().any(|n| n.contains(&peer))
}

/// The `host-gw` backend.
pub struct HostGwBackend {
    network: Ipv4Net,
    subnet_len: u8,
    iface: String,
    mtu: u32,
    check: Duration,
    routes: Arc<ArcSwap<RouteTable>>,
    desired: watch::Sender<Vec<Route>>,
    stats: Arc<DataplaneStats>,
}

impl HostGwBackend {
    /// A backend for `config` on `node`; `Backend.RouteCheckSecs` sets the reconcile period.
    pub fn new(config: &NetworkConfig, node: &NodeEnv) -> Result<Self, BackendError> {
        let check = config
            .backend
            .u64_field("RouteCheckSecs")
            .map_err(|e| BackendError::Config(e.to_string()))?
            .map(|s| {
                if s == 0 {
                    Err(BackendError::Config("Backend.RouteCheckSecs must be at least 1".into()))
                } else {
                    Ok(Duration::from_secs(s))
                }
            })
            .transpose()?
            .unwrap_or(DEFAULT_CHECK);
        Ok(HostGwBackend {
            network: config.network,
            subnet_len: config.subnet_len,
            iface: node.iface.clone(),
            mtu: node.iface_mtu,
            check,
            routes: Arc::new(ArcSwap::from_pointee(RouteTable::new(
                config.network,
                config.subnet_len,
                None,
            ))),
            desired: watch::channel(Vec::new()).0,
            stats: Arc::new(DataplaneStats::default()),
        })
    }
}

impl Backend for HostGwBackend {
    fn kind(&self) -> &'static str {
        "host-gw"
    }

    fn backend_data(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn start(&self, _own: &Lease) -> Result<(), BackendError> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| BackendError::Config(format!("host-gw needs the agent's runtime: {e}")))?;
        let (conn, handle, _) = rtnetlink::new_connection()?;
        rt.spawn(conn);
        let r = Reconciler {
            handle,
            iface: self.iface.clone(),
            check: self.check,
            stats: self.stats.clone(),
        };
        rt.spawn(r.run(self.desired.subscribe()));
        tracing::info!(iface = %self.iface, check_secs = self.check.as_secs(), proto = ROUTE_PROTO,
            "host-gw backend up: routes via peers on the underlay; Wasm modules are not consulted on this kernel path");
        Ok(())
    }

    fn sync_routes(&self, own: Ipv4Net, table: &LeaseTable) {
        let t = RouteTable::from_leases(self.network, self.subnet_len, Some(own), table.leases());
        let want = t.routes();
        self.routes.store(Arc::new(t));
        self.desired.send_replace(want);
    }

    fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.routes.load().routes()
    }

    fn stats(&self) -> Arc<DataplaneStats> {
        self.stats.clone()
    }
}

/// Why one reconcile round failed.
#[derive(Debug, thiserror::Error)]
enum NlError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("the underlay interface {0} is gone")]
    NoIface(String),
}

/// Keeps the kernel's Weft routes equal to the desired set.
struct Reconciler {
    handle: Handle,
    iface: String,
    check: Duration,
    stats: Arc<DataplaneStats>,
}

impl Reconciler {
    async fn run(self, mut desired: watch::Receiver<Vec<Route>>) {
        // The first round with a lease table decides whether this node can run host-gw at all.
        let mut first = true;
        loop {
            let want = desired.borrow_and_update().clone();
            match self.round(&want, first && !want.is_empty()).await {
                Ok(Some(fatal)) => {
                    self.stats.fail(fatal);
                    return;
                }
                Ok(None) => first &= want.is_empty(),
                Err(e) => tracing::warn!(error = %e, "host-gw route reconcile failed; retrying"),
            }
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                () = tokio::time::sleep(self.check) => {}
            }
        }
    }

    async fn index(&self) -> Result<u32, NlError> {
        let mut links = self.handle.link().get().match_name(self.iface.clone()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(l.header.index),
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => Err(NlError::NoIface(self.iface.clone())),
            Err(e) => Err(e.into()),
        }
    }

    async fn networks(&self, index: u32) -> Result<Vec<Ipv4Net>, NlError> {
        let mut addrs = self.handle.address().get().set_link_index_filter(index).execute();
        let mut nets = Vec::new();
        while let Some(a) = addrs.try_next().await? {
            for attr in &a.attributes {
                if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr {
                    if let Ok(n) = Ipv4Net::new(*ip, a.header.prefix_len) {
                        nets.push(n.trunc());
                    }
                }
            }
        }
        Ok(nets)
    }

    async fn installed(&self) -> Result<Vec<Route>, NlError> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut have = Vec::new();
        while let Some(r) = routes.try_next().await? {
            if r.header.protocol != RouteProtocol::Other(ROUTE_PROTO) {
                continue;
            }
            if let Some(route) = parse(&r) {
                have.push(route);
            }
        }
        Ok(have)
    }

    /// One round; `Ok(Some(reason))` when the node cannot run host-gw at all.
    async fn round(&self, want: &[Route], first: bool) -> Result<Option<String>, NlError> {
        let index = self.index().await?;
        let nets = self.networks(index).await?;
        let (reachable, off): (Vec<Route>, Vec<Route>) = want.iter().partition(|(_, via)| on_link(*via, &nets));
        if let Some((net, via)) = off.first() {
            let msg = format!(
                "host-gw needs every node on one L2 segment, but the node leasing {net} ({via}) is not on a network of {} ({})",
                self.iface,
                nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            );
            if first {
                return Ok(Some(msg));
            }
            tracing::error!("{msg}; no route to it");
        }
        let (del, add) = plan(&reachable, &self.installed().await?);
        for (net, via) in del {
            let msg = message(net, via, index);
            if let Err(e) = self.handle.route().del(msg).execute().await {
                tracing::warn!(%net, %via, error = %e, "cannot remove a stale route");
            } else {
                tracing::info!(%net, %via, "route removed");
            }
        }
        for (net, via) in add {
            self.handle
                .route()
                .add(message(net, via, index))
                .replace()
                .execute()
                .await?;
            tracing::info!(%net, %via, dev = %self.iface, "route added");
        }
        Ok(None)
    }
}

fn message(net: Ipv4Net, via: Ipv4Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(net.network(), net.prefix_len())
        .gateway(via)
        .output_interface(index)
        .protocol(RouteProtocol::Other(ROUTE_PROTO))
        .build()
}

fn parse(r: &RouteMessage) -> Option<Route> {
    let mut dst = None;
    let mut via = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
            _ => {}
        }
    }
    Some((Ipv4Net::new(dst?, r.header.destination_prefix_length).ok()?, via?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: &str, v: &str) -> Route {
        (n.parse().unwrap(), v.parse().unwrap())
    }

    #[test]
    fn plans_remove_stale_and_moved_routes_and_add_missing_ones() {
        let want = [r("10.244.2.0/24", "198.18.0.2"), r("10.244.3.0/24", "198.18.0.3")];
        let have = [r("10.244.3.0/24", "198.18.0.9"), r("10.244.9.0/24", "198.18.0.9")];
        let (del, add) = plan(&want, &have);
        assert_eq!(del, have.to_vec(), "moved and vanished leases go");
        assert_eq!(add, want.to_vec());
        assert_eq!(plan(&want, &want), (vec![], vec![]), "nothing to do twice");
    }

    #[test]
    fn peers_must_be_on_an_underlay_network() {
        let nets = ["198.18.0.0/24".parse().unwrap()];
        assert!(on_link("198.18.0.7".parse().unwrap(), &nets));
        assert!(!on_link("203.0.113.7".parse().unwrap(), &nets));
    }
}
