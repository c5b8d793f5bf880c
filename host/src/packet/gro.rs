//! Receive offload in userspace, sans I/O: consecutive TCP segments received from the underlay
//! become one super-packet for the TUN device, planned over the buffer they were received into.
//!
//! Written one by one, every segment runs the receiving stack on its own. Copying them into one
//! buffer first (what `tun-rs`'s coalescer does, after the caller copied each segment into a
//! buffer of its own) costs two copies of every byte. Here nothing moves: the first segment's
//! headers are patched to describe the whole, and the device gets one `writev` of the virtio
//! header, that segment, and the later segments' payloads where they lie ([`Gro::parts`]).
//!
//! Segments merge as the kernel's own GRO merges them: one flow, the same TOS, TTL, DF, ack,
//! window and options, consecutive sequence numbers, no flag but ACK (PSH ends a super-packet),
//! every payload the first one's size but a shorter last. The super-packet goes in with a
//! partial checksum, which the kernel trusts, so every merged segment's checksum is checked
//! first: a damaged one is written alone, untouched, and the kernel drops it as before.

use super::{fold64, sum_wide};

/// Bytes of the virtio header the device expects in front of every packet.
pub const VNET_HDR_LEN: usize = 10;
/// Most segments in one super-packet.
pub const MAX_SEGMENTS: usize = 64;
/// Flows merged at once; one more closes the oldest.
const MAX_OPEN: usize = 8;
/// An IPv4 packet's largest total length.
const MAX_IP_LEN: usize = 65_535;
/// The one IPv4 header length merged (options are rare and would need comparing).
const IP_HEADER: usize = 20;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const NONE: usize = usize::MAX;

/// A packet (or a payload) inside the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Offset of its first byte.
    pub start: usize,
    /// Its length.
    pub len: usize,
}

impl Span {
    fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start..self.start + self.len]
    }
}

/// One write into the device: a packet alone, or the head of a super-packet.
#[derive(Debug, Clone)]
struct Merge {
    first: Span,
    /// IPv4 + TCP header bytes of the first segment (0: not mergeable, written alone).
    head: usize,
    /// Payload bytes of the first segment: every later one's size but the last's.
    mss: usize,
    count: usize,
    /// Payload bytes in all.
    payload: usize,
    next_seq: u32,
    /// Whether the first segment's checksum was checked (only needed once a second joins).
    checked: bool,
    psh: bool,
    /// The later segments' payloads, a list through [`Link::next`].
    links: usize,
    last: usize,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    payload: Span,
    next: usize,
}

/// A TCP segment as far as merging cares.
#[derive(Debug, Clone, Copy)]
struct Segment {
    head: usize,
    payload: usize,
    seq: u32,
    flags: u8,
}

/// The plan for one received run: which packets go into the device as what, in order.
#[derive(Debug, Default)]
pub struct Gro {
    merges: Vec<Merge>,
    links: Vec<Link>,
    /// The merges still taking segments, oldest first (at most `MAX_OPEN`).
    open: Vec<usize>,
}

impl Gro {
    /// An empty plan; its room is kept across runs.
    pub fn new() -> Self {
        Gro::default()
    }

    /// Forgets the plan, keeping its allocations.
    pub fn clear(&mut self) {
        self.merges.clear();
        self.links.clear();
        self.open.clear();
    }

    /// Writes into the device in the plan.
    pub fn len(&self) -> usize {
        self.merges.len()
    }

    /// Whether the plan holds nothing.
    pub fn is_empty(&self) -> bool {
        self.merges.is_empty()
    }

    /// Adds the packet at `at` in `buf` (a whole IPv4 packet, checked and ready for the device).
    /// Packets of one flow keep their order: a write holds only packets later than every
    /// packet of its flow in earlier writes.
    pub fn push(&mut self, buf: &[u8], at: Span) {
        let pkt = at.of(buf);
        let Some(seg) = segment(pkt) else {
            // A FIN, a bare ACK, anything else of a flow being merged: the merge must not take
            // later segments past it.
            if pkt.len() >= IP_HEADER + 4 {
                self.close_flow(buf, pkt);
            }
            return self.start(at, None);
        };
        let Some(slot) = self
            .open
            .iter()
            .position(|&m| same_flow(self.merges[m].first.of(buf), pkt))
        else {
            return self.start(at, Some(seg));
        };
        let m = self.open[slot];
        if self.joins(buf, m, pkt, seg) {
            self.append(m, at, seg);
        } else {
            // Out of sequence, a bigger segment, new options or a damaged one: that flow's
            // super-packet ends here and this segment starts the next.
            self.open.remove(slot);
            self.start(at, Some(seg));
        }
    }

