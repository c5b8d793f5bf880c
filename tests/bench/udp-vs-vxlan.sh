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
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WEFT=${WEFT_BIN:-$ROOT/target/release/weft}
[[ -x "$WEFT" ]] || { echo "no weft binary at $WEFT: cargo build --release -p weft" >&2; exit 1; }
for t in ip iperf3 python3; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
P="wb$$"
TMP=$(mktemp -d)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

# node_pair <tag>: namespaces <tag>-n1/-n2 joined by veth, 198.18.1.1 and .2
node_pair() {
  local t=$1
  ip netns add "$P-$t-n1"; ip netns add "$P-$t-n2"
  ip link add eth0 netns "$P-$t-n1" type veth peer name eth0 netns "$P-$t-n2"
  for i in 1 2; do
    ip -n "$P-$t-n$i" addr add 198.18.1.$i/24 dev eth0
    ip -n "$P-$t-n$i" link set eth0 up; ip -n "$P-$t-n$i" link set lo up
    ip netns exec "$P-$t-n$i" sysctl -qw net.ipv4.ip_forward=1
  done
}

# attach_pod <tag> <node> <subnet-prefix e.g. 10.244.5> <mtu>: pod at .2 behind cni0 (.1)
attach_pod() {
  local t=$1 i=$2 s=$3 mtu=$4 node="$P-$1-n$2" pod="$P-$1-p$2"
  ip netns add "$pod"; ip -n "$pod" link set lo up
  ip -n "$node" link add cni0 type bridge
  ip -n "$node" addr add "$s.1/24" dev cni0
  ip -n "$node" link set cni0 mtu "$mtu" up
  ip link add eth0 netns "$pod" type veth peer name vp1 netns "$node"
  ip -n "$node" link set vp1 master cni0 mtu "$mtu" up
  ip -n "$pod" addr add "$s.2/24" dev eth0
  ip -n "$pod" link set eth0 mtu "$mtu" up
  ip -n "$pod" route add default via "$s.1"
}

setup_weft() {
  node_pair weft
  echo '{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}' > "$TMP/net.json"
  for i in 1 2; do
    ip netns exec "$P-weft-n$i" "$WEFT" agent --iface eth0 --store "$TMP/store.db" \
      --net-config "$TMP/net.json" --subnet-file "$TMP/n$i.env" >"$TMP/agent$i.log" 2>&1 &
    PIDS+=($!)
  done
  for i in 1 2; do
    for _ in $(seq 100); do [[ -s "$TMP/n$i.env" ]] && break; sleep 0.1; done
    [[ -s "$TMP/n$i.env" ]] || { echo "weft agent $i not ready:"; cat "$TMP/agent$i.log"; exit 1; }
    local sub mtu
    sub=$(sed -n 's/^FLANNEL_SUBNET=\(.*\)\.1\/24$/\1/p' "$TMP/n$i.env")
    mtu=$(sed -n 's/^FLANNEL_MTU=//p' "$TMP/n$i.env")
    attach_pod weft "$i" "$sub" "$mtu"
    eval "WEFT_POD$i=$sub.2"
  done
  WEFT_MTU=$mtu
}

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

# iperf <tag> <server pod ip> <mode tcp|udp64> -> prints the metric (Gbit/s or kpps received)
iperf() {
  local t=$1 ip=$2 mode=$3 out
  ip netns exec "$P-$t-p2" iperf3 -s -1 -B "$ip" >/dev/null 2>&1 &
  local spid=$!
  sleep 0.3
  if [[ $mode == tcp ]]; then
    out=$(ip netns exec "$P-$t-p1" iperf3 -c "$ip" -t "$SECS" -J)
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' <<<"$out"
  else
    out=$(ip netns exec "$P-$t-p1" iperf3 -c "$ip" -u -b 0 -l 64 -t "$SECS" -J)
    python3 -c 'import json,sys; d=json.load(sys.stdin); s=d["end"]["sum"]; print("%.1f" % ((s["packets"]-s["lost_packets"])/s["seconds"]/1e3))' <<<"$out"
  fi
  wait $spid 2>/dev/null || true
}

median() { tr ' ' '\n' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "setting up Weft udp and kernel VXLAN paths..."
setup_weft
setup_kernel
ip netns exec "$P-weft-p1" ping -c 2 -W 2 "$WEFT_POD2" >/dev/null || { echo "weft path broken"; cat "$TMP"/agent*.log; exit 1; }
ip netns exec "$P-kvx-p1" ping -c 2 -W 2 10.245.2.2 >/dev/null || { echo "kernel VXLAN path broken"; exit 1; }

declare -A R
for mode in tcp udp64; do
  for t in weft kvx; do R[$t-$mode]=""; done
  for _ in $(seq "$ROUNDS"); do
    # Alternate the paths inside each round so drift in the machine hits both alike.
    R[weft-$mode]+=" $(iperf weft "$WEFT_POD2" $mode)"
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
echo "weft MTU $WEFT_MTU, kernel VXLAN MTU 1450; all runs: weft tcp:${R[weft-tcp]} kvx tcp:${R[kvx-tcp]} weft udp64:${R[weft-udp64]} kvx udp64:${R[kvx-udp64]}"
