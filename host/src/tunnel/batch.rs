//! Grouping outgoing packets for UDP GSO: one `sendmsg` carries a run of datagrams to the same
//! peer, all of one size except possibly a shorter last one (the kernel's segmentation rule).

use std::net::Ipv4Addr;

/// Most segments one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
pub const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send may carry (an IPv4 datagram's limit, with header room).
pub const MAX_BYTES: usize = 65_000;

/// A run of datagrams for one peer, packed back to back.
#[derive(Debug, Default)]
pub struct GsoBatch {
    peer: Option<Ipv4Addr>,
    segment: usize,
    count: usize,
    closed: bool,
    buf: Vec<u8>,
}

impl GsoBatch {
    /// An empty batch with room for a full run.
    pub fn new() -> Self {
        GsoBatch {
            buf: Vec::with_capacity(MAX_BYTES),
            ..Default::default()
        }
    }

    /// Whether a `len`-byte datagram for `peer` can join this batch.
    pub fn accepts(&self, peer: Ipv4Addr, len: usize) -> bool {
        match self.peer {
            None => true,
            Some(p) => {
                p == peer
                    && !self.closed
                    && len <= self.segment
                    && self.count < MAX_SEGMENTS
                    && self.buf.len() + len <= MAX_BYTES
            }
        }
    }

    /// Appends a datagram; the caller checked [`GsoBatch::accepts`]. A datagram shorter than the
    /// segment size must be the last one.
    pub fn push(&mut self, peer: Ipv4Addr, pkt: &[u8]) {
        self.push_parts(peer, &[], pkt);
    }

    /// Appends one datagram made of `prefix` (an encapsulation header) then `pkt`; the caller
    /// checked [`GsoBatch::accepts`] for their total length.
    pub fn push_parts(&mut self, peer: Ipv4Addr, prefix: &[u8], pkt: &[u8]) {
        let len = prefix.len() + pkt.len();
        if self.peer.is_none() {
            self.peer = Some(peer);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.buf.extend_from_slice(prefix);
        self.buf.extend_from_slice(pkt);
        self.count += 1;
    }

    /// The batch's peer, segment size, datagram count and bytes, if it holds anything.
    pub fn parts(&self) -> Option<(Ipv4Addr, usize, usize, &[u8])> {
        self.peer.map(|p| (p, self.segment, self.count, self.buf.as_slice()))
    }

    /// Empties the batch for reuse, keeping its allocation.
    pub fn clear(&mut self) {
        self.peer = None;
        self.segment = 0;
        self.count = 0;
        self.closed = false;
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    #[test]
    fn equal_segments_to_one_peer_batch() {
        let mut b = GsoBatch::new();
        for _ in 0..3 {
            assert!(b.accepts(A, 1400));
            b.push(A, &[7u8; 1400]);
        }
        assert!(!b.accepts(B, 1400), "another peer needs another send");
        assert!(!b.accepts(A, 1500), "a longer datagram cannot follow");
        assert!(b.accepts(A, 100), "a shorter one may end the run");
        b.push(A, &[1u8; 100]);
        assert!(!b.accepts(A, 100), "nothing after the short one");
        let (peer, seg, count, bytes) = b.parts().unwrap();
        assert_eq!((peer, seg, count, bytes.len()), (A, 1400, 4, 4300));
        b.clear();
        assert!(b.parts().is_none());
        assert!(b.accepts(B, 9000));
    }

    #[test]
    fn limits_are_respected() {
        let mut b = GsoBatch::new();
        for _ in 0..MAX_SEGMENTS {
            assert!(b.accepts(A, 64));
            b.push(A, &[0u8; 64]);
        }
        assert!(!b.accepts(A, 64));
        let mut big = GsoBatch::new();
        let mut n = 0;
        while big.accepts(A, 1472) {
            big.push(A, &[0u8; 1472]);
            n += 1;
        }
        assert_eq!(n, MAX_BYTES / 1472);
    }
}