    /// Whether `pkt` can extend merge `m` (checking checksums as the merge grows past one).
    fn joins(&mut self, buf: &[u8], m: usize, pkt: &[u8], seg: Segment) -> bool {
        let g = &self.merges[m];
        let fits = seg.seq == g.next_seq
            && seg.payload <= g.mss
            && g.count < MAX_SEGMENTS
            && g.head + g.payload + seg.payload <= MAX_IP_LEN
            && compatible(g.first.of(buf), pkt, seg.head);
        if !fits || !tcp_sum_ok(pkt) {
            return false;
        }
        if !g.checked {
            if !tcp_sum_ok(g.first.of(buf)) {
                return false;
            }
            self.merges[m].checked = true;
        }
        true
    }

    fn close_flow(&mut self, buf: &[u8], pkt: &[u8]) {
        let merges = &self.merges;
        self.open.retain(|&m| !same_flow(merges[m].first.of(buf), pkt));
    }

    fn start(&mut self, at: Span, seg: Option<Segment>) {
        let i = self.merges.len();
        let (head, mss, seq, psh) = match seg {
            Some(s) => (
                s.head,
                s.payload,
                s.seq.wrapping_add(s.payload as u32),
                s.flags & TCP_PSH != 0,
            ),
            None => (0, 0, 0, false),
        };
        self.merges.push(Merge {
            first: at,
            head,
            mss,
            count: 1,
            payload: mss,
            next_seq: seq,
            checked: false,
            psh,
            links: NONE,
            last: NONE,
        });
        if seg.is_some() && !psh {
            if self.open.len() == MAX_OPEN {
                self.open.remove(0);
            }
            self.open.push(i);
        }
    }

    fn append(&mut self, m: usize, at: Span, seg: Segment) {
        let link = self.links.len();
        self.links.push(Link {
            payload: Span {
                start: at.start + seg.head,
                len: seg.payload,
            },
            next: NONE,
        });
        let g = &mut self.merges[m];
        match g.last {
            NONE => g.links = link,
            last => self.links[last].next = link,
        }
        g.last = link;
        g.count += 1;
        g.payload += seg.payload;
        g.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        g.psh |= seg.flags & TCP_PSH != 0;
        if seg.payload < g.mss || g.psh || g.count == MAX_SEGMENTS {
            self.open.retain(|&o| o != m);
        }
    }

    /// Patches write `i`'s first packet in `buf` to describe the whole super-packet (a packet
    /// alone is left as it is) and returns the virtio header to write in front of it.
    pub fn seal(&self, buf: &mut [u8], i: usize) -> [u8; VNET_HDR_LEN] {
        let g = &self.merges[i];
        if g.count == 1 {
            // Complete as received: no offload asked for, the kernel checks it as usual.
            return [0; VNET_HDR_LEN];
        }
        let pkt = &mut buf[g.first.start..g.first.start + g.first.len];
        let total = g.head + g.payload;
        pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        pkt[10..12].copy_from_slice(&[0, 0]);
        let ip = !fold64(sum_wide(&pkt[..IP_HEADER], 0));
        pkt[10..12].copy_from_slice(&ip.to_be_bytes());
        if g.psh {
            pkt[IP_HEADER + 13] |= TCP_PSH;
        }
        // A partial checksum: the pseudo-header's sum alone, which the kernel completes.
        let pseudo = sum_wide(&pkt[12..20], 6 + (total - IP_HEADER) as u64);
        pkt[IP_HEADER + 16..IP_HEADER + 18].copy_from_slice(&fold64(pseudo).to_be_bytes());
        vnet_header(g.head as u16, g.mss as u16)
    }

