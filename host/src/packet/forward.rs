//! Forwarding decisions of the userspace data path, sans I/O, whatever the framing: on the way
//! out a route lookup, a TTL decrement and ICMP errors; on the way in the source check (the
//! sender must hold a lease on the inner source) and a TTL decrement. They take the packet as
//! parsed once ([`parse`]), the same parse the Wasm chain decides on.

use std::net::Ipv4Addr;

use crate::packet::route::{RouteTable, SourceCheck};
use crate::packet::{self, Ipv4Meta, ICMP_DEST_UNREACH, ICMP_NET_UNREACH, ICMP_TIME_EXCEEDED};
use crate::stats::DropReason;

/// Parses `buf` for forwarding; a buffer that is not an IPv4 packet is dropped for a reason:
/// IPv6 (well-formed, not carried yet) or malformed.
#[inline]
pub fn parse(buf: &[u8]) -> Result<Ipv4Meta, DropReason> {
    packet::parse_ipv4(buf).map_err(|_| not_ipv4(buf))
}

/// What to do with a packet read from the TUN device.
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Send the first `len` bytes of the (TTL-decremented) buffer to this node's PublicIP.
    Send { peer: Ipv4Addr, len: usize },
    /// Write this ICMP error back into the TUN device, and count the drop.
    Reply(Vec<u8>, DropReason),
    /// Drop silently (but counted).
    Drop(DropReason),
}

/// What to do with a datagram received from the underlay.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Write the first `len` bytes of the (TTL-decremented) buffer into the TUN device.
    Deliver { len: usize },
    /// Drop (and count).
    Drop(DropReason),
}

/// Why a buffer that does not parse as IPv4 is dropped: IPv6 is well-formed traffic the overlay
/// does not carry yet, anything else is malformed.
fn not_ipv4(buf: &[u8]) -> DropReason {
    if packet::is_ipv6(buf) {
        DropReason::Ipv6NotEnabled
    } else {
        DropReason::Malformed
    }
}

/// Decides where a packet from the TUN device goes.
pub fn outbound(routes: &RouteTable, buf: &mut [u8]) -> Outbound {
    match parse(buf) {
        Ok(m) => outbound_parsed(routes, &m, buf),
        Err(reason) => Outbound::Drop(reason),
    }
}

/// [`outbound`] for a packet parsed already (`meta` is `buf` parsed).
#[inline]
pub fn outbound_parsed(routes: &RouteTable, meta: &Ipv4Meta, buf: &mut [u8]) -> Outbound {
    // ICMP errors are written back into the TUN device, so they must not come from one of the
    // node's own addresses (the kernel drops those as martians): they come from the address the
    // packet was trying to reach, which is what the sender's `ping` then names.
    let router = meta.dst;
    let Some(peer) = routes.lookup(meta.dst) else {
        return match packet::icmp_error(&buf[..meta.total_len], router, ICMP_DEST_UNREACH, ICMP_NET_UNREACH) {
            Some(icmp) => Outbound::Reply(icmp, DropReason::NoRoute),
            None => Outbound::Drop(DropReason::NoRoute),
        };
    };
    if !packet::decrement_ttl(buf) {
        return match packet::icmp_error(&buf[..meta.total_len], router, ICMP_TIME_EXCEEDED, 0) {
            Some(icmp) => Outbound::Reply(icmp, DropReason::TtlExpired),
            None => Outbound::Drop(DropReason::TtlExpired),
        };
    }
    Outbound::Send {
        peer,
        len: meta.total_len,
    }
}

/// Decides whether a datagram from `from` may enter this node: the sender must hold a lease
/// and the inner source must lie in the sender's subnet. With `relay` (a routing module steers
/// flows through other nodes), a member may also carry another member's traffic: the inner
/// source must then lie in some leased subnet.
pub fn inbound(routes: &RouteTable, from: Ipv4Addr, buf: &mut [u8], relay: bool) -> Inbound {
    match parse(buf) {
        Ok(m) => inbound_parsed(routes, from, &m, buf, relay),
        Err(reason) => Inbound::Drop(reason),
    }
}

