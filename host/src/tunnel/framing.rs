//! How inner packets travel on the underlay: the framing codec, sans I/O. The tunnel's loops
//! are generic over it, so a framing is a type, not a `match` arm in every loop: flannel's
//! `udp` ([`Raw`]: the bare inner packet is the datagram) and VXLAN as the kernel frames it
//! ([`crate::backend::vxlan::wire::Vxlan`]); a third (WireGuard) would be a third type.

use std::net::Ipv4Addr;

use crate::packet::route::RouteTable;
use crate::stats::DropReason;

/// A framing of inner IPv4 packets into UDP datagrams.
pub trait Framing: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// Bytes in front of every inner packet.
    fn header_len(&self) -> usize;

    /// Writes the header of a datagram for `peer` into `out` (`header_len` bytes); the reason
    /// to drop when the peer cannot be framed for (it published no VTEP MAC).
    fn write_header(&self, routes: &RouteTable, peer: Ipv4Addr, out: &mut [u8]) -> Result<(), DropReason>;

    /// Checks a received datagram's header; on success the inner packet starts at `header_len`.
    fn open(&self, dgram: &[u8]) -> Result<(), DropReason>;

    /// Completes an inner packet the sender left unfinished (a kernel VXLAN peer's partial
    /// checksums); nothing for framings whose peers finish their packets.
    fn finish(&self, _inner: &mut [u8]) {}

    /// When one received datagram carries a whole super-packet to be segmented first (a kernel
    /// VXLAN peer over virtual links), how to cut it: see [`crate::backend::vxlan::wire`].
    fn super_frame(&self, _dgram: &[u8], _segment: usize, _mtu: usize) -> Option<SuperFrame> {
        None
    }

    /// Cuts such a frame into ordinary frames laid out back to back in `out`; returns the size
    /// of every frame but the last. `bufs`/`sizes` are room for the segments.
    fn split(
        &self,
        _frame: &mut [u8],
        _f: SuperFrame,
        _bufs: &mut [Vec<u8>],
        _sizes: &mut [usize],
        _out: &mut Vec<u8>,
    ) -> Option<usize> {
        None
    }
}

/// A received frame whose inner packet is a TCP or UDP super-packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperFrame {
    /// Inner IP protocol (6 or 17).
    pub protocol: u8,
    /// Inner IPv4 header length.
    pub ip_header: usize,
    /// Inner TCP/UDP header length.
    pub l4_header: usize,
    /// Payload bytes per segment.
    pub mss: usize,
}

/// flannel's `udp` framing: the datagram is the inner packet, nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Raw;

impl Framing for Raw {
    #[inline]
    fn header_len(&self) -> usize {
        0
    }

    #[inline]
    fn write_header(&self, _routes: &RouteTable, _peer: Ipv4Addr, _out: &mut [u8]) -> Result<(), DropReason> {
        Ok(())
    }

    #[inline]
    fn open(&self, dgram: &[u8]) -> Result<(), DropReason> {
        if dgram.is_empty() {
            // An empty datagram carries no packet at all.
            return Err(DropReason::Malformed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_framing_adds_nothing_and_refuses_empty_datagrams() {
        let t = RouteTable::new("10.244.0.0/16".parse().unwrap(), 24, None);
        assert_eq!(Raw.header_len(), 0);
        assert_eq!(Raw.write_header(&t, [1, 2, 3, 4].into(), &mut []), Ok(()));
        assert_eq!(Raw.open(b""), Err(DropReason::Malformed));
        assert_eq!(Raw.open(b"\x45"), Ok(()));
        assert_eq!(Raw.super_frame(b"\x45", 1, 1500), None);
    }
}
