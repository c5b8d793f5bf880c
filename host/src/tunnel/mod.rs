//! The userspace data path's I/O shell: a TUN device and UDP sockets, and the threads that move
//! bytes between them. Everything that decides (parsing, routes, the source check, TTLs,
//! ICMP errors, verdicts, framing) is pure code it calls: [`crate::packet::forward`], the Wasm
//! chain, and a [`Framing`] codec. The loops are generic over the framing, so flannel's `udp`
//! framing and VXLAN share them and a new framing is a new codec.
//!
//! Each queue has two threads, device -> underlay and underlay -> device: a TCP stream's ACKs
//! then never wait behind its data (writing into the device runs the receiving stack in the
//! writer's context, so one thread for both directions cut a stream's throughput by two thirds).
//! The device is multi-queue (`IFF_MULTI_QUEUE`): the kernel keeps each flow on one queue; each
//! queue has its own receiving socket in one `SO_REUSEPORT` group and (queue > 0) its own
//! sending port ([`sock`]), so one flow stays in order on one thread pair end to end while
//! several flows use every core. A thread that moved packets keeps polling for a moment before
//! it sleeps ([`spin`]), so back-to-back traffic does not pay a wake-up per packet.
//!
//! Each direction's state sits behind its own lock, and a thread that is awake also moves the
//! other direction's packets once that direction's thread has slept for a while (sparse
//! traffic; in a busy exchange helping would cost more than it saves). An idle round trip is then
//! carried by whichever thread is awake: writing a request into the device runs the pod's
//! stack at once, so its answer is already queued on the device when the write returns, and
//! the same thread sends it on instead of waking its partner (a wake-up of an idle vCPU costs
//! tens of microseconds on a VM); the thread that sent a request catches the answer on the
//! socket while it spins. Under load both threads are awake and each keeps to its own side.
//! While traffic is light (no turn moves more than one packet a side) one thread of a queue
//! parks and its partner moves both directions and watches both descriptors ([`watch`]): two
//! spinning threads per queue and node only took turns on the cores the traffic's own
//! processes needed.
//!
//! The loops work in batches: with TUN offloads a read from the device is a TCP super-packet
//! that `tun-rs` splits into segments, which leave as one UDP GSO message per run for a peer,
//! every run of a burst in one `sendmmsg` ([`batch`]); UDP GRO hands over runs of datagrams,
//! several runs per `recvmmsg`. Their TCP segments are merged back into
//! super-packets where they were received ([`crate::packet::gro`]) and written with one
//! `writev` each; other packets go through `tun-rs`'s coalescer (UDP, where the kernel takes
//! UDP segmentation from a TUN device).

pub mod batch;
pub mod framing;
pub mod sock;
pub mod spin;
pub mod watch;

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use self::framing::Framing;
use self::sock::UnderlaySocket;
use self::watch::{Role, Watch};
use crate::packet::forward::{self, Inbound, Outbound};
use crate::packet::gro::{self, Gro, Span};
use crate::packet::route::{RouteTable, SharedRoutes};
use crate::stats::{DataplaneStats, DropReason};
use crate::wasm::{Direction, Pipeline, WorkerChain};

/// What the tunnel is made of.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    /// The TUN device's name.
    pub device: String,
    /// The address the device holds (this node's subnet `.0`).
    pub router: Ipv4Addr,
    /// The prefix length it holds it with (the cluster network's).
    pub prefix: u8,
    /// The device's MTU.
    pub mtu: u32,
    /// The UDP port peers send to.
    pub port: u16,
    /// TUN offloads and UDP GSO/GRO.
    pub offload: bool,
    /// Queues (threads), at least 1.
    pub queues: usize,
    /// The longest spin after traffic before a thread sleeps (zero: never spin).
    pub spin: Duration,
}

/// What the tunnel got from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// Queues running.
    pub queues: usize,
    /// Whether the device hands over super-packets.
    pub tun_offload: bool,
    /// Whether the sockets receive coalesced runs.
    pub gro: bool,
    /// Whether they send them.
    pub gso: bool,
}

