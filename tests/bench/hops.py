"""Median time of each crossing of an idle ping, from four captures (see hops.sh).

usage: hops.py udp|vxlan <node1 underlay> <node1 TUN> <node2 underlay> <node2 TUN>
Each echo request and reply is found by its ICMP type and sequence number: at a fixed offset
inside the TUN device's raw IP packets, and inside the encapsulation on the underlay.
"""
import statistics
import struct
import sys

ECHO_REPLY, ECHO_REQUEST = 0, 8


def first_seen(path, offset):
    """(ICMP type, sequence) -> the capture time of its first packet, in seconds."""
    seen = {}
    with open(path, "rb") as f:
        f.read(24)  # the pcap file header
        while True:
            h = f.read(16)
            if len(h) < 16:
                return seen
            sec, frac, caplen, _ = struct.unpack("<IIII", h)
            pkt = f.read(caplen)
            if len(pkt) < offset + 8 or pkt[offset] not in (ECHO_REPLY, ECHO_REQUEST):
                continue
            seq = struct.unpack(">H", pkt[offset + 6 : offset + 8])[0]
            seen.setdefault((pkt[offset], seq), sec + frac / 1e9)


def main():
    framing, u1, t1, u2, t2 = sys.argv[1:6]
    # Ethernet + IPv4 + UDP, then VXLAN + inner Ethernet, then the inner IPv4 header.
    under = 14 + 20 + 8 + (8 + 14 if framing == "vxlan" else 0) + 20
    e1, w1, e2, w2 = first_seen(u1, under), first_seen(t1, 20), first_seen(u2, under), first_seen(t2, 20)
    rq, rp = ECHO_REQUEST, ECHO_REPLY
    hops = [
        ("node 1 out: TUN -> underlay (request)", w1, rq, e1, rq),
        ("wire", e1, rq, e2, rq),
        ("node 2 in: underlay -> TUN (request)", e2, rq, w2, rq),
        ("node 2 pod: request -> reply on TUN", w2, rq, w2, rp),
        ("node 2 out: TUN -> underlay (reply)", w2, rp, e2, rp),
        ("wire", e2, rp, e1, rp),
        ("node 1 in: underlay -> TUN (reply)", e1, rp, w1, rp),
        ("round trip, node 1's TUN to TUN", w1, rq, w1, rp),
    ]
    seqs = [s for (t, s) in w1 if t == rq]
    print(f"{'crossing':42s} {'n':>5s} {'median us':>10s} {'p90 us':>8s}")
    for name, a, ta, b, tb in hops:
        d = sorted((b[(tb, s)] - a[(ta, s)]) * 1e6 for s in seqs if (ta, s) in a and (tb, s) in b)
        if d:
            print(f"{name:42s} {len(d):5d} {statistics.median(d):10.1f} {d[int(len(d) * 0.9)]:8.1f}")


if __name__ == "__main__":
    main()
