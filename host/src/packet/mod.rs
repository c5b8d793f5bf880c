//! The pure packet core, tested without root: IPv4 header parsing, TTL handling and ICMP error
//! construction over plain byte buffers ([`self`]), the overlay's route table and source check
//! ([`route`]), and the Ethernet address type ([`mac`]). The Wasm host and every backend build on
//! it; it depends on none of them.

pub mod flow;
pub mod forward;
pub mod gro;
pub mod hash;
pub mod mac;
pub mod route;

use std::net::Ipv4Addr;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// ICMP type "destination unreachable".
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP code "net unreachable".
pub const ICMP_NET_UNREACH: u8 = 0;
/// ICMP type "time exceeded".
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// Why a buffer is not a usable IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("shorter than an IPv4 header")]
    TooShort,
    #[error("not IPv4 (version {0})")]
    NotIpv4(u8),
    #[error("bad IPv4 header length")]
    BadHeaderLength,
    #[error("IPv4 total length disagrees with the buffer")]
    BadTotalLength,
    #[error("bad IPv4 header checksum")]
    BadChecksum,
}

/// What the data path needs of a packet, read once: the IPv4 header, and the transport ports
/// the route lookup, the source check and the Wasm flow key all share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Meta {
    /// Header length in bytes.
    pub header_len: usize,
    /// Total length from the header (never more than the buffer).
    pub total_len: usize,
    /// Time to live.
    pub ttl: u8,
    /// Protocol number.
    pub protocol: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// True for a non-first fragment (no L4 header inside).
    pub later_fragment: bool,
    /// Source port (ICMP: type << 8 | code); 0 without one.
    pub src_port: u16,
    /// Destination port (ICMP echo: the identifier); 0 without one.
    pub dst_port: u16,
    /// TCP flags.
    pub tcp_flags: u8,
    /// Where the transport payload starts in the packet, and how long it is.
    pub payload: (usize, usize),
}

/// Whether an IPv4 header (a multiple of four bytes) sums to all ones: its checksum is right.
/// Four bytes at a time into a wide sum: a header costs five additions, not ten.
#[inline]
fn header_sum_ok(h: &[u8]) -> bool {
    let mut sum: u64 = 0;
    for w in h.chunks_exact(4) {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    fold64(sum) == 0xffff
}

/// The Internet checksum (RFC 1071) of `data`, folded and complemented.
pub fn checksum(data: &[u8]) -> u16 {
    !fold64(sum_wide(data, 0))
}

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// A one's-complement sum of `data` (as 16-bit big-endian words, an odd last byte padded) onto
/// `sum`, eight bytes per addition: payload checksums on the data path run at memory speed.
/// Fold it with [`fold64`].
///
/// The bulk is summed as host-order 64-bit words with the carry wrapped around, and only the
/// folded result is put in network order: a one's-complement sum commutes with swapping the
/// bytes of every word (RFC 1071, 2(B)), so no word is swapped on the way.
#[inline]
pub(crate) fn sum_wide(data: &[u8], mut sum: u64) -> u64 {
    fn word(w: &[u8]) -> u64 {
        u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    }
    fn add(acc: u64, v: u64) -> u64 {
        let (s, carry) = acc.overflowing_add(v);
        s + u64::from(carry)
    }
    // Two sums, so an addition waits for the one before last, not the last.
    let (mut a, mut b) = (0u64, 0u64);
    let mut blocks = data.chunks_exact(16);
    for w in &mut blocks {
        a = add(a, word(&w[..8]));
        b = add(b, word(&w[8..]));
    }
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        a = add(a, word(w));
    }
    let host = fold64(add(a, b));
    sum += u64::from(if cfg!(target_endian = "little") {
        host.swap_bytes()
    } else {
        host
    });
    sum + u64::from(sum16(words.remainder(), 0))
}

