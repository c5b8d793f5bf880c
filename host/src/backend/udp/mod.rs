//! The `udp` backend: a TUN device and a UDP socket, with Weft's own forwarding loop.
//!
//! Two threads move bytes: TUN -> socket and socket -> TUN. All decisions are made by the pure
//! functions in [`codec`]; the routing table is swapped atomically when leases change, so the
//! threads never take a lock. The loops work in batches: with TUN offloads on, one read from the
//! device yields a TCP super-packet that `tun-rs` splits into MTU-sized segments, which leave in
//! one UDP GSO send per peer ([`batch`]); on the way in, UDP GRO hands over runs of datagrams
//! that `tun-rs` coalesces back into super-packets for one TUN write. Each thread owns its
//! [`Worker`] handle and its buffers, so one worker pair per multi-queue TUN queue (each
//! with its own `SO_REUSEPORT` socket) slots in without touching the decision code.
//!
//! Each worker also owns a [`WorkerChain`]: its instances of the Wasm modules and its verdict
//! cache. The chain is asked about each packet (egress on the tx loop, ingress on the rx loop);
//! only a new flow costs a module call, the rest are cache hits.

pub mod batch;
pub mod codec;
pub mod sock;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use self::codec::{Inbound, Outbound};
use super::vxlan::wire::{self, Mac};
use super::{Backend, BackendError, NodeEnv};
use crate::config::NetworkConfig;
use crate::lease::table::TableUpdate;
use crate::lease::Lease;
use crate::packet::route::SharedRoutes;
use crate::stats::{DataplaneStats, DropReason};
use crate::wasm::{Direction, Pipeline, WorkerChain};

