//! From packet bytes to a flow: the key the verdict cache uses and the record a module reads.
//! Pure code over buffers.

use std::net::Ipv4Addr;

use weft_guest::abi::{self, Record, PAYLOAD_MAX};

use crate::packet::route::RouteTable;

/// Which way a packet crosses the node, from the local pods' point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local pod to another node.
    Egress = 0,
    /// From another node to a local pod.
    Ingress = 1,
}

/// The parts of a packet a decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowMeta {
    /// IP protocol.
    pub protocol: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port (ICMP: type << 8 | code).
    pub src_port: u16,
    /// Destination port (ICMP echo: identifier).
    pub dst_port: u16,
    /// TCP flags.
    pub tcp_flags: u8,
    /// A non-first fragment.
    pub fragment: bool,
    /// IP total length.
    pub packet_len: u16,
    /// Where the L4 payload starts, and how long it is.
    pub payload: (usize, usize),
}

/// The verdict cache's key: direction and 5-tuple, packed.
pub type FlowKey = u128;

impl FlowMeta {
    /// The cache key of this flow in direction `dir`.
    #[inline]
    pub fn key(&self, dir: Direction) -> FlowKey {
        u128::from(u32::from(self.src))
            | u128::from(u32::from(self.dst)) << 32
            | u128::from(self.src_port) << 64
            | u128::from(self.dst_port) << 80
            | u128::from(self.protocol) << 96
            | (dir as u128) << 104
    }
}

/// Reads the flow fields of an IPv4 packet; `None` for anything that is not one (the data
/// path's own checks then drop it with a reason).
pub fn parse(pkt: &[u8]) -> Option<FlowMeta> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if ihl < 20 || total < ihl || total > pkt.len() {
        return None;
    }
    let fragment = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff != 0;
    let protocol = pkt[9];
    let mut m = FlowMeta {
        protocol,
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        fragment,
        packet_len: total as u16,
        payload: (total, 0),
    };
    if fragment {
        return Some(m);
    }
    let l4 = &pkt[ihl..total];
    let be16 = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let start = match protocol {
        6 if l4.len() >= 20 => {
            m.src_port = be16(0);
            m.dst_port = be16(2);
            m.tcp_flags = l4[13];
            (usize::from(l4[12] >> 4) * 4).clamp(20, l4.len())
        }
        17 if l4.len() >= 8 => {
            m.src_port = be16(0);
            m.dst_port = be16(2);
            8
        }
        1 if l4.len() >= 8 => {
            m.src_port = u16::from(l4[0]) << 8 | u16::from(l4[1]);
            // Echo request/reply: the identifier tells one ping session from another.
            m.dst_port = if matches!(l4[0], 0 | 8) { be16(4) } else { 0 };
            8
        }
        _ => 0,
    };
    m.payload = (ihl + start, l4.len() - start);
    Some(m)
}

/// What the node knows that goes into every record.
#[derive(Debug, Clone, Copy)]
pub struct Local {
    /// This node's underlay address.
    pub node: Ipv4Addr,
}

/// The version-1 flow record of `m`, with lease facts from `leases` (every lease, own included).
pub fn record(
    m: &FlowMeta,
    dir: Direction,
    established: bool,
    pkt: &[u8],
    leases: &RouteTable,
    local: Local,
) -> Record {
    let mut r = Record {
        direction: match dir {
            Direction::Egress => abi::direction::EGRESS,
            Direction::Ingress => abi::direction::INGRESS,
        },
        protocol: m.protocol,
        tcp_flags: m.tcp_flags,
        flags: if established { abi::flag::ESTABLISHED } else { 0 } | if m.fragment { abi::flag::FRAGMENT } else { 0 },
        src: m.src.octets(),
        dst: m.dst.octets(),
        src_port: m.src_port,
        dst_port: m.dst_port,
        packet_len: u32::from(m.packet_len),
        local_node: local.node.octets(),
        ..Record::default()
    };
    if let Some((net, len, node)) = leases.subnet_of(m.src) {
        r.src_subnet = net.octets();
        r.src_prefix = len;
        r.src_node = node.octets();
    }
    if let Some((net, len, node)) = leases.subnet_of(m.dst) {
        r.dst_subnet = net.octets();
        r.dst_prefix = len;
        r.dst_node = node.octets();
    }
    let (start, len) = m.payload;
    let n = len.min(PAYLOAD_MAX);
    if let Some(p) = pkt.get(start..start + n) {
        r.payload[..n].copy_from_slice(p);
        r.payload_len = n as u16;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build_udp;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn udp_packets_give_ports_payload_and_lease_facts() {
        let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, b"hello");
        let m = parse(&p).unwrap();
        assert_eq!((m.protocol, m.src_port, m.dst_port, m.fragment), (17, 5000, 53, false));
        let mut leases = RouteTable::new("10.244.0.0/16".parse().unwrap(), 24, None);
        leases.insert("10.244.2.0/24".parse().unwrap(), a("198.18.0.2"));
        let r = record(
            &m,
            Direction::Egress,
            true,
            &p,
            &leases,
            Local { node: a("198.18.0.1") },
        );
        assert_eq!(&r.payload[..r.payload_len as usize], b"hello");
        assert_eq!(r.dst_node, [198, 18, 0, 2]);
        assert_eq!((r.dst_subnet, r.dst_prefix), ([10, 244, 2, 0], 24));
        assert_eq!(r.src_prefix, 0, "no lease covers the source in this table");
        assert_eq!(r.flags, abi::flag::ESTABLISHED);
        assert_eq!(r.packet_len, p.len() as u32);
    }

    #[test]
    fn keys_tell_directions_and_ports_apart() {
        let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, b"");
        let q = build_udp(a("10.244.1.5"), 5001, a("10.244.2.7"), 53, 64, b"");
        let (m, n) = (parse(&p).unwrap(), parse(&q).unwrap());
        assert_ne!(m.key(Direction::Egress), m.key(Direction::Ingress));
        assert_ne!(m.key(Direction::Egress), n.key(Direction::Egress));
    }

    #[test]
    fn truncated_and_foreign_packets_are_not_flows() {
        let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, b"hello");
        assert!(parse(&p[..19]).is_none());
        assert!(parse(&p[..p.len() - 1]).is_none(), "total length beyond the buffer");
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert!(parse(&v6).is_none());
        // A UDP header cut short still yields a flow, without ports.
        let mut short = p[..24].to_vec();
        short[2..4].copy_from_slice(&24u16.to_be_bytes());
        let m = parse(&short).unwrap();
        assert_eq!((m.src_port, m.dst_port, m.payload.1), (0, 0, 4));
    }
}
