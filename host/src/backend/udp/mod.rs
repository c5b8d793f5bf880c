//! The `udp` backend: flannel's `udp` wire format (the bare inner IPv4 packet is the UDP
//! payload) on Weft's own userspace data path, [`crate::tunnel`]. The vxlan backend's
//! userspace mode is this backend with VXLAN framing. This file reads the backend's config and
//! starts the tunnel; every packet decision lives in the pure core ([`crate::packet`]) and the
//! framing codecs.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::watch;

use super::vxlan::wire::{self, Mac};
use super::{Backend, BackendError, NodeEnv};
use crate::config::NetworkConfig;
use crate::lease::table::TableUpdate;
use crate::lease::Lease;
use crate::packet::route::SharedRoutes;
use crate::stats::DataplaneStats;
use crate::tunnel::{self, framing::Raw, TunnelError, TunnelSpec};
use crate::wasm::Pipeline;

/// flannel's UDP port for this backend.
pub const DEFAULT_PORT: u16 = 8285;
/// IPv4 (20) + UDP (8) headers added to every packet.
pub const OVERHEAD: u32 = 28;
/// Name of the TUN device.
pub const DEVICE: &str = "weft0";
/// The longest spin after traffic (`Backend.SpinMicros`), in microseconds.
pub const DEFAULT_SPIN_US: u64 = 200;
/// The most queues (the sending ports' stride allows 8).
pub const MAX_QUEUES: u64 = 8;

/// How packets are framed on the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// flannel's `udp` backend: the bare inner packet is the UDP payload.
    Raw,
    /// VXLAN as the kernel frames it (the `vxlan` backend's userspace mode).
    Vxlan {
        /// The VXLAN network identifier.
        vni: u32,
        /// This node's VTEP MAC.
        mac: Mac,
        /// The UDP port (8472).
        port: u16,
    },
}

impl Encap {
    /// Bytes this framing adds on the underlay.
    pub fn overhead(self) -> u32 {
        match self {
            Encap::Raw => OVERHEAD,
            Encap::Vxlan { .. } => wire::OVERHEAD,
        }
    }
}

impl From<TunnelError> for BackendError {
    fn from(e: TunnelError) -> Self {
        match e {
            TunnelError::NoTun => BackendError::NoTun,
            TunnelError::Tun { name, source } => BackendError::Tun { name, source },
            TunnelError::Socket { port, source } => BackendError::Socket { port, source },
            TunnelError::Thread(e) => BackendError::Io(e),
        }
    }
}

/// `Backend.Queues`: forwarding threads, one per CPU up to eight unless given.
fn queues(config: &NetworkConfig) -> Result<usize, BackendError> {
    let given = config
        .backend
        .u64_field("Queues")
        .map_err(|e| BackendError::Config(format!("Backend.Queues: {e}")))?;
    match given {
        None => Ok(std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_QUEUES as usize)),
        Some(q) if (1..=MAX_QUEUES).contains(&q) => Ok(q as usize),
        Some(q) => Err(BackendError::Config(format!(
            "Backend.Queues {q} is out of range (1..={MAX_QUEUES})"
        ))),
    }
}

/// `Backend.SpinMicros`: how long a thread polls after traffic before it sleeps (0: never).
fn spin(config: &NetworkConfig) -> Result<Duration, BackendError> {
    let us = config
        .backend
        .u64_field("SpinMicros")
        .map_err(|e| BackendError::Config(format!("Backend.SpinMicros: {e}")))?
        .unwrap_or(DEFAULT_SPIN_US);
    if us > 10_000 {
        return Err(BackendError::Config(format!("Backend.SpinMicros {us} is over 10000")));
    }
    Ok(Duration::from_micros(us))
}

