//! The `udp` backend: a TUN device and a UDP socket, with Weft's own forwarding loop.
//!
//! Two threads move bytes: TUN -> socket and socket -> TUN. All decisions are made by the pure
//! functions in [`codec`]; the routing table is swapped atomically when leases change, so the
//! threads never take a lock. Each thread owns a [`Worker`] holding its buffers, which is where
//! batching (`recvmmsg`/`sendmmsg`) and, with `tun-rs`'s multi-queue and offload support, one
//! worker pair per queue slot in without touching the decision code.

pub mod codec;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::{DeviceBuilder, SyncDevice};

use self::codec::{Inbound, Outbound};
use super::route::RouteTable;
use super::{Backend, BackendError, NodeEnv};
use crate::config::NetworkConfig;
use crate::lease::watch::LeaseTable;
use crate::lease::Lease;
use crate::stats::{DataplaneStats, DropReason};

/// flannel's UDP port for this backend.
pub const DEFAULT_PORT: u16 = 8285;
/// IPv4 (20) + UDP (8) headers added to every packet.
pub const OVERHEAD: u32 = 28;
/// Name of the TUN device.
pub const DEVICE: &str = "weft0";
const SOCKET_BUFFER: usize = 4 << 20;
const MAX_PACKET: usize = 65536;

/// The `udp` backend.
pub struct UdpBackend {
    network: Ipv4Net,
    subnet_len: u8,
    port: u16,
    mtu: u32,
    routes: Arc<ArcSwap<RouteTable>>,
    stats: Arc<DataplaneStats>,
    running: Mutex<Option<Running>>,
}

struct Running {
    _device: Arc<SyncDevice>,
}

impl UdpBackend {
    /// A backend for `config` on `node`; nothing is opened until [`Backend::start`].
    pub fn new(config: &NetworkConfig, node: &NodeEnv) -> Result<Self, BackendError> {
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
        if node.iface_mtu <= OVERHEAD + 68 {
            return Err(BackendError::MtuTooSmall {
                iface: node.iface.clone(),
                iface_mtu: node.iface_mtu,
                overhead: OVERHEAD + 68,
            });
        }
        Ok(UdpBackend {
            network: config.network,
            subnet_len: config.subnet_len,
            port,
            mtu: node.iface_mtu - OVERHEAD,
            routes: Arc::new(ArcSwap::from_pointee(RouteTable::new(
                config.network,
                config.subnet_len,
                None,
            ))),
            stats: Arc::new(DataplaneStats::default()),
            running: Mutex::new(None),
        })
    }

    /// The UDP port this backend listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn open_socket(&self) -> Result<UdpSocket, BackendError> {
        let err = |source| BackendError::Socket {
            port: self.port,
            source,
        };
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
        // Large buffers absorb bursts while a thread is descheduled; the kernel caps them.
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, self.port));
        s.bind(&addr.into()).map_err(err)?;
        Ok(s.into())
    }
}

impl Backend for UdpBackend {
    fn kind(&self) -> &'static str {
        "udp"
    }

    fn backend_data(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn start(&self, own: &Lease) -> Result<(), BackendError> {
        if !Path::new("/dev/net/tun").exists() {
            return Err(BackendError::NoTun);
        }
        // The device holds the subnet's .0 with the *network's* prefix, so the kernel sends all
        // cluster traffic here, while the node's bridge (a longer prefix) keeps local traffic.
        let router = own.subnet.network();
        let device = DeviceBuilder::new()
            .name(DEVICE)
            .ipv4(router, self.network.prefix_len(), None)
            .mtu(u16::try_from(self.mtu).unwrap_or(u16::MAX))
            .build_sync()
            .map_err(|source| BackendError::Tun {
                name: DEVICE.to_string(),
                source,
            })?;
        let device = Arc::new(device);
        let socket = Arc::new(self.open_socket()?);

        let tx = Worker {
            device: device.clone(),
            socket: socket.clone(),
            routes: self.routes.clone(),
            stats: self.stats.clone(),
            port: self.port,
            buf: vec![0u8; MAX_PACKET],
        };
        let rx = Worker {
            device: device.clone(),
            socket,
            routes: self.routes.clone(),
            stats: self.stats.clone(),
            port: self.port,
            buf: vec![0u8; MAX_PACKET],
        };
        std::thread::Builder::new()
            .name("weft-udp-tx".into())
            .spawn(move || tx.tun_to_udp())?;
        std::thread::Builder::new()
            .name("weft-udp-rx".into())
            .spawn(move || rx.udp_to_tun())?;
        if let Ok(mut r) = self.running.lock() {
            *r = Some(Running { _device: device });
        }
        tracing::info!(device = DEVICE, mtu = self.mtu, port = self.port, %router, "udp backend up");
        Ok(())
    }

    fn sync_routes(&self, own: Ipv4Net, table: &LeaseTable) {
        let t = RouteTable::from_leases(self.network, self.subnet_len, Some(own), table.leases());
        self.routes.store(Arc::new(t));
    }

    fn routes(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.routes.load().routes()
    }

    fn stats(&self) -> Arc<DataplaneStats> {
        self.stats.clone()
    }
}

/// One forwarding thread's state.
struct Worker {
    device: Arc<SyncDevice>,
    socket: Arc<UdpSocket>,
    routes: Arc<ArcSwap<RouteTable>>,
    stats: Arc<DataplaneStats>,
    port: u16,
    buf: Vec<u8>,
}

impl Worker {
    fn tun_to_udp(mut self) {
        loop {
            let n = match self.device.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "reading the TUN device failed; udp tx loop stops");
                    return;
                }
            };
            let routes = self.routes.load();
            match codec::outbound(&routes, &mut self.buf[..n]) {
                Outbound::Send { peer, len } => {
                    let dst = SocketAddrV4::new(peer, self.port);
                    match self.socket.send_to(&self.buf[..len], dst) {
                        Ok(_) => self.stats.sent(len),
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "send failed");
                            self.stats.dropped(DropReason::IoError);
                        }
                    }
                }
                Outbound::Reply(icmp, reason) => {
                    self.stats.dropped(reason);
                    if self.device.send(&icmp).is_ok() {
                        self.stats.icmp_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Outbound::Drop(reason) => self.stats.dropped(reason),
            }
        }
    }

    fn udp_to_tun(mut self) {
        loop {
            let (n, from) = match self.socket.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "receiving from the UDP socket failed");
                    continue;
                }
            };
            let SocketAddr::V4(from) = from else {
                self.stats.dropped(DropReason::UnknownPeer);
                continue;
            };
            let routes = self.routes.load();
            match codec::inbound(&routes, *from.ip(), &mut self.buf[..n]) {
                Inbound::Deliver { len } => match self.device.send(&self.buf[..len]) {
                    Ok(_) => self.stats.received(len),
                    Err(_) => self.stats.dropped(DropReason::IoError),
                },
                Inbound::Drop(reason) => self.stats.dropped(reason),
            }
        }
    }
}
