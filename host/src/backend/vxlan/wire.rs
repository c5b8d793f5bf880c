//! VXLAN framing (RFC 7348) as the Linux kernel puts it on the wire, sans I/O: an 8-byte VXLAN
//! header, then an Ethernet header, then the inner IPv4 packet. The userspace mode builds and
//! strips exactly these 22 bytes, so a kernel VXLAN device is a peer like any other.

use std::net::Ipv4Addr;

pub use crate::packet::mac::{BadMac, Mac};
use crate::packet::route::RouteTable;
use crate::stats::DropReason;
use crate::tunnel::framing::Framing;

/// flannel's (and the kernel's `dstport 8472` convention for) VXLAN UDP port.
pub const DEFAULT_PORT: u16 = 8472;
/// The VNI flannel uses by default.
pub const DEFAULT_VNI: u32 = 1;
/// Bytes added in front of the inner packet: VXLAN header and Ethernet header.
pub const HEADER_LEN: usize = VXLAN_LEN + ETH_LEN;
/// Outer IPv4 (20) + UDP (8) + [`HEADER_LEN`]: what the overlay MTU gives up (flannel's 50).
pub const OVERHEAD: u32 = 20 + 8 + HEADER_LEN as u32;

const VXLAN_LEN: usize = 8;
const ETH_LEN: usize = 14;
/// The "I" flag: the VNI field is valid.
const FLAG_VNI: u8 = 0x08;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Why a datagram on the VXLAN port carried nothing for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    /// Too short, or the VNI flag is not set.
    Malformed,
    /// Another VXLAN network's frame.
    OtherVni(u32),
    /// An Ethernet frame not addressed to this node's VTEP.
    OtherMac,
    /// Not IPv4 (ARP, IPv6...): the peers' neighbour entries are permanent, so nothing else is
    /// expected on this overlay.
    NotIpv4,
}

/// The 22 bytes that go in front of an inner IPv4 packet sent to the VTEP `dst`.
pub fn header(vni: u32, dst: Mac, src: Mac) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = FLAG_VNI;
    h[4..8].copy_from_slice(&(vni << 8).to_be_bytes());
    h[8..14].copy_from_slice(&dst.0);
    h[14..20].copy_from_slice(&src.0);
    h[20..22].copy_from_slice(&ETHERTYPE_IPV4);
    h
}

/// Checks a VXLAN datagram's headers; on success the inner packet starts at [`HEADER_LEN`].
pub fn open(dgram: &[u8], vni: u32, own: Mac) -> Result<(), Foreign> {
    if dgram.len() < HEADER_LEN || dgram[0] & FLAG_VNI == 0 {
        return Err(Foreign::Malformed);
    }
    let got = u32::from_be_bytes([dgram[4], dgram[5], dgram[6], dgram[7]]) >> 8;
    if got != vni {
        return Err(Foreign::OtherVni(got));
    }
    if dgram[8..14] != own.0 {
        return Err(Foreign::OtherMac);
    }
    if dgram[20..22] != ETHERTYPE_IPV4 {
        return Err(Foreign::NotIpv4);
    }
    Ok(())
}

/// One VXLAN frame carrying a whole TCP or UDP super-packet: what a kernel VXLAN peer hands over
/// virtual links when its stack offloads segmentation (the outer datagram is never split, so a
/// receiver that is not the kernel's VXLAN driver must segment the inner packet itself).
pub use crate::tunnel::framing::SuperFrame;

