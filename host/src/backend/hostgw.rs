//! The `host-gw` backend: no encapsulation, a kernel route per remote subnet via the node that
//! leases it (`<subnet> via <PublicIP> dev <underlay>`), as flannel's host-gw. Every node must be
//! on one L2 segment. Routes are programmed over netlink, tagged with Weft's own route protocol
//! number so reconciliation (on every lease change and on a timer) touches only Weft's routes and
//! leaves none stale after a restart.
//!
//! Packets never reach userspace on this backend: Wasm modules see each new flow's first
//! packet through NFQUEUE ([`crate::nfq`]), as on the kernel `vxlan` path.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use tokio::sync::watch;

use super::netlink::{self, on_link, KernelRoute, NlError, ROUTE_PROTO};
use super::route::SharedRoutes;
use super::{Backend, BackendError, NodeEnv};
use crate::config::NetworkConfig;
use crate::lease::watch::LeaseTable;
use crate::lease::Lease;
use crate::stats::DataplaneStats;

/// How often routes are re-checked when nothing changed (flannel: 10 s).
pub const DEFAULT_CHECK: Duration = Duration::from_secs(10);

/// A route: remote subnet via a peer's PublicIP.
pub type Route = (Ipv4Net, Ipv4Addr);

/// `Backend.RouteCheckSecs`: the reconcile period of a kernel backend (at least 1 s).
pub fn check_period(config: &NetworkConfig) -> Result<Duration, BackendError> {
    config
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
        .transpose()
        .map(|d| d.unwrap_or(DEFAULT_CHECK))
}

/// The `host-gw` backend.
pub struct HostGwBackend {
    iface: String,
    mtu: u32,
    check: Duration,
    routes: SharedRoutes,
    desired: watch::Sender<Vec<Route>>,
    stats: Arc<DataplaneStats>,
}

impl HostGwBackend {
    /// A backend for `config` on `node`; `Backend.RouteCheckSecs` sets the reconcile period.
    pub fn new(config: &NetworkConfig, node: &NodeEnv) -> Result<Self, BackendError> {
        let check = check_period(config)?;
        Ok(HostGwBackend {
            iface: node.iface.clone(),
            mtu: node.iface_mtu,
            check,
            routes: SharedRoutes::new(config.network, config.subnet_len),
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
        let (rt, handle) = netlink::connect(self.kind())?;
        let r = Reconciler {
            handle,
            iface: self.iface.clone(),
            check: self.check,
            stats: self.stats.clone(),
        };
        rt.spawn(r.run(self.desired.subscribe()));
        tracing::info!(iface = %self.iface, check_secs = self.check.as_secs(), proto = ROUTE_PROTO,
            "host-gw backend up: routes via peers on the underlay");
        Ok(())
    }

    fn sync_routes(&self, own: Ipv4Net, table: &LeaseTable) {
        let t = self.routes.build(own, table.leases());
        let want = t.routes();
        self.routes.publish(t);
        self.desired.send_replace(want);
    }

    fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.routes.routes()
    }

    fn stats(&self) -> Arc<DataplaneStats> {
        self.stats.clone()
    }

    fn kernel_path(&self) -> bool {
        true
    }
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

    /// One round; `Ok(Some(reason))` when the node cannot run host-gw at all.
    async fn round(&self, want: &[Route], first: bool) -> Result<Option<String>, NlError> {
        let index = netlink::require_link(&self.handle, &self.iface).await?;
        let nets = netlink::networks(&self.handle, index).await?;
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
        let want: Vec<KernelRoute> = reachable
            .iter()
            .map(|&(dst, via)| KernelRoute {
                dst,
                via,
                dev: index,
                onlink: false,
            })
            .collect();
        let (del, add) = netlink::diff(&want, &netlink::weft_routes(&self.handle).await?);
        for r in del {
            match netlink::del_route(&self.handle, r).await {
                Ok(()) => tracing::info!(net = %r.dst, via = %r.via, "route removed"),
                Err(e) => tracing::warn!(net = %r.dst, via = %r.via, error = %e, "cannot remove a stale route"),
            }
        }
        for r in add {
            netlink::add_route(&self.handle, r).await?;
            tracing::info!(net = %r.dst, via = %r.via, dev = %self.iface, "route added");
        }
        Ok(None)
    }
}
