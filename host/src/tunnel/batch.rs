//! Grouping outgoing packets for UDP GSO: one message carries a run of datagrams to the same
//! peer, all of one size except possibly a shorter last one (the kernel's segmentation rule),
//! and one `sendmmsg` carries every run of a turn ([`Runs`]), so traffic GSO cannot coalesce
//! (several peers, sizes that keep changing) still costs one system call per flush, not one per
//! run. The batch names the datagrams by the buffer (slot) each was framed in, and the send
//! gathers them from there: no byte is copied into the batch.

use std::net::Ipv4Addr;

/// Most segments one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
pub const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send may carry (an IPv4 datagram's limit, with header room).
pub const MAX_BYTES: usize = 65_000;

/// Most runs one flush sends (one message each of one `sendmmsg`).
pub const MAX_RUNS: usize = 32;

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

/// Runs of datagrams for one flush. Only the last run takes more datagrams, so each peer's
/// datagrams leave in the order they came.
#[derive(Debug)]
pub struct Runs {
    runs: Vec<GsoBatch>,
    open: usize,
}

impl Default for Runs {
    fn default() -> Self {
        Self::new()
    }
}

impl Runs {
    /// Empty, with room for [`MAX_RUNS`] full runs.
    pub fn new() -> Self {
        Runs {
            runs: (0..MAX_RUNS).map(|_| GsoBatch::new()).collect(),
            open: 0,
        }
    }

    /// Adds the datagram in the first `len` bytes of buffer `slot` for `peer`; false when it
    /// needs a new run and every run is taken (flush, then push it again).
    pub fn push(&mut self, peer: Ipv4Addr, slot: usize, len: usize) -> bool {
        if let Some(last) = self.open.checked_sub(1).map(|i| &mut self.runs[i]) {
            if last.accepts(peer, len) {
                last.push(peer, slot, len);
                return true;
            }
        }
        let Some(next) = self.runs.get_mut(self.open) else {
            return false;
        };
        next.push(peer, slot, len);
        self.open += 1;
        true
    }

    /// The runs, in the order they were started.
    pub fn runs(&self) -> &[GsoBatch] {
        &self.runs[..self.open]
    }

    /// Whether no datagram waits.
    pub fn is_empty(&self) -> bool {
        self.open == 0
    }

    /// Empties every run, keeping the allocations.
    pub fn clear(&mut self) {
        for r in &mut self.runs[..self.open] {
            r.clear();
        }
        self.open = 0;
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

    #[test]
    fn runs_follow_peers_and_sizes_in_arrival_order() {
        let mut r = Runs::new();
        assert!(r.is_empty());
        // A to B to A again: three runs, so A's second datagram never overtakes B's.
        for (slot, (peer, len)) in [(A, 100), (A, 100), (B, 100), (A, 100), (A, 300), (A, 50)]
            .into_iter()
            .enumerate()
        {
            assert!(r.push(peer, slot, len));
        }
        let shape: Vec<(Ipv4Addr, usize, Vec<usize>)> = r
            .runs()
            .iter()
            .filter_map(|g| g.parts())
            .map(|(p, seg, _, parts)| (p, seg, parts.iter().map(|x| x.slot).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (A, 100, vec![0, 1]),
                (B, 100, vec![2]),
                (A, 100, vec![3]),
                (A, 300, vec![4, 5])
            ],
            "a longer datagram starts a run, a shorter one ends one"
        );
        r.clear();
        assert!(r.is_empty() && r.runs().is_empty());
    }

    #[test]
    fn a_full_set_of_runs_asks_for_a_flush() {
        let mut r = Runs::new();
        for slot in 0..MAX_RUNS {
            let peer = if slot % 2 == 0 { A } else { B };
            assert!(r.push(peer, slot, 64));
        }
        assert!(!r.push(A, 99, 64), "a new run past the last must wait for a flush");
        assert!(r.push(B, 99, 64), "the last run still takes its own peer's datagrams");
        assert_eq!(r.runs().len(), MAX_RUNS);
    }
}
