#!/usr/bin/env bash
# Pod-to-pod throughput through Weft's `udp` backend and, in the same run, through the kernel's
# own VXLAN set up exactly as flannel's vxlan backend does it. Prints Weft/kernel ratios.
#
#   sudo tests/bench/udp-vs-vxlan.sh            # 3 rounds of 10 s per test (the recorded numbers)
#   sudo tests/bench/udp-vs-vxlan.sh --quick    # 1 round of 2 s (CI smoke run)
#
# Topology per path: two node namespaces joined by a veth pair (MTU 1500), each with one pod
# namespace behind a bridge. Traffic never leaves these namespaces.
set -euo pipefail

ROUNDS=3; SECS=10
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=1; SECS=2; fi
source "$(dirname "$0")/lib.sh"

# The kernel's VXLAN, programmed as flannel's vxlan backend does: device flannel.1, VNI 1,
# port 8472, <subnet>.0/32 on the device, and per remote: neighbour, FDB entry, onlink route.
setup_kernel() {
  node_pair kvx
  local mac1=02:00:00:00:01:01 mac2=02:00:00:00:01:02
  for i in 1 2; do
    local ns="$P-kvx-n$i" mac; mac=$([[ $i == 1 ]] && echo $mac1 || echo $mac2)
    ip -n "$ns" link add flannel.1 type vxlan id 1 local 198.18.1.$i dev eth0 dstport 8472 nolearning
    ip -n "$ns" link set flannel.1 address "$mac" mtu 1450 up
    ip -n "$ns" addr add 10.245.$i.0/32 dev flannel.1
  done
  for i in 1 2; do
    local r=$((3 - i)) ns="$P-kvx-n$i" rmac
    rmac=$([[ $r == 1 ]] && echo $mac1 || echo $mac2)
    ip -n "$ns" neigh add 10.245.$r.0 lladdr "$rmac" dev flannel.1 nud permanent
    bridge -n "$ns" fdb append "$rmac" dev flannel.1 dst 198.18.1.$r self permanent
    ip -n "$ns" route add 10.245.$r.0/24 via 10.245.$r.0 dev flannel.1 onlink
    attach_pod kvx "$i" "10.245.$i" 1450
  done
}

echo "setting up Weft udp and kernel VXLAN paths..."
setup_weft weft
setup_kernel
ip netns exec "$P-weft-p1" ping -c 2 -W 2 "${POD2[weft]}" >/dev/null || { echo "weft path broken"; cat "$TMP"/weft-agent*.log; exit 1; }
ip netns exec "$P-kvx-p1" ping -c 2 -W 2 10.245.2.2 >/dev/null || { echo "kernel VXLAN path broken"; exit 1; }

declare -A R
for mode in tcp udp64; do
  for t in weft kvx; do R[$t-$mode]=""; done
  for _ in $(seq "$ROUNDS"); do
    # Alternate the paths inside each round so drift in the machine hits both alike.
    R[weft-$mode]+=" $(iperf weft "${POD2[weft]}" $mode)"
    R[kvx-$mode]+=" $(iperf kvx 10.245.2.2 $mode)"
  done
done

printf '\n%-28s %14s %14s %8s\n' "test ($ROUNDS x ${SECS}s, median)" "weft udp" "kernel vxlan" "ratio"
for mode in tcp udp64; do
  w=$(echo ${R[weft-$mode]} | median); k=$(echo ${R[kvx-$mode]} | median)
  unit=$([[ $mode == tcp ]] && echo "Gbit/s" || echo "kpps")
  label=$([[ $mode == tcp ]] && echo "TCP 1 stream" || echo "UDP 64 B received")
  printf '%-28s %14s %14s %8s\n' "$label ($unit)" "$w" "$k" "$(python3 -c "print('%.3f' % ($w/$k if $k else 0))")"
done
echo "weft MTU ${MTU[weft]}, kernel VXLAN MTU 1450; all runs: weft tcp:${R[weft-tcp]} kvx tcp:${R[kvx-tcp]} weft udp64:${R[weft-udp64]} kvx udp64:${R[kvx-udp64]}"
