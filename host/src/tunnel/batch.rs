//! Grouping outgoing packets for UDP GSO: one `sendmsg` carries a run of datagrams to the same
//! peer, all of one size except possibly a shorter last one (the kernel's segmentation rule).
//! The batch names the datagrams by the buffer (slot) each was framed in, and the send gathers
//! them from there: no byte is copied into the batch.

use std::net::Ipv4Addr;

/// Most segments one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
pub const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send may carry (an IPv4 datagram's limit, with header room).
pub const MAX_BYTES: usize = 65_000;

/// A datagram of the batch: the first `len` bytes of buffer `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Which buffer.
    pub slot: usize,
    /// How many of its bytes.
    pub len: usize,
}

/// A run of datagrams for one peer.
#[derive(Debug, Default)]
pub struct GsoBatch {
    peer: Option<Ipv4Addr>,
    segment: usize,
    bytes: usize,
    closed: bool,
    parts: Vec<Part>,
}

impl GsoBatch {
    /// An empty batch with room for a full run.
    pub fn new() -> Self {
        GsoBatch {
            parts: Vec::with_capacity(MAX_SEGMENTS),
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
                    && self.parts.len() < MAX_SEGMENTS
                    && self.bytes + len <= MAX_BYTES
            }
        }
    }

    /// Appends the datagram in the first `len` bytes of buffer `slot`; the caller checked
    /// [`GsoBatch::accepts`]. A datagram shorter than the segment size must be the last one.
    pub fn push(&mut self, peer: Ipv4Addr, slot: usize, len: usize) {
        if self.peer.is_none() {
            self.peer = Some(peer);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.bytes += len;
        self.parts.push(Part { slot, len });
    }

    /// The batch's peer, segment size, bytes in all and datagrams, if it holds anything.
    pub fn parts(&self) -> Option<(Ipv4Addr, usize, usize, &[Part])> {
        self.peer.map(|p| (p, self.segment, self.bytes, self.parts.as_slice()))
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.peer.is_none()
    }

    /// Empties the batch for reuse, keeping its allocation.
    pub fn clear(&mut self) {
        self.peer = None;
        self.segment = 0;
        self.bytes = 0;
        self.closed = false;
        self.parts.clear();
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
        for slot in 0..3 {
            assert!(b.accepts(A, 1400));
            b.push(A, slot, 1400);
        }
        assert!(!b.accepts(B, 1400), "another peer needs another send");
        assert!(!b.accepts(A, 1500), "a longer datagram cannot follow");
        assert!(b.accepts(A, 100), "a shorter one may end the run");
        b.push(A, 7, 100);
        assert!(!b.accepts(A, 100), "nothing after the short one");
        let (peer, seg, bytes, parts) = b.parts().unwrap();
        assert_eq!((peer, seg, bytes, parts.len()), (A, 1400, 4300, 4));
        assert_eq!(parts[3], Part { slot: 7, len: 100 });
        b.clear();
        assert!(b.parts().is_none() && b.is_empty());
        assert!(b.accepts(B, 9000));
    }

    #[test]
    fn limits_are_respected() {
        let mut b = GsoBatch::new();
        for slot in 0..MAX_SEGMENTS {
            assert!(b.accepts(A, 64));
            b.push(A, slot, 64);
        }
        assert!(!b.accepts(A, 64));
        let mut big = GsoBatch::new();
        let mut n = 0;
        while big.accepts(A, 1472) {
            big.push(A, n, 1472);
            n += 1;
        }
        assert_eq!(n, MAX_BYTES / 1472);
    }
}
