//! Data path counters, lock-free, shared between the I/O threads and the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Why the data path dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Not a well-formed IPv4 packet.
    Malformed = 0,
    /// A datagram from an address that holds no lease.
    UnknownPeer = 1,
    /// A datagram whose inner source is outside the sender's subnets.
    SpoofedSource = 2,
    /// No lease covers the destination.
    NoRoute = 3,
    /// TTL ran out.
    TtlExpired = 4,
    /// A datagram whose inner destination is outside the cluster network.
    OutsideNetwork = 5,
    /// A send or write failed (socket buffer full, device gone).
    IoError = 6,
    /// A Wasm policy module (or its failure policy) dropped the flow.
    Policy = 7,
    /// A datagram on the VXLAN port not for this node (another VNI, another MAC, not IPv4).
    ForeignFrame = 8,
    /// An IPv6 packet: the overlay carries IPv4 only for now. The kernel sends a few into the
    /// node's own device (router solicitations, MLD reports) if IPv6 is left on there; those
    /// are not malformed, so they have their own reason.
    Ipv6NotEnabled = 9,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 10] = [
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::SpoofedSource,
        DropReason::NoRoute,
        DropReason::TtlExpired,
        DropReason::OutsideNetwork,
        DropReason::IoError,
        DropReason::Policy,
        DropReason::ForeignFrame,
        DropReason::Ipv6NotEnabled,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NoRoute => "no_route",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::OutsideNetwork => "outside_network",
            DropReason::IoError => "io_error",
            DropReason::Policy => "policy",
            DropReason::ForeignFrame => "foreign_frame",
            DropReason::Ipv6NotEnabled => "ipv6_not_enabled",
        }
    }
}

/// Packet and byte counters of one backend.
#[derive(Debug, Default)]
pub struct DataplaneStats {
    /// Packets sent to peers.
    pub tx_packets: AtomicU64,
    /// Bytes sent to peers (inner packet bytes).
    pub tx_bytes: AtomicU64,
    /// Packets received from peers and delivered.
    pub rx_packets: AtomicU64,
    /// Bytes received from peers and delivered.
    pub rx_bytes: AtomicU64,
    /// ICMP errors generated.
    pub icmp_sent: AtomicU64,
    /// Packets each queue of a userspace data path sent and delivered (queue index < 8).
    pub queue_tx: [AtomicU64; 8],
    /// See `queue_tx`.
    pub queue_rx: [AtomicU64; 8],
    /// Turns in which the receiving thread sent what the device held, its sending thread
    /// asleep (a wake-up saved on the way out).
    pub helped_tx: AtomicU64,
    /// Turns in which the sending thread delivered what the socket held, its receiving thread
    /// asleep (a wake-up saved on the way in).
    pub helped_rx: AtomicU64,
    /// Times a queue thread parked while light traffic let its partner carry both directions.
    pub parks: AtomicU64,
    /// Times a heavy turn woke a parked thread.
    pub unparks: AtomicU64,
    /// TCP segments from peers that went into the device merged into super-packets.
    pub coalesced_segments: AtomicU64,
    /// The super-packets they made (one write each).
    pub coalesced_writes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    failure: OnceLock<String>,
}

impl DataplaneStats {
    /// Counts one dropped packet.
    #[inline]
    pub fn dropped(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Dropped packets for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    /// Records that the data path stopped for good (the first reason wins).
    pub fn fail(&self, why: String) {
        tracing::error!(reason = %why, "data path stopped");
        let _ = self.failure.set(why);
    }

    /// Why the data path stopped, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Counts a packet sent to a peer.
    #[inline]
    pub fn sent(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a run of packets delivered from a peer at once.
    pub fn received_run(&self, packets: u64, bytes: u64) {
        self.rx_packets.fetch_add(packets, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}
