//! From a parsed packet to the record a module reads. Pure code over buffers; the parse itself
//! and the flow key live in the packet core ([`crate::packet`]), shared with forwarding.

use std::net::Ipv4Addr;

use weft_guest::abi::{self, Record, PAYLOAD_MAX, RECORD_SIZE};

use crate::packet::route::RouteTable;

pub use crate::packet::flow::{key, wide_key, Direction, FlowKey, Scope, WIDE_PROTOCOLS};
pub use crate::packet::Ipv4Meta as FlowMeta;

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
    let mut r = header(m, dir, established, leases, local);
    let p = payload(m, pkt);
    r.payload[..p.len()].copy_from_slice(p);
    r.payload_len = p.len() as u16;
    r
}

/// [`record`], written straight into the buffer a module reads: the payload is copied once,
/// from the packet.
#[inline]
pub fn encode(
    m: &FlowMeta,
    dir: Direction,
    established: bool,
    pkt: &[u8],
    leases: &RouteTable,
    local: Local,
    out: &mut [u8; RECORD_SIZE],
) {
    header(m, dir, established, leases, local).encode_with(payload(m, pkt), out);
}

/// The first payload bytes a record carries (none if the packet is shorter than it says).
#[inline]
fn payload<'a>(m: &FlowMeta, pkt: &'a [u8]) -> &'a [u8] {
    let (start, len) = m.payload;
    pkt.get(start..start + len.min(PAYLOAD_MAX)).unwrap_or(&[])
}

/// Every field but the payload. Inlined into [`encode`] so its fields go straight to the
/// buffer: read back from the stack, the four one-byte fields written apart stalled the load
/// that copies them together.
#[inline(always)]
fn header(m: &FlowMeta, dir: Direction, established: bool, leases: &RouteTable, local: Local) -> Record {
    let mut r = Record {
        direction: match dir {
            Direction::Egress => abi::direction::EGRESS,
            Direction::Ingress => abi::direction::INGRESS,
        },
        protocol: m.protocol,
        tcp_flags: m.tcp_flags,
        flags: if established { abi::flag::ESTABLISHED } else { 0 }
            | if m.later_fragment { abi::flag::FRAGMENT } else { 0 },
        src: m.src.octets(),
        dst: m.dst.octets(),
        src_port: m.src_port,
        dst_port: m.dst_port,
        packet_len: m.total_len as u32,
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
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{build_udp, parse_ipv4};

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn records_carry_payload_and_lease_facts() {
        let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, b"hello");
        let m = parse_ipv4(&p).unwrap();
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
    fn encoding_straight_from_the_packet_writes_what_the_record_does() {
        let mut leases = RouteTable::new("10.244.0.0/16".parse().unwrap(), 24, None);
        leases.set_local("10.244.1.0/24".parse().unwrap(), a("198.18.0.1"));
        leases.insert("10.244.2.0/24".parse().unwrap(), a("198.18.0.2"));
        let local = Local { node: a("198.18.0.1") };
        for body in [&b""[..], b"hi", &[7u8; 200][..]] {
            let p = build_udp(a("10.244.1.5"), 5000, a("10.244.2.7"), 53, 64, body);
            let mut m = parse_ipv4(&p).unwrap();
            for dir in [Direction::Egress, Direction::Ingress] {
                let (mut want, mut got) = ([0u8; RECORD_SIZE], [0xEEu8; RECORD_SIZE]);
                record(&m, dir, false, &p, &leases, local).encode(&mut want);
                encode(&m, dir, false, &p, &leases, local, &mut got);
                assert_eq!(want, got, "{} payload bytes, {dir:?}", body.len());
            }
            // A payload the packet does not hold in full is left out rather than cut.
            m.payload = (p.len() - 1, 2);
            let mut got = [0xEEu8; RECORD_SIZE];
            encode(&m, Direction::Egress, true, &p, &leases, local, &mut got);
            assert_eq!(Record::decode(&got).map(|r| r.payload_len), Some(0));
        }
    }
}