/// Recognises a [`SuperFrame`]: `dgram` is one frame for this node whose inner IPv4 packet fills
/// it and is longer than one segment may be (`segment` is the size the socket reported for the
/// datagrams it coalesced, `mtu` the overlay MTU).
pub fn super_frame(dgram: &[u8], segment: usize, vni: u32, own: Mac, mtu: usize) -> Option<SuperFrame> {
    open(dgram, vni, own).ok()?;
    let inner = &dgram[HEADER_LEN..];
    if inner.len() < 20 || inner[0] >> 4 != 4 {
        return None;
    }
    let ip_header = usize::from(inner[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([inner[2], inner[3]]));
    // A super-packet's IPv4 total length is what the sender's stack wrote: the whole packet.
    if total != inner.len() || total <= mtu || ip_header < 20 || inner.len() < ip_header + 20 {
        return None;
    }
    let protocol = inner[9];
    let l4_header = match protocol {
        6 => usize::from(inner[ip_header + 12] >> 4) * 4,
        17 => 8,
        _ => return None,
    };
    if l4_header < 8 || inner.len() <= ip_header + l4_header {
        return None;
    }
    let mss = if dgram.len() > segment && segment > 0 {
        segment
    } else {
        mtu.checked_sub(ip_header + l4_header)?
    };
    (mss > 0).then_some(SuperFrame {
        protocol,
        ip_header,
        l4_header,
        mss,
    })
}

/// VXLAN framing for the tunnel: this node's VNI and VTEP MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vxlan {
    /// The VXLAN network identifier.
    pub vni: u32,
    /// This node's VTEP MAC.
    pub mac: Mac,
}

impl Framing for Vxlan {
    #[inline]
    fn header_len(&self) -> usize {
        HEADER_LEN
    }

    #[inline]
    fn write_header(&self, routes: &RouteTable, peer: Ipv4Addr, out: &mut [u8]) -> Result<(), DropReason> {
        let dst = routes.vtep(peer).ok_or(DropReason::NoRoute)?;
        out[..HEADER_LEN].copy_from_slice(&header(self.vni, dst, self.mac));
        Ok(())
    }

    #[inline]
    fn open(&self, dgram: &[u8]) -> Result<(), DropReason> {
        open(dgram, self.vni, self.mac).map_err(|_| DropReason::ForeignFrame)
    }

    #[inline]
    fn finish(&self, inner: &mut [u8]) {
        crate::packet::complete_partial_checksum(inner);
    }

    fn super_frame(&self, dgram: &[u8], segment: usize, mtu: usize) -> Option<SuperFrame> {
        super_frame(dgram, segment, self.vni, self.mac, mtu)
    }

    fn split(
        &self,
        frame: &mut [u8],
        f: SuperFrame,
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        split(frame, f, bufs, sizes, out)
    }
}

