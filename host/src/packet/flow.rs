//! Flows: which way a packet crosses the node, and the keys the verdict caches store decisions
//! under: a flow's own (direction and 5-tuple), and the wider keys of a verdict a module gave
//! for every source port, or every source, of a service. Built from the one parse of each
//! packet ([`super::parse_ipv4`]).

use super::Ipv4Meta;

/// Which way a packet crosses the node, from the local pods' point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Which flows a verdict holds for (the ABI's scope byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// This flow only.
    Flow = 0,
    /// Every source port of this source and service.
    AnySourcePort = 1,
    /// Every source of this service.
    AnySource = 2,
}

impl Scope {
    /// The scope of the ABI's scope byte; one it does not define is the narrowest (words are
    /// checked when read, so that is never a module's doing).
    pub fn from_abi(b: u8) -> Scope {
        match b {
            1 => Scope::AnySourcePort,
            2 => Scope::AnySource,
            _ => Scope::Flow,
        }
    }
}

/// IP protocol numbers whose flows a wide verdict can cover: those with ports, whose
/// destination port names the service.
pub const WIDE_PROTOCOLS: [u8; 2] = [6, 17];

/// The key of the service `m` belongs to under `scope` (never [`Scope::Flow`]): the flow's key
/// with what the scope leaves out zeroed, and the scope in bits 105-106 so no wide key equals
/// a flow's key or another scope's.
#[inline]
pub fn wide_key(m: &Ipv4Meta, dir: Direction, scope: Scope) -> FlowKey {
    let src = match scope {
        Scope::AnySource => 0,
        _ => u128::from(u32::from(m.src)),
    };
    src | u128::from(u32::from(m.dst)) << 32
        | u128::from(m.dst_port) << 80
        | u128::from(m.protocol) << 96
        | (dir as u128) << 104
        | (scope as u128) << 105
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
    fn wide_keys_leave_out_what_their_scope_says_and_nothing_else() {
        let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, b"");
        let q = build_udp(a("10.244.1.5"), 5001, a("10.244.2.7"), 53, 64, b"");
        let r = build_udp(a("10.244.3.9"), 5000, a("10.244.2.7"), 53, 64, b"");
        let s = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 54, 64, b"");
        let [p, q, r, s] = [&p, &q, &r, &s].map(|b| parse_ipv4(b).unwrap());
        let (e, port, any) = (Direction::Egress, Scope::AnySourcePort, Scope::AnySource);
        assert_eq!(
            wide_key(&p, e, port),
            wide_key(&q, e, port),
            "source ports are one service"
        );
        assert_ne!(wide_key(&p, e, port), wide_key(&r, e, port), "another source is not");
        assert_eq!(wide_key(&p, e, any), wide_key(&r, e, any), "unless any source is");
        assert_ne!(
            wide_key(&p, e, any),
            wide_key(&s, e, any),
            "another port is another service"
        );
        assert_ne!(wide_key(&p, e, any), wide_key(&p, Direction::Ingress, any));
        assert_ne!(wide_key(&p, e, port), wide_key(&p, e, any));
        // A flow with source port and address 0 still has a key of its own.
        let z = build_udp(a("0.0.0.0"), 0, a("10.244.2.7"), 53, 64, b"");
        let z = parse_ipv4(&z).unwrap();
        assert_ne!(key(&z, e), wide_key(&z, e, port));
        assert_ne!(key(&z, e), wide_key(&z, e, any));
        assert!(Scope::Flow < Scope::AnySourcePort && Scope::AnySourcePort < Scope::AnySource);
        assert_eq!(Scope::from_abi(weft_guest::abi::scope::ANY_SOURCE), any);
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
