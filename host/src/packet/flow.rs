//! Flows: which way a packet crosses the node, and the key the verdict caches store decisions
//! under. Built from the one parse of each packet ([`super::parse_ipv4`]).

use super::Ipv4Meta;

/// Which way a packet crosses the node, from the local pods' point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local pod to another node.
    Egress = 0,
    /// From another node to a local pod.
    Ingress = 1,
}

/// The verdict cache's key: direction and 5-tuple, packed.
pub type FlowKey = u128;

/// The cache key of the flow of `m` in direction `dir`.
#[inline]
pub fn key(m: &Ipv4Meta, dir: Direction) -> FlowKey {
    u128::from(u32::from(m.src))
        | u128::from(u32::from(m.dst)) << 32
        | u128::from(m.src_port) << 64
        | u128::from(m.dst_port) << 80
        | u128::from(m.protocol) << 96
        | (dir as u128) << 104
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::packet::{build_udp, parse_ipv4};

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_tell_directions_and_ports_apart() {
        let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, b"");
        let q = build_udp(a("10.244.1.5"), 5001, a("10.244.2.7"), 53, 64, b"");
        let (m, n) = (parse_ipv4(&p).unwrap(), parse_ipv4(&q).unwrap());
        assert_ne!(key(&m, Direction::Egress), key(&m, Direction::Ingress));
        assert_ne!(key(&m, Direction::Egress), key(&n, Direction::Egress));
    }

    #[test]
    fn udp_packets_give_ports_and_payload() {
        let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, b"hello");
        let m = parse_ipv4(&p).unwrap();
        assert_eq!(
            (m.protocol, m.src_port, m.dst_port, m.later_fragment),
            (17, 5000, 53, false)
        );
        assert_eq!(&p[m.payload.0..m.payload.0 + m.payload.1], b"hello");
        // A UDP header cut short still yields a packet, without ports.
        let mut short = p[..24].to_vec();
        short[2..4].copy_from_slice(&24u16.to_be_bytes());
        short[10] = 0;
        short[11] = 0;
        let c = crate::packet::checksum(&short[..20]);
        short[10..12].copy_from_slice(&c.to_be_bytes());
        let m = parse_ipv4(&short).unwrap();
        assert_eq!((m.src_port, m.dst_port, m.payload.1), (0, 0, 4));
    }
}