/// Why the tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("missing /dev/net/tun: load the tun module (modprobe tun) or give the container the device")]
    NoTun,
    #[error("cannot create TUN device {name}: {source}")]
    Tun { name: String, source: std::io::Error },
    #[error("cannot open UDP socket on port {port}: {source}")]
    Socket { port: u16, source: std::io::Error },
    #[error("cannot start a forwarding thread: {0}")]
    Thread(std::io::Error),
}

/// What every queue shares.
struct Ctx<F> {
    framing: F,
    routes: SharedRoutes,
    stats: Arc<DataplaneStats>,
    modules: Arc<Pipeline>,
    device: String,
    mtu: usize,
    spin: Duration,
    /// Whether the device takes a virtio header (and so super-packets) in front of every write.
    vnet: bool,
}

// A flush's runs fit one `sendmmsg`.
const _: () = assert!(batch::MAX_RUNS <= sock::MAX_MESSAGES);
// The coalescer writes the header the device was opened with.
const _: () = assert!(gro::VNET_HDR_LEN == VIRTIO_NET_HDR_LEN);

/// Most reads from the device before queued datagrams are sent regardless, bounding latency.
const DRAIN_BURST: usize = 64;
/// Most messages received in one turn before the device gets its turn again.
const RECV_BURST: usize = 32;
/// Most messages one `recvmmsg` takes (buffers of 64 KiB each, for GRO runs).
const RECV_MESSAGES: usize = 8;
/// Most segments one VXLAN super-frame is cut into (64 KiB at the smallest sane MSS).
const MAX_SPLIT: usize = 128;

/// Opens the device and sockets and starts one thread per queue.
pub fn start<F: Framing>(
    spec: &TunnelSpec,
    framing: F,
    routes: SharedRoutes,
    stats: Arc<DataplaneStats>,
    modules: Arc<Pipeline>,
) -> Result<Started, TunnelError> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(TunnelError::NoTun);
    }
    let queues = spec.queues.clamp(1, 64);
    let (first, tun_offload) = device(spec, queues)?;
    let tun_error = |source| TunnelError::Tun {
        name: spec.device.clone(),
        source,
    };
    let mut devices = vec![first];
    for _ in 1..queues {
        devices.push(devices[0].try_clone().map_err(tun_error)?);
    }
    let (rx, tx) = sockets(spec, queues)?;
    let started = Started {
        queues,
        tun_offload,
        gro: rx[0].gro(),
        gso: tx[0].gso(),
    };
    let ctx = Arc::new(Ctx {
        framing,
        routes,
        stats,
        modules,
        device: spec.device.clone(),
        mtu: spec.mtu as usize,
        spin: spec.spin,
        vnet: tun_offload,
    });
    for (q, ((dev, rx), tx)) in devices.into_iter().zip(rx).zip(tx).enumerate() {
        dev.set_nonblocking(true).map_err(tun_error)?;
        let header = ctx.framing.header_len();
        let queue = Arc::new(Queue {
            q,
            tun: dev,
            rx,
            tx,
            out: Side::new(TxSide {
                chain: WorkerChain::new(ctx.modules.clone()),
                b: TxBuffers::new(ctx.mtu, header),
            }),
            inn: Side::new(RxSide {
                chain: WorkerChain::new(ctx.modules.clone()),
                b: RxBuffers::new(ctx.mtu, header > 0),
                failures: Failures::default(),
            }),
            watch: Watch::new(),
            ctx: ctx.clone(),
        });
        let other = queue.clone();
        std::thread::Builder::new()
            .name(format!("weft-q{q}-tx"))
            .spawn(move || queue.run(Role::Tx))
            .map_err(TunnelError::Thread)?;
        std::thread::Builder::new()
            .name(format!("weft-q{q}-rx"))
            .spawn(move || other.run(Role::Rx))
            .map_err(TunnelError::Thread)?;
    }
    Ok(started)
}

