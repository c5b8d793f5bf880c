#!/usr/bin/env bash
# Where an idle ping's time goes, crossing by crossing: two Weft nodes, a ping every 5 ms from
# a pod on node 1 to a pod on node 2, tcpdump on each node's TUN device and underlay, and the
# median time of each crossing (the TUN capture sees a packet when the kernel queues it to the
# agent, or when the agent writes it; the underlay capture when it leaves or arrives).
#
#   sudo tests/bench/hops.sh                        # the udp backend, 200 pings
#   sudo BACKEND='{"Type":"vxlan","Userspace":true}' N=500 tests/bench/hops.sh
#   sudo PIN_CPU=0 tests/bench/hops.sh              # agents and ping all on CPU 0: what the
#                                                   # round trip costs without cross-CPU wake-ups
set -euo pipefail
SECS=1
source "$(dirname "$0")/lib.sh"
command -v tcpdump >/dev/null || { echo "missing tcpdump (scripts/deps installs it)" >&2; exit 1; }
PIN=()
if [[ -n "${PIN_CPU:-}" ]]; then
  PIN=(taskset -c "$PIN_CPU")
  printf '#!/bin/sh\nexec taskset -c %s %s "$@"\n' "$PIN_CPU" "$WEFT" > "$TMP/weft-pinned"
  chmod +x "$TMP/weft-pinned"; WEFT=$TMP/weft-pinned
fi
setup_weft h "${BACKEND:-udp}"
DEV=$(sed -n 's/.*device=\([^ ]*\).*/\1/p' "$TMP/h-agent1.log" | head -1)
for _ in $(seq 50); do ip netns exec "$P-h-p1" ping -c 1 -W 1 "${POD2[h]}" >/dev/null 2>&1 && break; sleep 0.2; done
DUMPS=()
for i in 1 2; do
  for d in eth0 "$DEV"; do
    ip netns exec "$P-h-n$i" tcpdump -i "$d" -w "$TMP/n$i-$d.pcap" --time-stamp-precision=nano -n -U \
      'icmp or udp' >/dev/null 2>&1 &
    DUMPS+=($!); PIDS+=($!)
  done
done
sleep 1
ip netns exec "$P-h-p1" "${PIN[@]}" ping -n -q -i 0.005 -c "${N:-200}" -W 1 "${POD2[h]}" | tail -1
sleep 0.5
kill -INT "${DUMPS[@]}"; wait "${DUMPS[@]}" 2>/dev/null || true
FRAMING=udp; [[ ${BACKEND:-udp} == *vxlan* ]] && FRAMING=vxlan
python3 "$ROOT/tests/bench/hops.py" "$FRAMING" "$TMP/n1-eth0.pcap" "$TMP/n1-$DEV.pcap" "$TMP/n2-eth0.pcap" "$TMP/n2-$DEV.pcap"