/// The `udp` backend.
pub struct UdpBackend {
    port: u16,
    /// Whether to use TUN offloads and UDP GSO/GRO (config `Backend.Offload`, default true).
    offload: bool,
    mtu: u32,
    routes: SharedRoutes,
    stats: Arc<DataplaneStats>,
    modules: Arc<Pipeline>,
    public_ip: Ipv4Addr,
    applied: watch::Sender<u64>,
    encap: Encap,
    device: String,
    queues: usize,
    spin: Duration,
}

impl UdpBackend {
    /// A backend for `config` on `node`; nothing is opened until [`Backend::start`].
    pub fn new(
        config: &NetworkConfig,
        node: &NodeEnv,
        modules: Arc<Pipeline>,
        encap: Encap,
        routes: SharedRoutes,
    ) -> Result<Self, BackendError> {
        let port = match config
            .backend
            .u64_field("Port")
            .map_err(|e| BackendError::Config(e.to_string()))?
        {
            None => DEFAULT_PORT,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| BackendError::Config(format!("Backend.Port {p} is not a UDP port")))?,
        };
        let offload = config
            .backend
            .bool_field("Offload")
            .map_err(|e| BackendError::Config(format!("Backend.Offload: {e}")))?
            .unwrap_or(true);
        let mtu = node.overlay_mtu(encap.overhead())?;
        let (port, device) = match encap {
            Encap::Raw => (port, DEVICE.to_string()),
            Encap::Vxlan { vni, port, .. } => (port, format!("weft.{vni}")),
        };
        Ok(UdpBackend {
            port,
            offload,
            mtu,
            routes,
            stats: Arc::new(DataplaneStats::default()),
            modules,
            public_ip: node.public_ip,
            applied: watch::channel(0).0,
            encap,
            device,
            queues: queues(config)?,
            spin: spin(config)?,
        })
    }
}

impl Backend for UdpBackend {
    fn kind(&self) -> &'static str {
        match self.encap {
            Encap::Raw => "udp",
            Encap::Vxlan { .. } => "vxlan",
        }
    }

    fn backend_data(&self) -> serde_json::Value {
        match self.encap {
            Encap::Raw => serde_json::Value::Null,
            Encap::Vxlan { vni, mac, .. } => serde_json::json!({"VNI": vni, "VtepMAC": mac.to_string()}),
        }
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn start(&self, own: &Lease) -> Result<(), BackendError> {
        let spec = TunnelSpec {
            device: self.device.clone(),
            router: own.subnet.network(),
            prefix: self.routes.network().prefix_len(),
            mtu: self.mtu,
            port: self.port,
            offload: self.offload,
            queues: self.queues,
            spin: self.spin,
        };
        let (routes, stats, modules) = (self.routes.clone(), self.stats.clone(), self.modules.clone());
        // The framing is chosen once, here; the loops are compiled for each.
        let up = match self.encap {
            Encap::Raw => tunnel::start(&spec, Raw, routes, stats, modules)?,
            Encap::Vxlan { vni, mac, .. } => tunnel::start(&spec, wire::Vxlan { vni, mac }, routes, stats, modules)?,
        };
        tracing::info!(
            device = %self.device,
            encap = ?self.encap,
            mtu = self.mtu,
            port = self.port,
            router = %spec.router,
            queues = up.queues,
            spin_us = self.spin.as_micros() as u64,
            tun_offload = up.tun_offload,
            udp_gro = up.gro,
            udp_gso = up.gso,
            "udp backend up"
        );
        Ok(())
    }

    fn apply(&self, update: &TableUpdate) {
        self.routes.apply(update, self.public_ip);
        // The forwarding threads read the table on their next packet: it is in the data path.
        self.applied.send_replace(update.generation);
    }

    fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.routes.routes()
    }

    fn stats(&self) -> Arc<DataplaneStats> {
        self.stats.clone()
    }

    fn peer_stats(&self) -> Vec<(Ipv4Addr, Arc<crate::packet::route::PeerCounters>)> {
        self.routes.peer_counters()
    }
}