/// [`inbound`] for a datagram parsed already (`meta` is `buf` parsed).
#[inline]
pub fn inbound_parsed(routes: &RouteTable, from: Ipv4Addr, meta: &Ipv4Meta, buf: &mut [u8], relay: bool) -> Inbound {
    match routes.check_source(from, meta.src) {
        SourceCheck::Owned => {}
        SourceCheck::UnknownPeer => return Inbound::Drop(DropReason::UnknownPeer),
        SourceCheck::Spoofed if relay && routes.lookup(meta.src).is_some() => {}
        SourceCheck::Spoofed => return Inbound::Drop(DropReason::SpoofedSource),
    }
    if !routes.network().contains(&meta.dst) {
        return Inbound::Drop(DropReason::OutsideNetwork);
    }
    if !packet::decrement_ttl(buf) {
        return Inbound::Drop(DropReason::TtlExpired);
    }
    Inbound::Deliver { len: meta.total_len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{build_udp, parse_ipv4};

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn routes() -> RouteTable {
        let mut t = RouteTable::new(
            "10.244.0.0/16".parse().unwrap(),
            24,
            Some("10.244.1.0/24".parse().unwrap()),
        );
        t.insert("10.244.2.0/24".parse().unwrap(), a("198.18.0.2"));
        t
    }

    #[test]
    fn ipv6_is_not_malformed() {
        // A router solicitation as the kernel sends it into a fresh device: IPv6, ICMPv6 133.
        let mut rs = vec![0u8; 48];
        rs[0] = 0x60;
        rs[5] = 8;
        rs[6] = 58;
        rs[7] = 255;
        rs[40] = 133;
        assert_eq!(
            outbound(&routes(), &mut rs.clone()),
            Outbound::Drop(DropReason::Ipv6NotEnabled)
        );
        assert_eq!(
            inbound(&routes(), a("198.18.0.2"), &mut rs, false),
            Inbound::Drop(DropReason::Ipv6NotEnabled)
        );
        let mut junk = vec![0x45u8; 10];
        assert_eq!(outbound(&routes(), &mut junk), Outbound::Drop(DropReason::Malformed));
    }

    #[test]
    fn outbound_routes_and_decrements_ttl() {
        let mut p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 80, 64, b"payload");
        let out = outbound(&routes(), &mut p);
        assert_eq!(
            out,
            Outbound::Send {
                peer: a("198.18.0.2"),
                len: p.len()
            }
        );
        assert_eq!(parse_ipv4(&p).unwrap().ttl, 63);
    }

    #[test]
    fn outbound_trailing_bytes_are_not_sent() {
        let mut p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 80, 64, b"payload");
        let len = p.len();
        p.extend_from_slice(&[0xaa; 16]);
        assert_eq!(
            outbound(&routes(), &mut p),
            Outbound::Send {
                peer: a("198.18.0.2"),
                len
            }
        );
    }

    #[test]
    fn outbound_unroutable_gets_net_unreachable() {
        let mut p = build_udp(a("10.244.1.5"), 5000, a("10.244.9.7"), 80, 64, b"payload");
        match outbound(&routes(), &mut p) {
            Outbound::Reply(icmp, DropReason::NoRoute) => {
                let m = parse_ipv4(&icmp).unwrap();
                assert_eq!(m.dst, a("10.244.1.5"));
                assert_eq!(m.src, a("10.244.9.7"), "never a local address of the node");
                assert_eq!((icmp[20], icmp[21]), (3, 0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn outbound_dying_ttl_gets_time_exceeded() {
        let mut p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 80, 1, b"payload");
        match outbound(&routes(), &mut p) {
            Outbound::Reply(icmp, DropReason::TtlExpired) => assert_eq!(icmp[20], 11),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn outbound_garbage_is_malformed() {
        let mut junk = vec![0x45u8; 7];
        assert_eq!(outbound(&routes(), &mut junk), Outbound::Drop(DropReason::Malformed));
    }

    #[test]
    fn inbound_accepts_the_owner_and_decrements_ttl() {
        let mut p = build_udp(a("10.244.2.7"), 80, a("10.244.1.5"), 5000, 63, b"reply");
        assert_eq!(
            inbound(&routes(), a("198.18.0.2"), &mut p, false),
            Inbound::Deliver { len: p.len() }
        );
        assert_eq!(parse_ipv4(&p).unwrap().ttl, 62);
    }

    #[test]
    fn inbound_anti_spoofing() {
        let mut spoofed = build_udp(a("10.244.3.7"), 80, a("10.244.1.5"), 5000, 63, b"evil");
        assert_eq!(
            inbound(&routes(), a("198.18.0.2"), &mut spoofed, false),
            Inbound::Drop(DropReason::SpoofedSource)
        );
        let mut stranger = build_udp(a("10.244.2.7"), 80, a("10.244.1.5"), 5000, 63, b"evil");
        assert_eq!(
            inbound(&routes(), a("198.18.0.77"), &mut stranger, false),
            Inbound::Drop(DropReason::UnknownPeer)
        );
        let mut outside = build_udp(a("10.244.2.7"), 80, a("1.1.1.1"), 5000, 63, b"evil");
        assert_eq!(
            inbound(&routes(), a("198.18.0.2"), &mut outside, false),
            Inbound::Drop(DropReason::OutsideNetwork)
        );
        let mut junk = b"definitely not an ip packet".to_vec();
        assert_eq!(
            inbound(&routes(), a("198.18.0.2"), &mut junk, false),
            Inbound::Drop(DropReason::Malformed)
        );
        let mut dying = build_udp(a("10.244.2.7"), 80, a("10.244.1.5"), 5000, 1, b"x");
        assert_eq!(
            inbound(&routes(), a("198.18.0.2"), &mut dying, false),
            Inbound::Drop(DropReason::TtlExpired)
        );
    }

    #[test]
    fn relaying_accepts_other_members_traffic_but_never_strangers() {
        let mut t = routes();
        t.insert("10.244.3.0/24".parse().unwrap(), a("198.18.0.3"));
        let relayed = || build_udp(a("10.244.3.7"), 80, a("10.244.1.5"), 5000, 63, b"via .2");
        assert_eq!(
            inbound(&t, a("198.18.0.2"), &mut relayed(), false),
            Inbound::Drop(DropReason::SpoofedSource),
            "without a routing module a relay is a spoof"
        );
        assert!(matches!(
            inbound(&t, a("198.18.0.2"), &mut relayed(), true),
            Inbound::Deliver { .. }
        ));
        let mut unleased = build_udp(a("10.244.9.7"), 80, a("10.244.1.5"), 5000, 63, b"evil");
        assert_eq!(
            inbound(&t, a("198.18.0.2"), &mut unleased, true),
            Inbound::Drop(DropReason::SpoofedSource)
        );
        assert_eq!(
            inbound(&t, a("198.18.0.77"), &mut relayed(), true),
            Inbound::Drop(DropReason::UnknownPeer)
        );
    }

    #[test]
    fn hostile_bytes_never_panic_and_never_pass_unchecked() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let valid = build_udp(a("10.244.2.7"), 80, a("10.244.1.5"), 5000, 64, &[0x55; 40]);
        for round in 0..20_000 {
            // Half pure noise, half a valid packet with a few bytes flipped and a random length.
            let mut buf: Vec<u8> = if round % 2 == 0 {
                (0..rng.random_range(0..120)).map(|_| rng.random()).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..v.len());
                    v[i] = rng.random();
                }
                v.truncate(rng.random_range(0..=v.len()));
                v
            };
            let mut copy = buf.clone();
            if let Inbound::Deliver { len } = inbound(&routes(), a("198.18.0.2"), &mut buf, false) {
                // Whatever passes is a well-formed packet from the sender's subnet.
                let m = parse_ipv4(&buf[..len]).expect("delivered packets parse");
                assert!("10.244.2.0/24".parse::<ipnet::Ipv4Net>().unwrap().contains(&m.src));
            }
            if let Outbound::Send { len, .. } = outbound(&routes(), &mut copy) {
                assert!(parse_ipv4(&copy[..len]).is_ok());
            }
        }
    }
}