/// Creates the device (down, IPv6 off, then up); returns it and whether offloads took.
fn device(spec: &TunnelSpec, queues: usize) -> Result<(SyncDevice, bool), TunnelError> {
    // The device holds the subnet's .0 with the *network's* prefix, so the kernel sends all
    // cluster traffic here, while the node's bridge (a longer prefix) keeps local traffic.
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(&spec.device)
            .ipv4(spec.router, spec.prefix, None)
            .mtu(u16::try_from(spec.mtu).unwrap_or(u16::MAX))
            .offload(offload)
            .multi_queue(queues > 1)
            // Down until IPv6 is off on it, so the kernel never sends it router
            // solicitations or MLD reports the IPv4-only overlay would have to drop.
            .enable(false)
            .build_sync()
    };
    let tun_error = |source| TunnelError::Tun {
        name: spec.device.clone(),
        source,
    };
    let dev = match build(spec.offload) {
        Ok(d) => d,
        Err(e) if spec.offload => {
            tracing::info!(error = %e, "TUN offloads unavailable; packets move one by one");
            build(false).map_err(tun_error)?
        }
        Err(e) => return Err(tun_error(e)),
    };
    disable_ipv6(&spec.device);
    dev.enabled(true).map_err(tun_error)?;
    let offload = dev.tcp_gso();
    Ok((dev, offload))
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

type Sockets = (Vec<Arc<UnderlaySocket>>, Vec<Arc<UnderlaySocket>>);

/// Each queue's receiving and sending socket.
fn sockets(spec: &TunnelSpec, queues: usize) -> Result<Sockets, TunnelError> {
    let err = |port| move |source| TunnelError::Socket { port, source };
    if queues == 1 {
        // One queue is flannel's shape: one socket on the port, sending from it too.
        let s = Arc::new(UnderlaySocket::open(spec.port, spec.offload).map_err(err(spec.port))?);
        return Ok((vec![s.clone()], vec![s]));
    }
    let mut rx = Vec::with_capacity(queues);
    for _ in 0..queues {
        rx.push(Arc::new(
            UnderlaySocket::open_member(spec.port, spec.offload).map_err(err(spec.port))?,
        ));
    }
    if let Err(e) = sock::steer(&rx[0], spec.port, queues as u16) {
        tracing::warn!(error = %e, "cannot steer datagrams to queues by source port; the kernel spreads them by hash");
    }
    let mut tx = vec![rx[0].clone()];
    for q in 1..queues {
        let s = UnderlaySocket::open_sender(spec.port, q as u16, spec.offload).map_err(err(spec.port))?;
        tx.push(Arc::new(s));
    }
    Ok((rx, tx))
}

/// One queue: its device queue, its sockets, and the loop that moves both directions.
struct Queue<F> {
    q: usize,
    tun: SyncDevice,
    rx: Arc<UnderlaySocket>,
    tx: Arc<UnderlaySocket>,
    /// Device -> underlay.
    out: Side<TxSide>,
    /// Underlay -> device.
    inn: Side<RxSide>,
    /// Which thread watches which descriptor.
    watch: Watch,
    ctx: Arc<Ctx<F>>,
}

/// One direction's state. Whoever holds the lock moves that direction's packets, so one
/// flow's packets still go out in order.
struct Side<S> {
    state: Mutex<S>,
}

impl<S> Side<S> {
    fn new(state: S) -> Self {
        Side {
            state: Mutex::new(state),
        }
    }