/// Folds a [`sum_wide`] sum into 16 bits (not complemented).
#[inline]
pub(crate) fn fold64(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes a TCP or UDP checksum left partial by a sender that offloaded it (the field holds
/// only the pseudo-header sum). A kernel VXLAN peer whose device keeps TX checksum offload on
/// sends such packets over virtual links (veth, bridges) where nothing ever finishes them; the
/// kernel's own VXLAN receive path carries the "partial" state along, a userspace receiver
/// has to finish the sum itself. Returns whether it did. Complete checksums are left alone.
pub fn complete_partial_checksum(pkt: &mut [u8]) -> bool {
    let Ok(m) = parse_ipv4(pkt) else { return false };
    let more_fragments = pkt[6] & 0x20 != 0;
    if m.later_fragment || more_fragments {
        return false;
    }
    let at = match m.protocol {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    let l4_len = m.total_len - m.header_len;
    if l4_len < at + 2 {
        return false;
    }
    let field_at = m.header_len + at;
    let field = u16::from_be_bytes([pkt[field_at], pkt[field_at + 1]]);
    if m.protocol == 17 && field == 0 {
        return false;
    }
    let pseudo = sum16(&pkt[12..20], u32::from(m.protocol) + l4_len as u32);
    let partial = fold(pseudo);
    if field != partial && field != !partial {
        return false;
    }
    pkt[field_at] = 0;
    pkt[field_at + 1] = 0;
    let mut c = !fold64(sum_wide(&pkt[m.header_len..m.total_len], u64::from(pseudo)));
    if m.protocol == 17 && c == 0 {
        c = 0xffff;
    }
    pkt[field_at..field_at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Whether `buf` is exactly one IPv6 packet (version 6, a whole header, the payload length the
/// header names): well-formed traffic the IPv4 overlay does not carry, not junk.
pub fn is_ipv6(buf: &[u8]) -> bool {
    buf.len() >= 40 && buf[0] >> 4 == 6 && 40 + usize::from(u16::from_be_bytes([buf[4], buf[5]])) == buf.len()
}

/// Parses and checks the IPv4 header at the start of `buf`.
pub fn parse_ipv4(buf: &[u8]) -> Result<Ipv4Meta, PacketError> {
    if buf.len() < 20 {
        return Err(PacketError::TooShort);
    }
    let version = buf[0] >> 4;
    if version != 4 {
        return Err(PacketError::NotIpv4(version));
    }
    let header_len = usize::from(buf[0] & 0x0f) * 4;
    if header_len < 20 || header_len > buf.len() {
        return Err(PacketError::BadHeaderLength);
    }
    let total_len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    if total_len < header_len || total_len > buf.len() {
        return Err(PacketError::BadTotalLength);
    }
    if !header_sum_ok(&buf[..header_len]) {
        return Err(PacketError::BadChecksum);
    }
    let frag = u16::from_be_bytes([buf[6], buf[7]]);
    let later_fragment = frag & 0x1fff != 0;
    let protocol = buf[9];
    let t = if later_fragment {
        Transport::NONE
    } else {
        transport(protocol, &buf[header_len..total_len])
    };
    // Built in one go from values: filling the ports into a struct written before makes the
    // caller's first read of it wait for every store still in flight (a failed store forward).
    Ok(Ipv4Meta {
        header_len,
        total_len,
        ttl: buf[8],
        protocol,
        src: Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]),
        dst: Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]),
        later_fragment,
        src_port: t.src_port,
        dst_port: t.dst_port,
        tcp_flags: t.tcp_flags,
        payload: (header_len + t.start.min(total_len - header_len), t.len),
    })
}

/// What the transport header says: ports, TCP flags, and where its payload starts (from the
/// transport header) and how long it is.
struct Transport {
    src_port: u16,
    dst_port: u16,
    tcp_flags: u8,
    start: usize,
    len: usize,
}

impl Transport {
    /// A later fragment: no transport header, and no payload a module sees.
    const NONE: Transport = Transport {
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        start: usize::MAX,
        len: 0,
    };
}

/// Reads the ports (and TCP flags) of the transport header `l4`, and where its payload lies.
/// A header cut short leaves the ports 0: the packet is still forwarded by its addresses.
/// Inlined so the answer stays in registers (see [`parse_ipv4`]).
#[inline(always)]
fn transport(protocol: u8, l4: &[u8]) -> Transport {
    let be16 = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let (src_port, dst_port, tcp_flags, start) = match protocol {
        6 if l4.len() >= 20 => (
            be16(0),
            be16(2),
            l4[13],
            (usize::from(l4[12] >> 4) * 4).clamp(20, l4.len()),
        ),
        17 if l4.len() >= 8 => (be16(0), be16(2), 0, 8),
        // Echo request/reply: the identifier tells one ping session from another.
        PROTO_ICMP if l4.len() >= 8 => (be16(0), if matches!(l4[0], 0 | 8) { be16(4) } else { 0 }, 0, 8),
        _ => (0, 0, 0, 0),
    };
    Transport {
        src_port,
        dst_port,
        tcp_flags,
        start,
        len: l4.len() - start,
    }
}

/// Decrements the TTL of a parsed packet in place, patching the header checksum
/// incrementally (RFC 1624). Returns false, leaving the packet untouched, when the TTL
/// would reach zero: the packet must not be forwarded.
pub fn decrement_ttl(buf: &mut [u8]) -> bool {
    if buf.len() < 20 || buf[8] <= 1 {
        return false;
    }
    let old = u16::from_be_bytes([buf[8], buf[9]]);
    buf[8] -= 1;
    let new = u16::from_be_bytes([buf[8], buf[9]]);
    let hc = u16::from_be_bytes([buf[10], buf[11]]);
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let out = !(sum as u16);
    buf[10..12].copy_from_slice(&out.to_be_bytes());
    true
}

/// Whether an ICMP error may be sent about this packet (RFC 1812 4.3.2.7): never about an
/// ICMP error, a non-first fragment, or a packet from a broadcast, multicast or unspecified source.
fn may_answer(pkt: &[u8], meta: &Ipv4Meta) -> bool {
    if meta.later_fragment || meta.src.is_unspecified() || meta.src.is_broadcast() || meta.src.is_multicast() {
        return false;
    }
    if meta.protocol == PROTO_ICMP {
        let Some(&icmp_type) = pkt.get(meta.header_len) else {
            return false;
        };
        // Only queries (echo, timestamp, ...) may be answered with errors.
        return matches!(icmp_type, 0 | 8 | 13 | 14);
    }
    true
}

/// Builds an ICMP error (`icmp_type`/`code`) from `from` about `pkt`, addressed to its source,
/// quoting its header and first 8 payload bytes. `None` when the rules forbid an answer.
pub fn icmp_error(pkt: &[u8], from: Ipv4Addr, icmp_type: u8, code: u8) -> Option<Vec<u8>> {
    let meta = parse_ipv4(pkt).ok()?;
    if !may_answer(pkt, &meta) {
        return None;
    }
    let quoted = &pkt[..(meta.header_len + 8).min(meta.total_len)];
    let total = 20 + 8 + quoted.len();
    let mut out = vec![0u8; total];
    out[0] = 0x45;
    out[2..4].copy_from_slice(&u16::try_from(total).ok()?.to_be_bytes());
    out[8] = 64;
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&from.octets());
    out[16..20].copy_from_slice(&meta.src.octets());
    let hc = checksum(&out[..20]);
    out[10..12].copy_from_slice(&hc.to_be_bytes());
    out[20] = icmp_type;
    out[21] = code;
    out[28..].copy_from_slice(quoted);
    let ic = checksum(&out[20..]);
    out[22..24].copy_from_slice(&ic.to_be_bytes());
    Some(out)
}

/// Builds a minimal IPv4 packet (for tests and probes) with a correct header checksum.
pub fn build_ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = ttl;
    p[9] = protocol;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

/// The transport checksum of `segment` (its checksum field zeroed) over the IPv4 pseudo-header.
fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

/// Builds an IPv4/TCP segment with `flags` (e.g. [`tcp_flag::SYN`]) and correct checksums (for
/// probes and the offline test bench).
pub fn build_tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, ttl: u8, data: &[u8]) -> Vec<u8> {
    let mut tcp = vec![0u8; 20 + data.len()];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp[20..].copy_from_slice(data);
    let c = transport_checksum(src, dst, 6, &tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    build_ipv4(src, dst, 6, ttl, &tcp)
}

/// TCP flag bits.
pub mod tcp_flag {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Builds an ICMP echo request (for probes and the offline test bench).
pub fn build_icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16, ttl: u8) -> Vec<u8> {
    let mut icmp = vec![8u8, 0, 0, 0, 0, 0, 0, 0];
    icmp[4..6].copy_from_slice(&id.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    build_ipv4(src, dst, 1, ttl, &icmp)
}

/// Builds an IPv4/UDP packet with a correct UDP checksum (for tests and probes).
pub fn build_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, ttl: u8, data: &[u8]) -> Vec<u8> {
    let ulen = 8 + data.len();
    let mut udp = vec![0u8; ulen];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(ulen as u16).to_be_bytes());
    udp[8..].copy_from_slice(data);
    let c = match transport_checksum(src, dst, 17, &udp) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    build_ipv4(src, dst, 17, ttl, &udp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_a_valid_packet() {
        let p = build_udp(a("10.244.1.2"), 1000, a("10.244.2.3"), 2000, 64, b"hello");
        let m = parse_ipv4(&p).unwrap();
        assert_eq!(m.src, a("10.244.1.2"));
        assert_eq!(m.dst, a("10.244.2.3"));
        assert_eq!(m.protocol, 17);
        assert_eq!(m.total_len, 33);
        assert_eq!(m.ttl, 64);
    }

    #[test]
    fn rejects_malformed_packets() {
        let good = build_udp(a("10.0.0.1"), 1, a("10.0.0.2"), 2, 64, b"xyz");
        assert_eq!(parse_ipv4(&good[..10]), Err(PacketError::TooShort));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(PacketError::NotIpv4(6)));
        let mut ihl = good.clone();
        ihl[0] = 0x44;
        assert_eq!(parse_ipv4(&ihl), Err(PacketError::BadHeaderLength));
        let mut long = good.clone();
        long[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert!(parse_ipv4(&long).is_err());
        let mut bad = good.clone();
        bad[15] ^= 1;
        assert_eq!(parse_ipv4(&bad), Err(PacketError::BadChecksum));
        assert!(parse_ipv4(&[]).is_err());
    }

    #[test]
    fn padded_buffers_are_fine() {
        let mut p = build_udp(a("10.0.0.1"), 1, a("10.0.0.2"), 2, 64, b"xyz");
        p.extend_from_slice(&[0; 20]);
        assert_eq!(parse_ipv4(&p).unwrap().total_len, 31);
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 64, 128, 255] {
            let mut p = build_udp(a("10.1.2.3"), 9, a("10.3.2.1"), 9, ttl, b"data");
            assert!(decrement_ttl(&mut p));
            let m = parse_ipv4(&p).unwrap();
            assert_eq!(m.ttl, ttl - 1);
        }
        let mut dying = build_udp(a("10.1.2.3"), 9, a("10.3.2.1"), 9, 1, b"data");
        let before = dying.clone();
        assert!(!decrement_ttl(&mut dying));
        assert_eq!(dying, before);
    }

    #[test]
    fn icmp_unreachable_quotes_the_packet() {
        let p = build_udp(a("10.244.1.2"), 1234, a("10.244.99.9"), 53, 63, b"0123456789");
        let e = icmp_error(&p, a("10.244.1.0"), ICMP_DEST_UNREACH, ICMP_NET_UNREACH).unwrap();
        let m = parse_ipv4(&e).unwrap();
        assert_eq!(m.protocol, PROTO_ICMP);
        assert_eq!(m.src, a("10.244.1.0"));
        assert_eq!(m.dst, a("10.244.1.2"));
        assert_eq!(e[20], ICMP_DEST_UNREACH);
        assert_eq!(e[21], ICMP_NET_UNREACH);
        assert_eq!(checksum(&e[20..]), 0);
        assert_eq!(&e[28..], &p[..28]);
    }

    #[test]
    fn no_icmp_error_about_an_icmp_error() {
        let err = build_ipv4(a("10.0.0.1"), a("10.0.0.2"), PROTO_ICMP, 64, &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert!(icmp_error(&err, a("10.0.0.9"), ICMP_DEST_UNREACH, 0).is_none());
        let echo = build_ipv4(a("10.0.0.1"), a("10.0.0.2"), PROTO_ICMP, 64, &[8, 0, 0, 0, 0, 0, 0, 0]);
        assert!(icmp_error(&echo, a("10.0.0.9"), ICMP_DEST_UNREACH, 0).is_some());
    }

    #[test]
    fn partial_l4_checksums_are_completed_and_full_ones_kept() {
        let src = Ipv4Addr::new(10, 244, 1, 2);
        let dst = Ipv4Addr::new(10, 244, 2, 2);
        // A TCP segment: 20-byte header (checksum at 16) and an odd-length payload.
        let mut seg = vec![0u8; 20];
        seg[12] = 0x50;
        seg.extend_from_slice(b"hello, weft!!");
        let mut pkt = build_ipv4(src, dst, 6, 64, &seg);
        let verify = |p: &[u8]| {
            let l4 = &p[20..];
            let pseudo = sum16(&p[12..20], 6 + l4.len() as u32);
            !fold(sum16(l4, pseudo))
        };
        // What an offloading sender leaves: the pseudo-header sum only.
        let pseudo = fold(sum16(&pkt[12..20], 6 + seg.len() as u32));
        pkt[36..38].copy_from_slice(&pseudo.to_be_bytes());
        assert!(complete_partial_checksum(&mut pkt));
        assert_eq!(verify(&pkt), 0, "the completed checksum verifies");
        let full = pkt.clone();
        assert!(!complete_partial_checksum(&mut pkt), "a full checksum is left alone");
        assert_eq!(pkt, full);
        // UDP without a checksum stays without one; fragments and garbage are not touched.
        let mut udp = build_udp(src, 1, dst, 2, 64, b"x");
        udp[26] = 0;
        udp[27] = 0;
        assert!(!complete_partial_checksum(&mut udp));
        let mut frag = full.clone();
        frag[6] = 0x20;
        assert!(!complete_partial_checksum(&mut frag));
        assert!(!complete_partial_checksum(&mut [0x45, 0, 0]));
    }
}

#[cfg(test)]
mod sum_tests {
    use super::*;

    /// RFC 1071 word by word, the reference.
    fn rfc1071(d: &[u8]) -> u16 {
        !fold(sum16(d, 0))
    }

    /// The wide sum agrees with the word-by-word one for every length and start.
    #[test]
    fn the_wide_sum_agrees_with_rfc_1071() {
        let data: Vec<u8> = (0..3010u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..80).chain([1399, 1400, 1401, 2999]) {
            for start in [0, 2, 4, 6] {
                let d = &data[start..start + len];
                assert_eq!(checksum(d), rfc1071(d), "len {len} start {start}");
            }
        }
        assert_eq!(fold64(u64::MAX), 0xffff);
        let ones = [0xffu8; 100];
        for len in 0..100 {
            assert_eq!(
                !fold64(sum_wide(&ones[..len], 0xffff_ffff)),
                rfc1071(&[&ones[..len], &[0xff; 4]].concat()),
                "carries, len {len}"
            );
        }
    }

    /// The fast header check agrees with the byte-wise checksum on every header.
    #[test]
    fn the_fast_header_sum_agrees_with_rfc_1071() {
        let mut h = [0u8; 60];
        let mut x: u32 = 0x1234_5678;
        for round in 0..20_000 {
            for b in h.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            let len = 20 + 4 * (round % 11);
            h[10] = 0;
            h[11] = 0;
            if round % 3 != 0 {
                let c = checksum(&h[..len]);
                h[10..12].copy_from_slice(&c.to_be_bytes());
            }
            assert_eq!(header_sum_ok(&h[..len]), checksum(&h[..len]) == 0, "round {round}");
        }
    }
}