/// Cuts the inner super-packet of `frame` into segments (checksums completed) and lays them
/// out in `out` as ordinary VXLAN frames, each behind a copy of `frame`'s headers; returns the
/// frame size every one but the last has, or None when the packet does not segment. `bufs`
/// and `sizes` are room for the segments.
pub fn split(
    frame: &mut [u8],
    f: SuperFrame,
    bufs: &mut [Vec<u8>],
    sizes: &mut [usize],
    out: &mut Vec<u8>,
) -> Option<usize> {
    let (head, inner) = frame.split_at_mut(HEADER_LEN);
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
        stride.get_or_insert(HEADER_LEN + size);
    }
    stride
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
    const B: Mac = Mac([0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);

    #[test]
    fn header_matches_rfc_7348_layout() {
        let h = header(0x12_3456, B, A);
        assert_eq!(&h[..8], &[0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(&h[8..14], &B.0);
        assert_eq!(&h[14..20], &A.0);
        assert_eq!(&h[20..], &[0x08, 0x00]);
        assert_eq!(OVERHEAD, 50, "flannel's MTU arithmetic");
    }

    #[test]
    fn open_accepts_own_frames_only() {
        let mut d = header(1, A, B).to_vec();
        d.extend_from_slice(&[0x45; 20]);
        assert_eq!(open(&d, 1, A), Ok(()));
        assert_eq!(open(&d, 2, A), Err(Foreign::OtherVni(1)));
        assert_eq!(open(&d, 1, B), Err(Foreign::OtherMac));
        assert_eq!(open(&d[..21], 1, A), Err(Foreign::Malformed));
        let mut arp = d.clone();
        arp[20..22].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(open(&arp, 1, A), Err(Foreign::NotIpv4));
        let mut noflag = d.clone();
        noflag[0] = 0;
        assert_eq!(open(&noflag, 1, A), Err(Foreign::Malformed));
        // Reserved bits may be set by other senders; they are ignored, as the RFC asks.
        let mut reserved = d;
        reserved[1] = 0xff;
        reserved[7] = 0xff;
        assert_eq!(open(&reserved, 1, A), Ok(()));
    }

    #[test]
    fn super_frames_are_told_from_coalesced_runs() {
        let mut d = header(1, A, B).to_vec();
        let mut inner = vec![0u8; 3000];
        inner[0] = 0x45;
        inner[2..4].copy_from_slice(&3000u16.to_be_bytes());
        inner[9] = 6;
        inner[20 + 12] = 0x80; // TCP header of 32 bytes
        d.extend_from_slice(&inner);
        let f = super_frame(&d, 1398, 1, A, 1450).expect("a super frame");
        assert_eq!((f.protocol, f.ip_header, f.l4_header, f.mss), (6, 20, 32, 1398));
        // Without a segment size from the socket, one MTU's worth per segment.
        assert_eq!(super_frame(&d, d.len(), 1, A, 1450).map(|f| f.mss), Some(1450 - 52));
        // A run of ordinary frames (the first inner packet is small) is not one.
        let mut run = header(1, A, B).to_vec();
        let mut small = vec![0u8; 1000];
        small[0] = 0x45;
        small[2..4].copy_from_slice(&1000u16.to_be_bytes());
        small[9] = 6;
        run.extend_from_slice(&small);
        run.extend_from_slice(&run.clone());
        assert_eq!(super_frame(&run, 1022, 1, A, 1450), None);
        assert_eq!(super_frame(&d, 1398, 2, A, 1450), None, "another VNI");
        d[HEADER_LEN + 9] = 1;
        assert_eq!(super_frame(&d, 1398, 1, A, 1450), None, "ICMP is never segmented");
    }

    /// A TCP super-packet of 2,948 payload bytes in one frame, cut at 1,000 bytes a segment:
    /// three ordinary frames behind the same VXLAN header, each inner packet a valid IPv4 packet
    /// with its own length and the sequence number its offset gives.
    #[test]
    fn a_super_frame_splits_into_ordinary_frames() {
        let payload = 2_948usize;
        let mut inner = vec![0u8; 20 + 32 + payload];
        inner[0] = 0x45;
        inner[2..4].copy_from_slice(&((20 + 32 + payload) as u16).to_be_bytes());
        inner[8] = 64;
        inner[9] = 6;
        inner[12..16].copy_from_slice(&[10, 244, 2, 5]);
        inner[16..20].copy_from_slice(&[10, 244, 1, 5]);
        let c = crate::packet::checksum(&inner[..20]);
        inner[10..12].copy_from_slice(&c.to_be_bytes());
        inner[20..22].copy_from_slice(&5001u16.to_be_bytes());
        inner[22..24].copy_from_slice(&80u16.to_be_bytes());
        inner[24..28].copy_from_slice(&1_000_000u32.to_be_bytes());
        inner[20 + 12] = 0x80;
        inner[20 + 13] = 0x18;
        for (i, b) in inner[52..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut frame = header(1, A, B).to_vec();
        frame.extend_from_slice(&inner);
        let f = super_frame(&frame, frame.len(), 1, A, 1450).expect("a super frame");
        let f = SuperFrame { mss: 1_000, ..f };
        let mut bufs = vec![vec![0u8; 2048]; 8];
        let mut sizes = vec![0usize; 8];
        let mut out = Vec::new();
        let stride = split(&mut frame, f, &mut bufs, &mut sizes, &mut out).expect("splits");
        assert_eq!(stride, HEADER_LEN + 52 + 1_000);
        assert_eq!(out.len(), 3 * (HEADER_LEN + 52) + payload);
        for (k, chunk) in out.chunks(stride).enumerate() {
            assert_eq!(open(chunk, 1, A), Ok(()), "segment {k} keeps the VXLAN header");
            let m = crate::packet::parse_ipv4(&chunk[HEADER_LEN..]).expect("a valid IPv4 packet");
            assert_eq!(m.total_len, chunk.len() - HEADER_LEN);
            let seq = u32::from_be_bytes(chunk[HEADER_LEN + 24..HEADER_LEN + 28].try_into().unwrap());
            assert_eq!(seq, 1_000_000 + 1_000 * k as u32);
            assert_eq!(chunk[HEADER_LEN + 52], (1_000 * k) as u8, "payload in order");
        }
    }
}