    /// The state, for its own thread; `None` while the other thread is helping out. Never
    /// waiting: a thread blocked on the lock would cost the helper a futex wake-up (a system
    /// call and a cross-CPU interrupt) when it lets go, on every exchange of a busy ping-pong.
    fn own(&self) -> Option<MutexGuard<'_, S>> {
        match self.state.try_lock() {
            Ok(g) => Some(g),
            // A poisoned lock means a panic elsewhere; the buffers themselves are still usable.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// One turn by the side's own thread: `work` on its state, or a yield while the other
    /// thread is helping out (it will be done at once).
    fn turn(&self, work: impl FnOnce(&mut S) -> Result<usize, Fatal>) -> Result<usize, Fatal> {
        match self.own() {
            Some(mut s) => work(&mut s),
            None => {
                std::thread::yield_now();
                Ok(0)
            }
        }
    }

    /// One turn by the other thread, if the [`Watch`] lets it help (`may`) and nobody holds
    /// the state; a turn that moved packets counts in `helped`.
    fn help_with(
        &self,
        may: bool,
        helped: &AtomicU64,
        work: impl FnOnce(&mut S) -> Result<usize, Fatal>,
    ) -> Result<usize, Fatal> {
        let Some(mut s) = may.then(|| self.own()).flatten() else {
            return Ok(0);
        };
        let n = work(&mut s)?;
        if n > 0 {
            helped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// What the device -> underlay direction works with.
struct TxSide {
    chain: WorkerChain,
    b: TxBuffers,
}

/// What the underlay -> device direction works with.
struct RxSide {
    chain: WorkerChain,
    b: RxBuffers,
    failures: Failures,
}

/// The sending thread's buffers, allocated once. A read from the device is split into
/// `segs` (one packet per slot, after room for the framing header); the batch names the slots
/// it will send, so slots are reused only once the batch is empty.
struct TxBuffers {
    read: Vec<u8>,
    segs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Slots in use by packets read since the batch was last empty.
    used: usize,
    header: usize,
    batch: batch::Runs,
}

/// Slots: one read's segments (at most `IDEAL_BATCH_SIZE`) beside a full batch.
const TX_SLOTS: usize = IDEAL_BATCH_SIZE + batch::MAX_SEGMENTS;

impl TxBuffers {
    fn new(mtu: usize, header: usize) -> Self {
        // A segment is at most one MTU, after the framing header.
        let segment = header + (mtu + 64).max(2048);
        TxBuffers {
            read: vec![0u8; VIRTIO_NET_HDR_LEN + 65_536],
            segs: (0..TX_SLOTS).map(|_| vec![0u8; segment]).collect(),
            sizes: vec![0; TX_SLOTS],
            used: 0,
            header,
            batch: batch::Runs::new(),
        }
    }

    /// The slots the next read may split into: all of them once the batch is empty, else
    /// those after the batch's, with room for a whole read.
    fn room(&mut self) -> Option<usize> {
        if self.batch.is_empty() {
            self.used = 0;
        }
        (TX_SLOTS - self.used >= IDEAL_BATCH_SIZE).then_some(self.used)
    }
}

/// The receiving thread's buffers, allocated once.
struct RxBuffers {
    /// One buffer per message of a `recvmmsg` (each may hold a GRO run of 64 KiB).
    recv: Vec<Vec<u8>>,
    /// What each message holds: bytes, sender, segment size.
    got: Vec<(usize, SocketAddrV4, usize)>,
    out: Vec<Vec<u8>>,
    gro: GROTable,
    split: Vec<Vec<u8>>,
    split_sizes: Vec<usize>,
    resplit: Vec<u8>,
    /// This run's TCP segments, as super-packets to be.
    merge: Gro,
}

impl RxBuffers {
    fn new(mtu: usize, splits: bool) -> Self {
        let segment = (mtu + 64).max(2048);
        let (split, split_sizes) = if splits {
            ((0..MAX_SPLIT).map(|_| vec![0u8; segment]).collect(), vec![0; MAX_SPLIT])
        } else {
            (Vec::new(), Vec::new())
        };
        RxBuffers {
            recv: (0..RECV_MESSAGES).map(|_| vec![0u8; 65_536]).collect(),
            got: vec![(0, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), 0); RECV_MESSAGES],
            // Coalescing for the device appends a run's segments to its first buffer: room for
            // a whole super-packet up front, so it never grows on the data path.
            out: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 65_536))
                .collect(),
            gro: GROTable::default(),
            split,
            split_sizes,
            resplit: Vec::new(),
            merge: Gro::new(),
        }
    }
}

/// Why a loop stopped for good.
type Fatal = String;

impl<F: Framing> Queue<F> {
    /// A queue thread: its own direction, and the other one while that direction's thread
    /// sleeps or is parked (the device -> underlay thread delivers the answer to what it just
    /// sent while it spins; the underlay -> device thread sends the answer to what it just
    /// wrote into the device, which ran the pod's stack at once).
    fn run(&self, role: Role) {
        let c = &self.ctx;
        self.watch.register(role);
        let mut spin = spin::Spin::new(c.spin);
        loop {
            let turn = match role {
                Role::Tx => self.tx_turn(),
                Role::Rx => self.rx_turn(),
            };
            let done = turn.and_then(|(own, other)| self.idle(role, &mut spin, own, other));
            if let Err(why) = done {
                return c.stats.fail(why);
            }
        }
    }

