#!/usr/bin/env bash
# Every data path side by side in one run, each against its reference:
#   Weft udp                      vs kernel VXLAN set up by hand as flannel does (TCP, UDP 64 B)
#   Weft vxlan (kernel)           vs kernel VXLAN by hand (TCP)
#   Weft vxlan (userspace)        vs kernel VXLAN by hand (TCP, UDP 64 B)
#   Weft vxlan + NFQUEUE firewall vs Weft vxlan without modules (TCP; new connections per second),
#     both on bare nodes (no connection tracking until the policy needs it) and on nodes running
#     --ip-masq (connections already tracked, as on most real nodes)
#   Weft host-gw                  vs routes added by hand (TCP)
#
#   sudo tests/bench/dataplane.sh            # 3 rounds of 10 s per test (the recorded numbers)
#   sudo tests/bench/dataplane.sh --quick    # 1 round of 2 s (CI smoke run)
#
# Topology per path: two node namespaces joined by a veth pair (MTU 1500), each with one pod
# namespace behind a bridge. Traffic never leaves these namespaces. Inside each round the paths
# take turns, so drift in the machine hits all of them alike.
set -euo pipefail

ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONN_SECS=5
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=1; SECS=2; CONN_SECS=2; fi
source "$(dirname "$0")/lib.sh"
FW=${WEFT_POLICY_DIR:-$ROOT/target/policies}/firewall.wasm
[[ -f "$FW" ]] || { echo "no $FW: run scripts/build-policies" >&2; exit 1; }
command -v iptables >/dev/null || { echo "missing iptables" >&2; exit 1; }

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
  POD2[kvx]=10.245.2.2
}

setup_plain() {
  node_pair plain
  attach_pod plain 1 10.246.1 1500
  attach_pod plain 2 10.246.2 1500
  ip -n "$P-plain-n1" route add 10.246.2.0/24 via 198.18.1.2 dev eth0
  ip -n "$P-plain-n2" route add 10.246.1.0/24 via 198.18.1.1 dev eth0
  POD2[plain]=10.246.2.2
}

# The firewall denies a port nothing here uses: every benchmark flow is asked about once, then
# allowed and remembered in its connection mark.
CFG='{"default":"allow","rules":[{"action":"deny","protocol":"tcp","ports":["7777"]}]}'
echo "setting up 9 paths..."
setup_weft udp udp
setup_weft vx '{"Type":"vxlan"}'
setup_weft vxp '{"Type":"vxlan"}' "'$WEFT' module --store '$TMP/vxp.db' add fw '$FW' --config-json '$CFG' >/dev/null"
setup_weft vxm '{"Type":"vxlan"}' "" --ip-masq
setup_weft vxpm '{"Type":"vxlan"}' "'$WEFT' module --store '$TMP/vxpm.db' add fw '$FW' --config-json '$CFG' >/dev/null" --ip-masq
setup_weft vxu '{"Type":"vxlan","Userspace":true}'
setup_weft hg host-gw
setup_kernel
setup_plain
PATHS="udp vx vxp vxm vxpm vxu hg kvx plain"
# MODES="tcp" (or "tcp conn", ...) measures only those; the setup stays the same.
MODES=${MODES:-tcp udp64 conn}
for t in $PATHS; do
  for _ in $(seq 50); do
    ip netns exec "$P-$t-p1" ping -c 1 -W 1 "${POD2[$t]}" >/dev/null 2>&1 && break
    sleep 0.2
  done
  ip netns exec "$P-$t-p1" ping -c 2 -W 2 "${POD2[$t]}" >/dev/null \
    || { echo "$t path broken"; cat "$TMP"/$t-agent*.log 2>/dev/null; exit 1; }
done
ip netns exec "$P-vxp-n1" iptables -S WEFT-POLICY | grep -q NFQUEUE \
  || { echo "the NFQUEUE policy is not active on the vxp path"; cat "$TMP"/vxp-agent*.log; exit 1; }

# queued <tag>: packets node 1 of a path has queued to its agent so far (id_sequence).
queued() { ip netns exec "$P-$1-n1" awk '$1 == 8472 {print $8}' /proc/net/netfilter/nfnetlink_queue; }

# connrate <tag> <server ip>: new TCP connections per second, one client, back to back.
connrate() {
  local t=$1 ip=$2
  ip netns exec "$P-$t-p2" python3 "$ROOT/tests/bench/connrate.py" serve "$ip" 9000 &
  local spid=$!
  sleep 0.5
  ip netns exec "$P-$t-p1" python3 "$ROOT/tests/bench/connrate.py" run "$ip" 9000 "$CONN_SECS"
  kill $spid 2>/dev/null; wait $spid 2>/dev/null || true
}

declare -A R
q0=$(queued vxp)
for mode in tcp udp64 conn; do
  for t in $PATHS; do R[$t-$mode]=""; done
  [[ " $MODES " == *" $mode "* ]] || continue
  for _ in $(seq "$ROUNDS"); do
    case $mode in
      tcp) for t in $PATHS; do R[$t-$mode]+=" $(iperf $t "${POD2[$t]}" tcp)"; done ;;
      udp64) for t in udp vxu kvx; do R[$t-$mode]+=" $(iperf $t "${POD2[$t]}" udp64)"; done ;;
      conn) for t in vx vxp vxm vxpm kvx; do R[$t-$mode]+=" $(connrate $t "${POD2[$t]}")"; done ;;
    esac
  done
done
q1=$(queued vxp)

ratio() { python3 -c "print('%.3f' % (float('$1' or 0)/float('$2') if '$2' and float('$2') else 0))"; }
med() { echo ${R[$1]} | median; }
printf '\n%-40s %12s %12s %8s\n' "test ($ROUNDS x ${SECS}s, median)" "weft" "reference" "ratio"
row() { # label path reference mode
  local a b; a=$(med "$2-$4"); b=$(med "$3-$4")
  printf '%-40s %12s %12s %8s\n' "$1" "$a" "$b" "$(ratio "$a" "$b")"
}
row "udp / kernel VXLAN, TCP (Gbit/s)" udp kvx tcp
row "udp / kernel VXLAN, UDP 64 B (kpps)" udp kvx udp64
row "vxlan / kernel VXLAN, TCP (Gbit/s)" vx kvx tcp
row "vxlan userspace / kernel, TCP (Gbit/s)" vxu kvx tcp
row "vxlan userspace / kernel, UDP 64 B (kpps)" vxu kvx udp64
row "vxlan+NFQUEUE / vxlan, TCP (Gbit/s)" vxp vx tcp
row "vxlan+NFQUEUE / vxlan, conn/s" vxp vx conn
row "same, nodes with --ip-masq, TCP (Gbit/s)" vxpm vxm tcp
row "same, nodes with --ip-masq, conn/s" vxpm vxm conn
row "host-gw / plain routes, TCP (Gbit/s)" hg plain tcp
row "vxlan / kernel VXLAN, conn/s" vx kvx conn
echo "packets node 1 of vxlan+NFQUEUE queued to its agent during the whole run: $((q1 - q0))"
for k in "${!R[@]}"; do [[ -n "${R[$k]}" ]] && echo "runs $k:${R[$k]}"; done | sort