    /// The pieces of write `i`, in order: its first packet whole, then each later payload.
    pub fn parts(&self, i: usize) -> impl Iterator<Item = Span> + '_ {
        let g = &self.merges[i];
        let mut link = g.links;
        std::iter::once(g.first).chain(std::iter::from_fn(move || {
            let l = self.links.get(link)?;
            link = l.next;
            Some(l.payload)
        }))
    }

    /// Segments in write `i`.
    pub fn count(&self, i: usize) -> usize {
        self.merges[i].count
    }
}

/// The virtio header of a TCPv4 super-packet: segment it at `mss`, complete the checksum that
/// starts after the IPv4 header. Fields in the host's byte order, as the device reads them.
fn vnet_header(head: u16, mss: u16) -> [u8; VNET_HDR_LEN] {
    const NEEDS_CSUM: u8 = 1;
    const GSO_TCPV4: u8 = 1;
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = NEEDS_CSUM;
    h[1] = GSO_TCPV4;
    h[2..4].copy_from_slice(&head.to_ne_bytes());
    h[4..6].copy_from_slice(&mss.to_ne_bytes());
    h[6..8].copy_from_slice(&(IP_HEADER as u16).to_ne_bytes());
    h[8..10].copy_from_slice(&16u16.to_ne_bytes());
    h
}

/// `pkt` as a mergeable TCP segment: IPv4 without options or fragmentation, exactly its total
/// length, ACK (and maybe PSH) only, some payload.
fn segment(pkt: &[u8]) -> Option<Segment> {
    if pkt.len() < IP_HEADER + 20 || pkt[0] != 0x45 || pkt[9] != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    let fragment = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0;
    if total != pkt.len() || fragment {
        return None;
    }
    let tcp = &pkt[IP_HEADER..];
    let head = IP_HEADER + usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    if head < IP_HEADER + 20 || head >= total || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    Some(Segment {
        head,
        payload: total - head,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags,
    })
}

/// Same addresses and ports.
fn same_flow(a: &[u8], b: &[u8]) -> bool {
    a[12..IP_HEADER + 4] == b[12..IP_HEADER + 4]
}

/// Whether two segments of one flow may share a super-packet's headers: TOS, DF, TTL, ack,
/// header length, window and options all equal (`b` is a [`segment`] with `head` header bytes).
fn compatible(a: &[u8], b: &[u8], head: usize) -> bool {
    let (ta, tb) = (&a[IP_HEADER..], &b[IP_HEADER..]);
    a[1] == b[1]
        && a[6] & 0x40 == b[6] & 0x40
        && a[8] == b[8]
        && ta[8..13] == tb[8..13]
        && ta[14..16] == tb[14..16]
        && a.len() > head
        && a[IP_HEADER + 20..head] == b[IP_HEADER + 20..head]
}