    /// The sending thread's turn: packets moved on its side and on the receiving side.
    fn tx_turn(&self) -> Result<(usize, usize), Fatal> {
        let own = self.out.turn(|s| self.send(s))?;
        let may = self.watch.may_help(Role::Rx);
        let other = self
            .inn
            .help_with(may, &self.ctx.stats.helped_rx, |s| self.deliver(s))?;
        Ok((own, other))
    }

    /// The receiving thread's turn: packets moved on its side and on the sending side.
    fn rx_turn(&self) -> Result<(usize, usize), Fatal> {
        let own = self.inn.turn(|s| self.deliver(s))?;
        let may = self.watch.may_help(Role::Tx);
        let other = self.out.help_with(may, &self.ctx.stats.helped_tx, |s| self.send(s))?;
        Ok((own, other))
    }

    /// Device -> underlay with the sending side's state, by whichever thread holds it.
    fn send(&self, s: &mut TxSide) -> Result<usize, Fatal> {
        self.drain_device(&mut s.chain, &mut s.b)
    }

    /// Underlay -> device with the receiving side's state, by whichever thread holds it.
    fn deliver(&self, s: &mut RxSide) -> Result<usize, Fatal> {
        self.drain_underlay(&mut s.chain, &mut s.b, &mut s.failures)
    }

    /// After a turn that moved `own` and `other` packets: go on at once, spin a little
    /// longer, park while the partner carries light traffic alone, or sleep until a descriptor
    /// is readable. An error when one is broken.
    #[inline]
    fn idle(&self, role: Role, spin: &mut spin::Spin, own: usize, other: usize) -> Result<(), Fatal> {
        let now = Instant::now();
        let us = crate::clock::us_at(now);
        self.watch.turned(own, other, us, &self.ctx.stats.unparks);
        if own + other > 0 {
            spin.traffic(now);
            return Ok(());
        }
        if spin.keep_spinning(now) {
            if self.watch.light(us) && self.watch.park(role, &self.ctx.stats.parks) {
                // Woken by a heavy turn: traffic is here.
                spin.traffic(Instant::now());
                return Ok(());
            }
            // Polite: any other runnable thread on this core runs first, so spinning only uses
            // a core nobody else wants.
            std::thread::yield_now();
            return Ok(());
        }
        self.sleep(role)
    }

    /// Sleeps until the thread's descriptor, or its parked partner's too, is readable.
    fn sleep(&self, role: Role) -> Result<(), Fatal> {
        let (tun, sock) = (self.tun.as_raw_fd(), self.rx.fd());
        let (mine, theirs) = match role {
            Role::Tx => (tun, sock),
            Role::Rx => (sock, tun),
        };
        let both = self.watch.sleeping(role, true);
        let woke = wait_readable(mine, both.then_some(theirs));
        self.watch.sleeping(role, false);
        woke.map_err(|fd| match fd == tun {
            true => format!("TUN device {} failed (was it deleted?)", self.ctx.device),
            false => "the underlay socket failed".into(),
        })
    }

    /// Reads what the device holds (up to a burst) and sends it; returns how many packets
    /// (a super-packet counts its segments).
    fn drain_device(&self, chain: &mut WorkerChain, b: &mut TxBuffers) -> Result<usize, Fatal> {
        let (mut reads, mut packets) = (0, 0);
        while reads < DRAIN_BURST {
            let first = match b.room() {
                Some(first) => first,
                None => {
                    self.flush(&mut b.batch, &b.segs);
                    0
                }
            };
            let got = self
                .tun
                .recv_multiple(&mut b.read, &mut b.segs[first..], &mut b.sizes[first..], b.header);
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Not an OS error: `tun-rs` refused one malformed offload read, the device is fine.
                Err(e) if e.raw_os_error().is_none() => {
                    self.ctx.stats.dropped(DropReason::Malformed);
                    continue;
                }
                Err(e) => return Err(format!("TUN device {} failed: {e}", self.ctx.device)),
            };
            reads += 1;
            packets += n.max(1);
            b.used = first + n;
            self.send_read(chain, b, first..first + n);
        }
        self.flush(&mut b.batch, &b.segs);
        Ok(packets)
    }

