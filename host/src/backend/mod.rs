//! Backends: how packets for remote subnets reach the nodes that lease them. Each backend
//! registers by the name used in the network config's `Backend.Type`.

pub mod hostgw;
pub mod netlink;
pub mod reconcile;

pub mod udp;
pub mod vxlan;

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use tokio::sync::watch;

use crate::config::NetworkConfig;
use crate::lease::table::TableUpdate;
use crate::lease::Lease;
use crate::packet::route::SharedRoutes;
use crate::stats::DataplaneStats;
use crate::wasm::Pipeline;

/// What a backend needs to know about the node it runs on.
#[derive(Debug, Clone)]
pub struct NodeEnv {
    /// The underlay interface.
    pub iface: String,
    /// MTU of the underlay interface.
    pub iface_mtu: u32,
    /// The address peers reach this node at.
    pub public_ip: Ipv4Addr,
    /// Where state that must survive restarts lives (the VTEP MAC).
    pub state_dir: std::path::PathBuf,
}

impl NodeEnv {
    /// The overlay MTU left after `overhead` bytes of encapsulation, refused when too little
    /// remains for an IPv4 packet (68 bytes, RFC 791's minimum).
    pub fn overlay_mtu(&self, overhead: u32) -> Result<u32, BackendError> {
        if self.iface_mtu <= overhead + 68 {
            return Err(BackendError::MtuTooSmall {
                iface: self.iface.clone(),
                iface_mtu: self.iface_mtu,
                overhead: overhead + 68,
            });
        }
        Ok(self.iface_mtu - overhead)
    }
}

/// Errors from a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend {0:?} is not available in this build of weft (available: udp, vxlan, host-gw)")]
    Unknown(String),
    #[error("invalid backend config: {0}")]
    Config(String),
    #[error("missing /dev/net/tun: load the tun module (modprobe tun) or give the container the device")]
    NoTun,
    #[error("cannot create TUN device {name}: {source}")]
    Tun { name: String, source: std::io::Error },
    #[error("cannot open UDP socket on port {port}: {source}")]
    Socket { port: u16, source: std::io::Error },
    #[error("underlay MTU {iface_mtu} of {iface} is too small for the overlay (needs more than {overhead})")]
    MtuTooSmall {
        iface: String,
        iface_mtu: u32,
        overhead: u32,
    },
    #[error("cannot start the data path: {0}")]
    Io(#[from] std::io::Error),
}

/// A data path for the overlay.
pub trait Backend: Send + Sync {
    /// The backend's name, as written in leases' `BackendType`.
    fn kind(&self) -> &'static str;

    /// The `BackendData` this node publishes in its lease.
    fn backend_data(&self) -> serde_json::Value;

    /// The MTU pods must use (FLANNEL_MTU).
    fn mtu(&self) -> u32;

    /// Brings the data path up for the node holding `own`.
    fn start(&self, own: &Lease) -> Result<(), BackendError>;

    /// Makes the data path follow the lease table: routes for every lease but `update.own`. It
    /// returns at once and costs what the update changed; [`applied`](Self::applied) tells when
    /// the data path holds it.
    fn apply(&self, update: &TableUpdate);

    /// The generation of the last update the data path holds in full (its route table
    /// published; on kernel backends, its entries written).
    fn applied(&self) -> watch::Receiver<u64>;

    /// What the backend wrote into the kernel, on backends that write there.
    fn kernel_writes(&self) -> Option<Arc<reconcile::KernelWrites>> {
        None
    }

    /// Current routes, as (remote subnet, PublicIP).
    fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)>;

    /// The data path's counters.
    fn stats(&self) -> Arc<DataplaneStats>;

    /// Whether packets stay in the kernel on this backend (Wasm policy then needs NFQUEUE).
    fn kernel_path(&self) -> bool {
        false
    }

    /// Traffic per peer node, as (PublicIP, counters), for backends that count it.
    fn peer_stats(&self) -> Vec<(Ipv4Addr, Arc<crate::packet::route::PeerCounters>)> {
        Vec::new()
    }
}

/// Creates the backend the network config asks for; `modules` is the Wasm decision chain the
/// backend consults on each new flow, `routes` the route table it keeps (shared with the
/// modules' lease view and the API).
pub fn create(
    config: &NetworkConfig,
    node: &NodeEnv,
    modules: Arc<Pipeline>,
    routes: SharedRoutes,
) -> Result<Arc<dyn Backend>, BackendError> {
    match config.backend.kind.as_str() {
        "udp" => Ok(Arc::new(udp::UdpBackend::new(
            config,
            node,
            modules,
            udp::Encap::Raw,
            routes,
        )?)),
        "vxlan" => {
            let opts = vxlan::VxlanOptions::from_config(config)?;
            if opts.userspace {
                let mac = vxlan::vtep_mac(&node.state_dir, &opts.device())?;
                let encap = udp::Encap::Vxlan {
                    vni: opts.vni,
                    mac,
                    port: opts.port,
                };
                let routes = routes.reading_entries(vxlan::route_entry(opts.vni));
                Ok(Arc::new(udp::UdpBackend::new(config, node, modules, encap, routes)?))
            } else {
                Ok(Arc::new(vxlan::VxlanBackend::new(node, opts, routes)?))
            }
        }
        "host-gw" => Ok(Arc::new(hostgw::HostGwBackend::new(config, node, routes)?)),
        other => Err(BackendError::Unknown(other.to_string())),
    }
}