/// Whether a TCP segment's checksum is right.
fn tcp_sum_ok(pkt: &[u8]) -> bool {
    let tcp_len = (pkt.len() - IP_HEADER) as u64;
    let sum = sum_wide(&pkt[IP_HEADER..], sum_wide(&pkt[12..20], 6 + tcp_len));
    fold64(sum) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{build_tcp, build_udp, tcp_flag};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

    /// A data segment of flow `sport` at `seq` with `len` bytes of payload (its bytes say where
    /// they sit in the stream).
    fn seg(sport: u16, seq: u32, len: usize, flags: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
        let mut p = build_tcp(A, sport, B, 80, flags, 63, &data);
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        fix_tcp_sum(&mut p);
        p
    }

    fn fix_tcp_sum(p: &mut [u8]) {
        p[36] = 0;
        p[37] = 0;
        let c = !fold64(sum_wide(&p[20..], sum_wide(&p[12..20], 6 + (p.len() - 20) as u64)));
        p[36..38].copy_from_slice(&c.to_be_bytes());
    }

    /// Lays packets out back to back (with a gap, as framing headers leave) and plans them.
    fn plan(pkts: &[Vec<u8>]) -> (Vec<u8>, Gro) {
        let mut buf = Vec::new();
        let mut spans = Vec::new();
        for p in pkts {
            buf.extend_from_slice(&[0xee; 8]);
            spans.push(Span {
                start: buf.len(),
                len: p.len(),
            });
            buf.extend_from_slice(p);
        }
        let mut g = Gro::new();
        for s in spans {
            g.push(&buf, s);
        }
        (buf, g)
    }

    /// What the device gets: each write's virtio header and bytes, concatenated.
    fn writes(buf: &mut [u8], g: &Gro) -> Vec<([u8; VNET_HDR_LEN], Vec<u8>)> {
        (0..g.len())
            .map(|i| {
                let h = g.seal(buf, i);
                let bytes = g.parts(i).flat_map(|s| s.of(buf).to_vec()).collect();
                (h, bytes)
            })
            .collect()
    }

    /// Cuts a super-packet back into segments as the kernel would (headers copied, lengths,
    /// sequence numbers and checksums redone), for comparing with what went in.
    fn resegment(h: &[u8; VNET_HDR_LEN], p: &[u8]) -> Vec<Vec<u8>> {
        if h[1] == 0 {
            return vec![p.to_vec()];
        }
        let head = usize::from(u16::from_ne_bytes([h[2], h[3]]));
        let mss = usize::from(u16::from_ne_bytes([h[4], h[5]]));
        let seq0 = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
        let chunks: Vec<&[u8]> = p[head..].chunks(mss).collect();
        let last = chunks.len() - 1;
        chunks
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let mut s = p[..head].to_vec();
                s.extend_from_slice(c);
                let total = s.len() as u16;
                s[2..4].copy_from_slice(&total.to_be_bytes());
                s[10..12].copy_from_slice(&[0, 0]);
                let ip = !fold64(sum_wide(&s[..20], 0));
                s[10..12].copy_from_slice(&ip.to_be_bytes());
                s[24..28].copy_from_slice(&seq0.wrapping_add((k * mss) as u32).to_be_bytes());
                if k != last {
                    s[33] &= !TCP_PSH;
                }
                fix_tcp_sum(&mut s);
                s
            })
            .collect()
    }

    #[test]
    fn a_run_of_one_flow_becomes_one_write() {
        let pkts: Vec<_> = (0..10)
            .map(|k| seg(1000, 5000 + k * 1400, 1400, tcp_flag::ACK))
            .collect();
        let (mut buf, g) = plan(&pkts);
        assert_eq!(g.len(), 1);
        assert_eq!(g.count(0), 10);
        let w = writes(&mut buf, &g);
        let (h, p) = &w[0];
        assert_eq!((h[0], h[1]), (1, 1), "partial checksum, TCPv4 segmentation");
        assert_eq!(u16::from_ne_bytes([h[2], h[3]]), 40);
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 1400);
        assert_eq!(p.len(), 40 + 14_000);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(
            fold64(sum_wide(&p[..20], 0)),
            0xffff,
            "the IPv4 header checksum is redone"
        );
        assert_eq!(resegment(h, p), pkts);
    }

    #[test]
    fn a_short_or_pushed_segment_ends_the_super_packet() {
        let pkts = vec![
            seg(1000, 0, 1000, tcp_flag::ACK),
            seg(1000, 1000, 1000, tcp_flag::ACK),
            seg(1000, 2000, 300, tcp_flag::ACK),
            seg(1000, 2300, 1000, tcp_flag::ACK),
            seg(1000, 3300, 1000, tcp_flag::ACK | TCP_PSH),
            seg(1000, 4300, 1000, tcp_flag::ACK),
        ];
        let (mut buf, g) = plan(&pkts);
        assert_eq!((0..g.len()).map(|i| g.count(i)).collect::<Vec<_>>(), vec![3, 2, 1]);
        let w = writes(&mut buf, &g);
        assert_eq!(w[1].1[33] & TCP_PSH, TCP_PSH, "the push flag stays on the whole");
        let back: Vec<_> = w.iter().flat_map(|(h, p)| resegment(h, p)).collect();
        assert_eq!(back, pkts);
    }

    #[test]
    fn interleaved_flows_merge_apart_and_keep_their_order() {
        let mut pkts = Vec::new();
        for k in 0..6u32 {
            pkts.push(seg(1000, k * 500, 500, tcp_flag::ACK));
            pkts.push(seg(2000, 7 + k * 500, 500, tcp_flag::ACK));
        }
        let (mut buf, g) = plan(&pkts);
        assert_eq!(g.len(), 2);
        let w = writes(&mut buf, &g);
        let back: Vec<_> = w.iter().flat_map(|(h, p)| resegment(h, p)).collect();
        let (one, two): (Vec<_>, Vec<_>) = pkts.iter().cloned().partition(|p| p[21] == (1000u16 as u8));
        assert_eq!(back, [one, two].concat());
    }

    #[test]
    fn what_may_not_merge_is_written_alone_and_unchanged() {
        let mut bad_sum = seg(1000, 1000, 1000, tcp_flag::ACK);
        bad_sum[100] ^= 0xff;
        let mut window = seg(1000, 2000, 1000, tcp_flag::ACK);
        window[35] ^= 1;
        fix_tcp_sum(&mut window);
        let mut options = seg(1000, 0, 1000, tcp_flag::ACK);
        options[32] = 6 << 4;
        let pkts = vec![
            seg(1000, 0, 1000, tcp_flag::ACK),
            bad_sum,
            seg(1000, 1000, 1000, tcp_flag::ACK),
            window,
            seg(1000, 5000, 1000, tcp_flag::ACK),
            seg(1000, 6000, 1000, tcp_flag::FIN | tcp_flag::ACK),
            build_udp(A, 53, B, 53, 63, &[1; 100]),
            seg(1000, 6000, 0, tcp_flag::ACK),
            options,
        ];
        let (mut buf, g) = plan(&pkts);
        let w = writes(&mut buf, &g);
        assert_eq!(
            (0..g.len()).map(|i| g.count(i)).collect::<Vec<_>>(),
            vec![1, 1, 1, 1, 1, 1, 1, 1, 1]
        );
        for (i, (h, p)) in w.iter().enumerate() {
            assert_eq!(h, &[0; VNET_HDR_LEN]);
            assert_eq!(p, &pkts[i], "packet {i} goes in as received");
        }
    }

    #[test]
    fn a_super_packet_stays_within_an_ipv4_length() {
        let pkts: Vec<_> = (0..60).map(|k| seg(1000, k * 8000, 8000, tcp_flag::ACK)).collect();
        let (mut buf, g) = plan(&pkts);
        let w = writes(&mut buf, &g);
        assert!(w.iter().all(|(_, p)| p.len() <= MAX_IP_LEN));
        let back: Vec<_> = w.iter().flat_map(|(h, p)| resegment(h, p)).collect();
        assert_eq!(back, pkts);
    }

    proptest! {
        /// Whatever arrives (flows interleaved, segments repeated, lost, reordered, cut short,
        /// damaged), cutting the writes back into segments gives every packet exactly once,
        /// and each flow's packets in the order they came.
        #[test]
        fn the_device_gets_every_packet_once_in_flow_order(
            ops in proptest::collection::vec((0u16..3, 0u32..6, prop_oneof![Just(1200usize), 1usize..1300], any::<bool>(), 0u8..8), 1..80)
        ) {
            let mut next = [0u32; 3];
            let mut pkts = Vec::new();
            for (flow, skip, len, push, noise) in ops {
                let f = flow as usize;
                let seq = match skip { 0 => next[f].wrapping_sub(1200), 1 => next[f].wrapping_add(7), _ => next[f] };
                let flags = match (push, noise) {
                    (_, 1) => tcp_flag::ACK | tcp_flag::FIN,
                    (true, _) => tcp_flag::ACK | TCP_PSH,
                    _ => tcp_flag::ACK,
                };
                let len = if noise == 2 { 0 } else { len };
                let mut p = seg(1000 + flow, seq, len, flags);
                if noise == 0 { let n = p.len(); p[n - 1] ^= 0x5a; }
                next[f] = seq.wrapping_add(len as u32);
                pkts.push(p);
            }
            let (mut buf, g) = plan(&pkts);
            let w = writes(&mut buf, &g);
            let back: Vec<_> = w.iter().flat_map(|(h, p)| resegment(h, p)).collect();
            for flow in 0..3u16 {
                let want: Vec<_> = pkts.iter().filter(|p| p[21] == (1000 + flow) as u8).cloned().collect();
                let got: Vec<_> = back.iter().filter(|p| p[21] == (1000 + flow) as u8).cloned().collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