    /// Decides, routes and frames the packets of one read (in `slots`), batching them.
    fn send_read(&self, chain: &mut WorkerChain, b: &mut TxBuffers, slots: std::ops::Range<usize>) {
        let routes = self.ctx.routes.load();
        chain.refresh();
        let now = chain.now_ms();
        for slot in slots {
            let framed = b.header + b.sizes[slot];
            let Some((peer, len)) = self.egress(chain, &routes, &mut b.segs[slot][..framed], b.header, now) else {
                continue;
            };
            if !b.batch.push(peer, slot, len) {
                self.flush(&mut b.batch, &b.segs);
                b.batch.push(peer, slot, len);
            }
        }
        chain.flush_stats();
    }

    /// One packet from a local pod, after `header` bytes of room in `slot`: decided, routed
    /// and framed in place; the peer and the datagram's length, if it leaves.
    #[inline]
    fn egress(
        &self,
        chain: &mut WorkerChain,
        routes: &RouteTable,
        slot: &mut [u8],
        header: usize,
        now: u64,
    ) -> Option<(Ipv4Addr, usize)> {
        let stats = &self.ctx.stats;
        let (head, seg) = slot.split_at_mut(header);
        let meta = forward::parse(seg).map_err(|reason| stats.dropped(reason)).ok()?;
        let verdict = chain.decide_parsed(Direction::Egress, &meta, seg, now);
        if verdict.drop {
            stats.dropped(DropReason::Policy);
            return None;
        }
        match forward::outbound_parsed(routes, &meta, seg) {
            Outbound::Send { peer, len } => {
                let peer = verdict.via.unwrap_or(peer);
                if let Err(reason) = self.ctx.framing.write_header(routes, peer, head) {
                    stats.dropped(reason);
                    return None;
                }
                Some((peer, header + len))
            }
            Outbound::Reply(icmp, reason) => {
                stats.dropped(reason);
                if self.write_back(&icmp) {
                    stats.icmp_sent.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Outbound::Drop(reason) => {
                stats.dropped(reason);
                None
            }
        }
    }

    /// Sends the batch (every run in one `sendmmsg`), gathering its datagrams from their
    /// slots, and empties it.
    fn flush(&self, batch: &mut batch::Runs, segs: &[Vec<u8>]) {
        if batch.is_empty() {
            return;
        }
        let mut slices = [IoSlice::new(&[]); TX_SLOTS];
        let mut specs = [sock::RunSpec::NONE; batch::MAX_RUNS];
        let (mut n, mut k) = (0, 0);
        for (run, spec) in batch.runs().iter().filter_map(|r| r.parts()).zip(specs.iter_mut()) {
            let (peer, segment, _, parts) = run;
            let first = n;
            for p in parts.iter().take(TX_SLOTS - n) {
                slices[n] = IoSlice::new(&segs[p.slot][..p.len]);
                n += 1;
            }
            *spec = sock::RunSpec {
                peer,
                segment,
                first,
                end: n,
            };
            k += 1;
        }
        let header = self.ctx.framing.header_len();
        self.tx.send_runs(&slices[..n], &specs[..k], |i, sent| {
            let s = &specs[i];
            match sent {
                // Counted as inner bytes, without the framing headers.
                Ok(()) => {
                    let count = s.end - s.first;
                    let bytes: usize = slices[s.first..s.end]
                        .iter()
                        .map(|d| d.len().saturating_sub(header))
                        .sum();
                    self.count_sent(s.peer, count as u64, bytes as u64);
                }
                Err(e) => {
                    tracing::debug!(error = %e, peer = %s.peer, "send failed");
                    (s.first..s.end).for_each(|_| self.ctx.stats.dropped(DropReason::IoError));
                }
            }
        });
        batch.clear();
    }

    fn count_sent(&self, peer: Ipv4Addr, packets: u64, bytes: u64) {
        let stats = &self.ctx.stats;
        if let Some(c) = self.ctx.routes.load().counters(peer) {
            c.tx_packets.fetch_add(packets, Ordering::Relaxed);
            c.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        stats.tx_packets.fetch_add(packets, Ordering::Relaxed);
        stats.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(c) = stats.queue_tx.get(self.q) {
            c.fetch_add(packets, Ordering::Relaxed);
        }
    }

    /// Writes one locally made packet (an ICMP error) into the device.
    fn write_back(&self, pkt: &[u8]) -> bool {
        let mut one = [{
            let mut b = vec![0u8; VIRTIO_NET_HDR_LEN];
            b.extend_from_slice(pkt);
            b
        }];
        self.tun
            .send_multiple(&mut GROTable::default(), &mut one, VIRTIO_NET_HDR_LEN)
            .is_ok()
    }

    /// Receives what the socket holds (up to a burst) and delivers it; returns how many
    /// datagrams (a coalesced run counts each).
    fn drain_underlay(
        &self,
        chain: &mut WorkerChain,
        b: &mut RxBuffers,
        failures: &mut Failures,
    ) -> Result<usize, Fatal> {
        let (mut got, mut datagrams) = (0, 0);
        while got < RECV_BURST {
            let n = match self.rx.recv_many(&mut b.recv, &mut b.got) {
                Ok(n) => {
                    failures.reset();
                    n
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if failures.note(&e) {
                        return Err(format!("receiving from the underlay socket keeps failing: {e}"));
                    }
                    continue;
                }
            };
            got += n;
            for i in 0..n {
                let (bytes, from, segment) = b.got[i];
                datagrams += bytes.div_ceil(segment.max(1)).max(1);
                self.deliver_run(chain, b, i, *from.ip(), segment);
            }
        }
        Ok(datagrams)
    }

    /// Delivers received message `msg` (`b.got[msg].0` bytes: datagrams of `segment` bytes)
    /// from `from`.
    fn deliver_run(&self, chain: &mut WorkerChain, b: &mut RxBuffers, msg: usize, from: Ipv4Addr, segment: usize) {
        let c = &self.ctx;
        let n = b.got[msg].0;
        if n == 0 {
            return c.stats.dropped(DropReason::Malformed);
        }
        let routes = c.routes.load();
        chain.refresh();
        let now = chain.now_ms();
        let relay = chain.relaying();
        let RxBuffers {
            recv,
            out,
            gro,
            split,
            split_sizes,
            resplit,
            merge,
            ..
        } = b;
        let recv = &mut recv[msg];
        let (frames, step) = match c.framing.super_frame(&recv[..n], segment, c.mtu) {
            None => (&mut recv[..n], segment.max(1)),
            Some(f) => match c.framing.split(&mut recv[..n], f, split, split_sizes, resplit) {
                Some(seg) => (&mut resplit[..], seg.max(1)),
                None => return c.stats.dropped(DropReason::Malformed),
            },
        };
        let hl = c.framing.header_len();
        let (mut k, mut delivered, mut bytes) = (0, 0u64, 0u64);
        merge.clear();
        for start in (0..frames.len()).step_by(step) {
            let end = (start + step).min(frames.len());
            let Some(len) = self.ingress(chain, &routes, from, &mut frames[start..end], relay, now) else {
                continue;
            };
            delivered += 1;
            bytes += len as u64;
            let inner = Span { start: start + hl, len };
            if c.vnet && frames[inner.start + 9] == 6 {
                merge.push(frames, inner);
                continue;
            }
            if k == out.len() {
                self.write(gro, &mut out[..k]);
                k = 0;
            }
            let o = &mut out[k];
            o.clear();
            o.resize(VIRTIO_NET_HDR_LEN, 0);
            o.extend_from_slice(&frames[inner.start..inner.start + len]);
            k += 1;
        }
        self.write_merged(merge, frames);
        if k > 0 {
            self.write(gro, &mut out[..k]);
        }
        self.count_delivered(&routes, from, delivered, bytes);
        chain.flush_stats();
    }

    fn count_delivered(&self, routes: &RouteTable, from: Ipv4Addr, packets: u64, bytes: u64) {
        if packets == 0 {
            return;
        }
        let stats = &self.ctx.stats;
        stats.received_run(packets, bytes);
        if let Some(p) = routes.counters(from) {
            p.rx_packets.fetch_add(packets, Ordering::Relaxed);
            p.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if let Some(q) = stats.queue_rx.get(self.q) {
            q.fetch_add(packets, Ordering::Relaxed);
        }
    }

    /// One datagram from a peer: its framing opened, its inner packet finished, checked and
    /// decided; the inner packet's length, if it may enter.
    #[inline]
    fn ingress(
        &self,
        chain: &mut WorkerChain,
        routes: &RouteTable,
        from: Ipv4Addr,
        dgram: &mut [u8],
        relay: bool,
        now: u64,
    ) -> Option<usize> {
        let c = &self.ctx;
        if let Err(reason) = c.framing.open(dgram) {
            c.stats.dropped(reason);
            return None;
        }
        let inner = &mut dgram[c.framing.header_len()..];
        c.framing.finish(inner);
        let meta = forward::parse(inner).map_err(|r| c.stats.dropped(r)).ok()?;
        match forward::inbound_parsed(routes, from, &meta, inner, relay) {
            Inbound::Deliver { len } => {
                if chain.decide_parsed(Direction::Ingress, &meta, &inner[..len], now).drop {
                    c.stats.dropped(DropReason::Policy);
                    return None;
                }
                Some(len)
            }
            Inbound::Drop(reason) => {
                c.stats.dropped(reason);
                None
            }
        }
    }

    /// Writes the run's TCP segments as planned: one `writev` per super-packet, from where they
    /// were received.
    fn write_merged(&self, plan: &Gro, buf: &mut [u8]) {
        let (mut segments, mut writes) = (0, 0);
        for i in 0..plan.len() {
            let vnet = plan.seal(buf, i);
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; gro::MAX_SEGMENTS + 1];
            iov[0] = libc::iovec {
                iov_base: vnet.as_ptr() as *mut libc::c_void,
                iov_len: vnet.len(),
            };
            let mut n = 1;
            for part in plan.parts(i) {
                let piece = &buf[part.start..part.start + part.len];
                iov[n] = libc::iovec {
                    iov_base: piece.as_ptr() as *mut libc::c_void,
                    iov_len: piece.len(),
                };
                n += 1;
            }
            // SAFETY: the first `n` iovecs point into `vnet` and `buf`, both alive and unchanged
            // for the call; the kernel only reads them. `n` is at most MAX_SEGMENTS + 1.
            let r = unsafe { libc::writev(self.tun.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                tracing::debug!(error = %e, "writing to the TUN device failed");
                for _ in 0..plan.count(i) {
                    self.ctx.stats.dropped(DropReason::IoError);
                }
            } else if plan.count(i) > 1 {
                segments += plan.count(i) as u64;
                writes += 1;
            }
        }
        if writes > 0 {
            let stats = &self.ctx.stats;
            stats.coalesced_segments.fetch_add(segments, Ordering::Relaxed);
            stats.coalesced_writes.fetch_add(writes, Ordering::Relaxed);
        }
    }

    fn write(&self, gro: &mut GROTable, bufs: &mut [Vec<u8>]) {
        if let Err(e) = self.tun.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN) {
            tracing::debug!(error = %e, "writing to the TUN device failed");
            self.ctx.stats.dropped(DropReason::IoError);
        }
    }
}

/// Blocks until `fd` (or `also`) has something to read; the descriptor that reported an
/// error, if one did.
fn wait_readable(fd: RawFd, also: Option<RawFd>) -> Result<(), RawFd> {
    let pfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut pfds = [pfd(fd), pfd(also.unwrap_or(-1))];
    let count = if also.is_some() { 2 } else { 1 };
    loop {
        // SAFETY: `count` (1 or 2) valid pollfds in `pfds`, alive for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), count as libc::nfds_t, -1) };
        if r >= 0 {
            let broken = pfds[..count]
                .iter()
                .find(|p| p.revents & (libc::POLLERR | libc::POLLNVAL) != 0);
            return broken.map_or(Ok(()), |p| Err(p.fd));
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(fd);
        }
    }
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
