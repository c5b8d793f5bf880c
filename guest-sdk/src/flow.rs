//! The flow a decision is about: a safe view over the host's flow record.

use core::net::Ipv4Addr;

use crate::abi::{self, flag, Record, PAYLOAD_MAX};

/// IP protocol number of TCP.
pub const TCP: u8 = 6;
/// IP protocol number of UDP.
pub const UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const ICMP: u8 = 1;

/// Which way a packet crosses this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Leaving a local pod for another node.
    Egress,
    /// Arriving from another node for a local pod.
    Ingress,
}

/// One flow, as the host describes it for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    rec: Record,
}

fn addr(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn some_addr(a: [u8; 4]) -> Option<Ipv4Addr> {
    (a != [0; 4]).then(|| addr(a))
}

impl Flow {
    /// Wraps a decoded record.
    #[inline]
    pub fn from_record(rec: Record) -> Flow {
        Flow { rec }
    }

    /// The raw record.
    pub fn record(&self) -> &Record {
        &self.rec
    }

    /// Starts a flow for tests and tools.
    pub fn builder() -> FlowBuilder {
        FlowBuilder { rec: Record::default() }
    }

    /// Egress or ingress.
    pub fn direction(&self) -> Direction {
        if self.rec.direction == abi::direction::INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }

    /// IP protocol number.
    pub fn protocol(&self) -> u8 {
        self.rec.protocol
    }

    /// True for TCP.
    pub fn is_tcp(&self) -> bool {
        self.rec.protocol == TCP
    }

    /// True for UDP.
    pub fn is_udp(&self) -> bool {
        self.rec.protocol == UDP
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        addr(self.rec.src)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        addr(self.rec.dst)
    }

    /// Source port (TCP/UDP); for ICMP, type << 8 | code.
    pub fn src_port(&self) -> u16 {
        self.rec.src_port
    }

    /// Destination port (TCP/UDP); for ICMP echo, the identifier.
    pub fn dst_port(&self) -> u16 {
        self.rec.dst_port
    }

    /// TCP flags of the packet that opened the decision.
    pub fn tcp_flags(&self) -> u8 {
        self.rec.tcp_flags
    }

    /// A TCP SYN without ACK: a connection attempt.
    pub fn is_syn(&self) -> bool {
        self.is_tcp() && self.rec.tcp_flags & 0x12 == 0x02
    }

    /// The host saw this flow before the modules last changed: it is in flight.
    pub fn is_established(&self) -> bool {
        self.rec.flags & flag::ESTABLISHED != 0
    }

    /// A non-first fragment: no ports, no payload start.
    pub fn is_fragment(&self) -> bool {
        self.rec.flags & flag::FRAGMENT != 0
    }

    /// The IP packet's length.
    pub fn packet_len(&self) -> u32 {
        self.rec.packet_len
    }

    /// Underlay address of the node leasing the source, if any lease covers it.
    pub fn src_node(&self) -> Option<Ipv4Addr> {
        some_addr(self.rec.src_node)
    }

    /// Underlay address of the node leasing the destination, if any lease covers it.
    pub fn dst_node(&self) -> Option<Ipv4Addr> {
        some_addr(self.rec.dst_node)
    }

    /// The leased subnet holding the source, as (network, prefix length).
    pub fn src_subnet(&self) -> Option<(Ipv4Addr, u8)> {
        (self.rec.src_prefix != 0).then(|| (addr(self.rec.src_subnet), self.rec.src_prefix))
    }

    /// The leased subnet holding the destination, as (network, prefix length).
    pub fn dst_subnet(&self) -> Option<(Ipv4Addr, u8)> {
        (self.rec.dst_prefix != 0).then(|| (addr(self.rec.dst_subnet), self.rec.dst_prefix))
    }

    /// Underlay address of the node deciding.
    pub fn local_node(&self) -> Ipv4Addr {
        addr(self.rec.local_node)
    }

    /// The first bytes (up to 64) of the L4 payload.
    pub fn payload(&self) -> &[u8] {
        &self.rec.payload[..usize::from(self.rec.payload_len).min(PAYLOAD_MAX)]
    }
}

/// Builds [`Flow`]s for tests and replay tools.
#[derive(Debug, Clone)]
pub struct FlowBuilder {
    rec: Record,
}

impl FlowBuilder {
    /// A TCP flow between two endpoints, marked as a SYN.
    pub fn tcp(mut self, src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Self {
        self.rec.protocol = TCP;
        self.rec.tcp_flags = 0x02;
        self.endpoints(src, src_port, dst, dst_port)
    }

    /// A UDP flow between two endpoints.
    pub fn udp(mut self, src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Self {
        self.rec.protocol = UDP;
        self.endpoints(src, src_port, dst, dst_port)
    }

    /// An ICMP echo request.
    pub fn ping(mut self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        self.rec.protocol = ICMP;
        self.endpoints(src, 8 << 8, dst, 1)
    }

    fn endpoints(mut self, src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Self {
        self.rec.src = src.octets();
        self.rec.dst = dst.octets();
        self.rec.src_port = src_port;
        self.rec.dst_port = dst_port;
        self
    }

    /// Marks the flow as arriving for a local pod.
    pub fn ingress(mut self) -> Self {
        self.rec.direction = abi::direction::INGRESS;
        self
    }

    /// Sets the TCP flags.
    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.rec.tcp_flags = flags;
        self
    }

    /// Marks the flow as in flight.
    pub fn established(mut self) -> Self {
        self.rec.flags |= flag::ESTABLISHED;
        self
    }

    /// Sets the source's leased subnet and node.
    pub fn src_lease(mut self, subnet: Ipv4Addr, prefix: u8, node: Ipv4Addr) -> Self {
        self.rec.src_subnet = subnet.octets();
        self.rec.src_prefix = prefix;
        self.rec.src_node = node.octets();
        self
    }

    /// Sets the destination's leased subnet and node.
    pub fn dst_lease(mut self, subnet: Ipv4Addr, prefix: u8, node: Ipv4Addr) -> Self {
        self.rec.dst_subnet = subnet.octets();
        self.rec.dst_prefix = prefix;
        self.rec.dst_node = node.octets();
        self
    }

    /// Sets the deciding node.
    pub fn local_node(mut self, node: Ipv4Addr) -> Self {
        self.rec.local_node = node.octets();
        self
    }

    /// Sets the payload start (truncated to 64 bytes).
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        let n = bytes.len().min(PAYLOAD_MAX);
        self.rec.payload[..n].copy_from_slice(&bytes[..n]);
        self.rec.payload_len = n as u16;
        self
    }

    /// Sets the packet length.
    pub fn packet_len(mut self, len: u32) -> Self {
        self.rec.packet_len = len;
        self
    }

    /// The flow.
    pub fn build(self) -> Flow {
        Flow { rec: self.rec }
    }
}