/// flannel's UDP port for this backend.
pub const DEFAULT_PORT: u16 = 8285;
/// IPv4 (20) + UDP (8) headers added to every packet.
pub const OVERHEAD: u32 = 28;
/// Name of the TUN device.
pub const DEVICE: &str = "weft0";
/// Room for the largest TUN read: a virtio header and a 64 KiB super-packet.
const MAX_READ: usize = VIRTIO_NET_HDR_LEN + 65_536;
/// Room for one segment: an IPv4 packet no larger than the largest MTU we configure.
const SEGMENT_ROOM: usize = 65_536;

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
        if !Path::new("/dev/net/tun").exists() {
            return Err(BackendError::NoTun);
        }
        // The device holds the subnet's .0 with the *network's* prefix, so the kernel sends all
        // cluster traffic here, while the node's bridge (a longer prefix) keeps local traffic.
        let router = own.subnet.network();
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(&self.device)
                .ipv4(router, self.routes.network().prefix_len(), None)
                .mtu(u16::try_from(self.mtu).unwrap_or(u16::MAX))
                .offload(offload)
                // Down until IPv6 is off on it, so the kernel never sends it router
                // solicitations or MLD reports the IPv4-only overlay would have to drop.
                .enable(false)
                .build_sync()
        };
        let tun_error = |source| BackendError::Tun {
            name: self.device.clone(),
            source,
        };
        let device = if self.offload {
            match build(true) {
                Ok(d) => d,
                Err(e) => {
                    tracing::info!(error = %e, "TUN offloads unavailable; packets move one by one");
                    build(false).map_err(tun_error)?
                }
            }
        } else {
            build(false).map_err(tun_error)?
        };
        disable_ipv6(&self.device);
        device.enabled(true).map_err(tun_error)?;
        let offload = device.tcp_gso();
        // The tx loop drains the device without blocking and waits in poll(); writes to a TUN
        // device never block, so the rx loop is unaffected.
        device.set_nonblocking(true)?;
        let device = Arc::new(device);
        let socket =
            Arc::new(
                sock::UnderlaySocket::open(self.port, self.offload).map_err(|source| BackendError::Socket {
                    port: self.port,
                    source,
                })?,
            );
        let tx = Worker {
            device,
            socket: socket.clone(),
            routes: self.routes.clone(),
            stats: self.stats.clone(),
            modules: self.modules.clone(),
            encap: self.encap,
            device_name: self.device.clone(),
            mtu: self.mtu,
        };
        let rx = tx.clone();
        std::thread::Builder::new()
            .name("weft-udp-tx".into())
            .spawn(move || tx.run_tx())?;
        std::thread::Builder::new()
            .name("weft-udp-rx".into())
            .spawn(move || rx.run_rx())?;
        tracing::info!(
            device = %self.device,
            encap = ?self.encap,
            mtu = self.mtu,
            port = self.port,
            %router,
            tun_offload = offload,
            udp_gro = socket.gro(),
            udp_gso = socket.gso(),
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

/// What one forwarding thread shares with the rest of the backend; its buffers are its own.
#[derive(Clone)]
struct Worker {
    device: Arc<SyncDevice>,
    socket: Arc<sock::UnderlaySocket>,
    routes: SharedRoutes,
    stats: Arc<DataplaneStats>,
    modules: Arc<Pipeline>,
    encap: Encap,
    device_name: String,
    mtu: u32,
}

impl Worker {
    /// The TUN -> underlay loop.
    fn run_tx(self) {
        let mut chain = WorkerChain::new(self.modules.clone());
        let mut read = vec![0u8; MAX_READ];
        let mut segs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE).map(|_| vec![0u8; SEGMENT_ROOM]).collect();
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut batch = batch::GsoBatch::new();
        // Reads drain the device without blocking until it is empty (or a burst is read), so
        // small packets that arrive together leave together in one GSO send per peer; only an
        // empty device costs a wait in poll().
        let mut drained = 0usize;
        loop {
            if drained >= DRAIN_BURST {
                self.flush(&mut batch);
                drained = 0;
            }
            let n = match self.device.recv_multiple(&mut read, &mut segs, &mut sizes, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.flush(&mut batch);
                    drained = 0;
                    if let Err(e) = wait_readable(self.device.as_raw_fd()) {
                        self.stats.fail(format!("TUN device {} failed: {e}", self.device_name));
                        return;
                    }
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Not an OS error: `tun-rs` refused one malformed offload read, the device is fine.
                Err(e) if e.raw_os_error().is_none() => {
                    self.stats.dropped(DropReason::Malformed);
                    continue;
                }
                Err(e) => {
                    self.stats.fail(format!("TUN device {} failed: {e}", self.device_name));
                    return;
                }
            };
            drained += 1;
            let routes = self.routes.load();
            chain.refresh();
            let now = chain.now_ms();
            for (seg, &size) in segs.iter_mut().zip(&sizes).take(n) {
                let verdict = chain.decide(Direction::Egress, &seg[..size], now);
                if verdict.drop {
                    self.stats.dropped(DropReason::Policy);
                    continue;
                }
                match codec::outbound(&routes, &mut seg[..size]) {
                    Outbound::Send { peer, len } => {
                        let peer = verdict.via.unwrap_or(peer);
                        let header = match self.encap {
                            Encap::Raw => None,
                            Encap::Vxlan { vni, mac, .. } => match routes.vtep(peer) {
                                Some(dst) => Some(wire::header(vni, dst, mac)),
                                None => {
                                    self.stats.dropped(DropReason::NoRoute);
                                    continue;
                                }
                            },
                        };
                        let prefix: &[u8] = header.as_ref().map_or(&[], |h| &h[..]);
                        if !batch.accepts(peer, prefix.len() + len) {
                            self.flush(&mut batch);
                        }
                        batch.push_parts(peer, prefix, &seg[..len]);
                    }
                    Outbound::Reply(icmp, reason) => {
                        self.stats.dropped(reason);
                        if self.write_back(&icmp) {
                            self.stats.icmp_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Outbound::Drop(reason) => self.stats.dropped(reason),
                }
            }
            chain.flush_stats();
        }
    }

    fn flush(&self, batch: &mut batch::GsoBatch) {
        if let Some((peer, segment, count, bytes)) = batch.parts() {
            match self.socket.send_run(peer, segment, count, bytes) {
                Ok(()) => {
                    if let Some(c) = self.routes.load().counters(peer) {
                        c.tx_packets
                            .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
                        c.tx_bytes
                            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.stats
                        .tx_packets
                        .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
                    self.stats
                        .tx_bytes
                        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, %peer, "send failed");
                    self.stats.dropped(DropReason::IoError);
                }
            }
        }
        batch.clear();
    }

    /// Writes one locally made packet (an ICMP error) into the device.
    fn write_back(&self, pkt: &[u8]) -> bool {
        let mut one = [{
            let mut b = vec![0u8; VIRTIO_NET_HDR_LEN];
            b.extend_from_slice(pkt);
            b
        }];
        self.device
            .send_multiple(&mut GROTable::default(), &mut one, VIRTIO_NET_HDR_LEN)
            .is_ok()
    }
}

/// Turns IPv6 off on `device` (the overlay carries IPv4 only for now). Where `/proc/sys` is
/// read-only (an unprivileged container) the kernel's few IPv6 packets are dropped and counted
/// as `ipv6_not_enabled` instead.
fn disable_ipv6(device: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{device}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1\n") {
        tracing::debug!(%path, error = %e, "cannot turn IPv6 off on the device; its IPv6 packets will be dropped");
    }
}

/// Most reads from the device before queued datagrams are sent regardless, bounding latency.
const DRAIN_BURST: usize = 64;

/// Blocks until `fd` is readable.
fn wait_readable(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, count 1, for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r >= 0 {
            if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(std::io::Error::other("the device reported an error (was it deleted?)"));
            }
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Worker {
    /// The underlay -> TUN loop.
    fn run_rx(self) {
        let mut chain = WorkerChain::new(self.modules.clone());
        let mut read = vec![0u8; 65_536];
        // Each outgoing buffer keeps virtio-header room in front, as `send_multiple` wants.
        let mut out: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
            .map(|_| Vec::with_capacity(SEGMENT_ROOM))
            .collect();
        let mut gro = GROTable::default();
        let mut failures = Failures::default();
        // Room to segment a kernel peer's VXLAN super-frame and lay its segments out again as
        // a run of ordinary frames.
        let mut split: Vec<Vec<u8>> = Vec::new();
        let mut split_sizes: Vec<usize> = Vec::new();
        let mut resplit: Vec<u8> = Vec::new();
        if let Encap::Vxlan { .. } = self.encap {
            split = (0..MAX_SPLIT).map(|_| vec![0u8; SEGMENT_ROOM.min(16 << 10)]).collect();
            split_sizes = vec![0; MAX_SPLIT];
        }
        loop {
            let (n, from, segment) = match self.socket.recv(&mut read) {
                Ok(r) => {
                    failures.reset();
                    r
                }
                Err(e) => {
                    if failures.note(&e) {
                        self.stats
                            .fail(format!("receiving from the underlay socket keeps failing: {e}"));
                        return;
                    }
                    continue;
                }
            };
            if n == 0 {
                // An empty datagram carries no packet at all.
                self.stats.dropped(DropReason::Malformed);
                continue;
            }
            let routes = self.routes.load();
            chain.refresh();
            let now = chain.now_ms();
            let relay = chain.relaying();
            let mut k = 0;
            let (mut delivered, mut delivered_bytes) = (0u64, 0u64);
            let mut frames = (&mut read[..n], segment);
            if let Encap::Vxlan { vni, mac, .. } = self.encap {
                if let Some(f) = wire::super_frame(frames.0, segment, vni, mac, self.mtu as usize) {
                    match split_super_frame(frames.0, f, &mut split, &mut split_sizes, &mut resplit) {
                        Some(seg) => frames = (&mut resplit[..], seg),
                        None => {
                            self.stats.dropped(DropReason::Malformed);
                            continue;
                        }
                    }
                }
            }
            for dgram in frames.0.chunks_mut(frames.1.max(1)) {
                let dgram = match self.encap {
                    Encap::Raw => dgram,
                    Encap::Vxlan { vni, mac, .. } => match wire::open(dgram, vni, mac) {
                        Ok(()) => {
                            let inner = &mut dgram[wire::HEADER_LEN..];
                            crate::packet::complete_partial_checksum(inner);
                            inner
                        }
                        Err(_) => {
                            self.stats.dropped(DropReason::ForeignFrame);
                            continue;
                        }
                    },
                };
                match codec::inbound(&routes, *from.ip(), dgram, relay) {
                    Inbound::Deliver { len } => {
                        if chain.decide(Direction::Ingress, &dgram[..len], now).drop {
                            self.stats.dropped(DropReason::Policy);
                            continue;
                        }
                        if k == out.len() {
                            self.write(&mut gro, &mut out[..k]);
                            k = 0;
                        }
                        let b = &mut out[k];
                        b.clear();
                        b.resize(VIRTIO_NET_HDR_LEN, 0);
                        b.extend_from_slice(&dgram[..len]);
                        k += 1;
                        self.stats.received(len);
                        delivered += 1;
                        delivered_bytes += len as u64;
                    }
                    Inbound::Drop(reason) => self.stats.dropped(reason),
                }
            }
            if k > 0 {
                self.write(&mut gro, &mut out[..k]);
            }
            if let Some(c) = routes.counters(*from.ip()).filter(|_| delivered > 0) {
                c.rx_packets.fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
                c.rx_bytes
                    .fetch_add(delivered_bytes, std::sync::atomic::Ordering::Relaxed);
            }
            chain.flush_stats();
        }
    }

    fn write(&self, gro: &mut GROTable, bufs: &mut [Vec<u8>]) {
        if let Err(e) = self.device.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
            tracing::debug!(error = %e, "writing to the TUN device failed");
            self.stats.dropped(DropReason::IoError);
        }
    }
}

/// Most segments one VXLAN super-frame is cut into (64 KiB at the smallest sane MSS).
const MAX_SPLIT: usize = 128;

/// Cuts the inner super-packet of `frame` into segments (checksums completed) and lays them
/// out in `out` as ordinary VXLAN frames, each behind a copy of `frame`'s headers; returns the
/// frame size every one but the last has, or None when the packet does not segment.
fn split_super_frame(
    frame: &mut [u8],
    f: wire::SuperFrame,
    bufs: &mut [Vec<u8>],
    sizes: &mut [usize],
    out: &mut Vec<u8>,
) -> Option<usize> {
    let (head, inner) = frame.split_at_mut(wire::HEADER_LEN);
    let hdr = tun_rs::VirtioNetHdr {
        flags: 1, // NEEDS_CSUM: the sender left the checksum partial
        gso_type: if f.protocol == 6 {
            tun_rs::VIRTIO_NET_HDR_GSO_TCPV4
        } else {
            tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4
        },
        hdr_len: u16::try_from(f.ip_header + f.l4_header).ok()?,
        gso_size: u16::try_from(f.mss).ok()?,
        csum_start: u16::try_from(f.ip_header).ok()?,
        csum_offset: if f.protocol == 6 { 16 } else { 6 },
    };
    let count = tun_rs::gso_split(inner, hdr, bufs, sizes, 0, false).ok()?;
    out.clear();
    let mut stride = None;
    for (b, &size) in bufs.iter().zip(sizes.iter()).take(count) {
        out.extend_from_slice(head);
        out.extend_from_slice(&b[..size]);
        stride.get_or_insert(wire::HEADER_LEN + size);
    }
    stride
}

/// Tells a passing error (a full buffer, an ICMP error reported on the socket) from a dead
/// descriptor: only a long unbroken run of errors stops a loop, so it never spins forever.
#[derive(Default)]
struct Failures {
    run: u32,
}

impl Failures {
    const LIMIT: u32 = 10_000;

    fn reset(&mut self) {
        self.run = 0;
    }

    /// Counts one error; true when the loop should give up.
    fn note(&mut self, e: &std::io::Error) -> bool {
        if matches!(e.raw_os_error(), Some(libc::EBADF | libc::EBADFD | libc::ENOTSOCK)) {
            return true;
        }
        self.run += 1;
        if self.run == 1 {
            tracing::warn!(error = %e, "underlay socket error");
        }
        self.run >= Self::LIMIT
    }
}
