//! The `host-gw` backend: no encapsulation, a kernel route per remote subnet via the node that
//! leases it (`<subnet> via <PublicIP> dev <underlay>`), as flannel's host-gw. Every node must be
//! on one L2 segment. Routes are programmed over netlink, tagged with Weft's own route protocol
//! number so reconciliation (on every lease change and on a timer) touches only Weft's routes and
//! leaves none stale after a restart.
//!
//! Packets never reach userspace on this backend: Wasm modules see each new flow's first
//! packet through NFQUEUE ([`crate::nfq`]), as on the kernel `vxlan` path.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use rtnetlink::Handle;
use tokio::sync::{mpsc, watch};

use super::netlink::{self, on_link, KernelRoute, NlError, ROUTE_PROTO};
use super::reconcile::{self, Fatal, Kernel, KernelWrites, Peers, Work};
use super::{Backend, BackendError, NodeEnv};
use crate::config::NetworkConfig;
use crate::lease::table::TableUpdate;
use crate::lease::Lease;
use crate::packet::route::SharedRoutes;
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
    public_ip: Ipv4Addr,
    mtu: u32,
    check: Duration,
    routes: SharedRoutes,
    work: mpsc::UnboundedSender<Work<Route>>,
    work_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Work<Route>>>>,
    applied: watch::Sender<u64>,
    writes: Arc<KernelWrites>,
    stats: Arc<DataplaneStats>,
}

impl HostGwBackend {
    /// A backend for `config` on `node`; `Backend.RouteCheckSecs` sets the reconcile period.
    pub fn new(config: &NetworkConfig, node: &NodeEnv, routes: SharedRoutes) -> Result<Self, BackendError> {
        let check = check_period(config)?;
        let (work, rx) = mpsc::unbounded_channel();
        Ok(HostGwBackend {
            iface: node.iface.clone(),
            public_ip: node.public_ip,
            mtu: node.iface_mtu,
            check,
            routes,
            work,
            work_rx: std::sync::Mutex::new(Some(rx)),
            applied: watch::channel(0).0,
            writes: Arc::default(),
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
        let rx = self
            .work_rx
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .ok_or_else(|| BackendError::Config("the host-gw backend was started twice".into()))?;
        let k = RouteKernel {
            handle,
            iface: self.iface.clone(),
            index: 0,
            nets: Vec::new(),
            writes: self.writes.clone(),
        };
        rt.spawn(reconcile::drive(
            k,
            rx,
            self.applied.clone(),
            self.check,
            self.stats.clone(),
        ));
        tracing::info!(iface = %self.iface, check_secs = self.check.as_secs(), proto = ROUTE_PROTO,
            "host-gw backend up: routes via peers on the underlay");
        Ok(())
    }

    fn apply(&self, update: &TableUpdate) {
        self.routes.apply(update, self.public_ip);
        // The receiver lives as long as the data path; once it stopped there is nothing to do.
        let _ = self
            .work
            .send(reconcile::work(update, |l| Some((l.subnet, l.attrs.public_ip))));
    }

    fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn kernel_writes(&self) -> Option<Arc<KernelWrites>> {
        Some(self.writes.clone())
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

/// The kernel side of `host-gw`: one route per peer subnet via the peer's PublicIP.
struct RouteKernel {
    handle: Handle,
    iface: String,
    /// The underlay's index and networks as the last full round found them.
    index: u32,
    nets: Vec<Ipv4Net>,
    writes: Arc<KernelWrites>,
}

fn route(dst: Ipv4Net, via: Ipv4Addr, dev: u32) -> KernelRoute {
    KernelRoute {
        dst,
        via,
        dev,
        onlink: false,
    }
}

impl RouteKernel {
    /// Deletes then adds; a delete of a route that is gone already counts as done.
    async fn write(&self, del: Vec<KernelRoute>, add: Vec<KernelRoute>) -> Result<(), NlError> {
        let h = &self.handle;
        let (deleted, _) = netlink::each(del, "route removed", |r| async move {
            match netlink::del_route(h, r).await {
                Err(e) if netlink::already_gone(&e) => Ok(()),
                other => other,
            }
        })
        .await;
        let (added, err) = netlink::each(add, "route added", |r| netlink::add_route(h, r)).await;
        self.writes.count(added, deleted);
        if added + deleted > 0 {
            tracing::info!(iface = %self.iface, added, deleted, "routes written");
        }
        err.map_or(Ok(()), Err)
    }

    /// Why `via` cannot be routed to, if it is off the underlay's segment.
    fn off_link(&self, dst: Ipv4Net, via: Ipv4Addr) -> Option<String> {
        (!on_link(via, &self.nets)).then(|| {
            format!(
                "host-gw needs every node on one L2 segment, but the node leasing {dst} ({via}) is not on a network of {} ({})",
                self.iface,
                self.nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl Kernel for RouteKernel {
    type Peer = Route;

    /// One full round; `Ok(Some(reason))` when the node cannot run host-gw at all (the first
    /// round with peers finds one off the L2 segment).
    async fn full(&mut self, peers: &Peers<Route>, first: bool) -> Result<Option<Fatal>, NlError> {
        let h = &self.handle;
        self.index = netlink::require_link(h, &self.iface).await?;
        self.nets = netlink::networks(h, self.index).await?;
        let mut want = HashSet::new();
        for &(dst, via) in peers.values() {
            match self.off_link(dst, via) {
                None => {
                    want.insert(route(dst, via, self.index));
                }
                Some(msg) if first => return Ok(Some(msg)),
                Some(msg) => tracing::error!("{msg}; no route to it"),
            }
        }
        let have: HashSet<KernelRoute> = netlink::weft_routes(h).await?.into_iter().collect();
        let add: Vec<KernelRoute> = want.difference(&have).copied().collect();
        // A route to a subnet that is added anyway is replaced in place, never deleted first.
        let replaced: HashSet<Ipv4Net> = add.iter().map(|r| r.dst).collect();
        let del = have
            .difference(&want)
            .filter(|r| !replaced.contains(&r.dst))
            .copied()
            .collect();
        self.writes
            .full_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.write(del, add).await.map(|()| None)
    }

    async fn delta(
        &mut self,
        _peers: &Peers<Route>,
        changed: &[(Option<Route>, Option<Route>)],
    ) -> Result<(), NlError> {
        let mut del = Vec::new();
        let mut add = Vec::new();
        for (before, after) in changed {
            match after {
                Some((dst, via)) => match self.off_link(*dst, *via) {
                    // Added in place of whatever route the subnet had.
                    None => add.push(route(*dst, *via, self.index)),
                    Some(msg) => {
                        tracing::error!("{msg}; no route to it");
                        del.extend(before.map(|(d, v)| route(d, v, self.index)));
                    }
                },
                None => del.extend(before.map(|(d, v)| route(d, v, self.index))),
            }
        }
        self.write(del, add).await
    }
}
