#!/usr/bin/env bash
# Every data path side by side in one run, each against its reference:
#   Weft udp                      vs kernel VXLAN set up by hand as flannel does (TCP, UDP 64 B)
#   Weft vxlan (kernel)           vs kernel VXLAN by hand (TCP)
#   Weft vxlan (userspace)        vs kernel VXLAN by hand (TCP, UDP 64 B)
#   Weft vxlan + NFQUEUE firewall vs Weft vxlan without modules (TCP; new connections per second),
#     both on bare nodes (no connection tracking until the policy needs it) and on nodes running
#     --ip-masq (connections already tracked, as on most real nodes); the firewall's verdicts hold
#     for whole services, so the kernel answers a service's later connections itself; with
#     "per_flow" every connection is asked of the agent (the queue's own cost)
#   Weft host-gw                  vs routes added by hand (TCP)
#   Weft udp with the firewall    vs Weft udp without modules (every row)
# Rows: TCP 1 and 4 streams, UDP 64 B, idle ping RTT (300 pings 5 ms apart), sockperf ping-pong
# latency (64 B), 1,000 concurrent UDP flows of 64 B, and of sizes 64-1,400 B changing from one
# datagram to the next (GSO/GRO cannot coalesce them), new connections per second (one client,
# and 8 at once, where the agent answers a burst of first packets together), and the
# agents' CPU at idle and under a TCP stream.
#
#   sudo tests/bench/dataplane.sh            # 3 rounds of 10 s per test (the recorded numbers)
#   sudo tests/bench/dataplane.sh --quick    # 1 round of 2 s (CI smoke run)
#   sudo WEFT_BEFORE=/path/to/old/weft tests/bench/dataplane.sh   # adds that binary's udp,
#        userspace VXLAN and NFQUEUE paths to the same rounds, and rows comparing the two builds
#        (WEFT_BEFORE_POLICIES=<its target/policies> when its modules differ from this build's)
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
CFG_FLOW='{"per_flow":true,"default":"allow","rules":[{"action":"deny","protocol":"tcp","ports":["7777"]}]}'
echo "setting up 11 paths..."
setup_weft udp udp
setup_weft udpfw udp "'$WEFT' module --store '$TMP/udpfw.db' add fw '$FW' --config-json '$CFG' >/dev/null"
setup_weft vx '{"Type":"vxlan"}'
setup_weft vxp '{"Type":"vxlan"}' "'$WEFT' module --store '$TMP/vxp.db' add fw '$FW' --config-json '$CFG' >/dev/null"
setup_weft vxpf '{"Type":"vxlan"}' "'$WEFT' module --store '$TMP/vxpf.db' add fw '$FW' --config-json '$CFG_FLOW' >/dev/null"
setup_weft vxm '{"Type":"vxlan"}' "" --ip-masq
setup_weft vxpm '{"Type":"vxlan"}' "'$WEFT' module --store '$TMP/vxpm.db' add fw '$FW' --config-json '$CFG' >/dev/null" --ip-masq
setup_weft vxu '{"Type":"vxlan","Userspace":true}'
setup_weft hg host-gw
setup_kernel
setup_plain
PATHS="udp udpfw vx vxp vxpf vxm vxpm vxu hg kvx plain"
CONN="vx vxp vxpf vxm vxpm kvx"
USERSPACE="udp udpfw vxu"
if [[ -n "${WEFT_BEFORE:-}" ]]; then
  [[ -x "$WEFT_BEFORE" ]] || { echo "WEFT_BEFORE=$WEFT_BEFORE is not an executable" >&2; exit 1; }
  NOW=$WEFT; WEFT=$WEFT_BEFORE; FWB=${WEFT_BEFORE_POLICIES:-$(dirname "$FW")}/firewall.wasm
  setup_weft udpb udp
  setup_weft vxub '{"Type":"vxlan","Userspace":true}'
  setup_weft udpfwb udp "'$WEFT' module --store '$TMP/udpfwb.db' add fw '$FWB' --config-json '$CFG' >/dev/null"
  setup_weft vxpb '{"Type":"vxlan"}' "'$WEFT' module --store '$TMP/vxpb.db' add fw '$FWB' --config-json '$CFG' >/dev/null"
  setup_weft vxpfb '{"Type":"vxlan"}' "'$WEFT' module --store '$TMP/vxpfb.db' add fw '$FWB' --config-json '$CFG_FLOW' >/dev/null"
  WEFT=$NOW; PATHS+=" udpb udpfwb vxub vxpb vxpfb"; USERSPACE+=" udpb udpfwb vxub"; CONN+=" vxpb vxpfb"
fi
# MODES="tcp" (or "tcp conn", ...) measures only those; the setup stays the same.
MODES=${MODES:-tcp tcp4 udp64 ping sockperf flows mixed conn conn8 cpu}
command -v sockperf >/dev/null || MODES=${MODES//sockperf/}
[[ -x "$UDPFLOWS" ]] || { MODES=${MODES//flows/}; MODES=${MODES//mixed/}; }
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
queued() { ip netns exec "$P-$1-n1" awk '$1 >= 8472 && $1 < 8480 {s += $8} END {print s+0}' /proc/net/netfilter/nfnetlink_queue; }

# connrate <tag> <server ip> [clients]: new TCP connections per second, one client (or that
# many at once), each opening connections back to back.
connrate() {
  local t=$1 ip=$2 clients=${3:-1}
  ip netns exec "$P-$t-p2" python3 "$ROOT/tests/bench/connrate.py" serve "$ip" 9000 &
  local spid=$!
  sleep 0.5
  ip netns exec "$P-$t-p1" python3 "$ROOT/tests/bench/connrate.py" run "$ip" 9000 "$CONN_SECS" "$clients"
  kill $spid 2>/dev/null; wait $spid 2>/dev/null || true
}

# cpu <tag>: CPU the path's two agents used, as % of one core, over SECS idle and over one
# TCP stream of SECS.
cpu() {
  local t=$1 c0 c1 c2
  c0=$(cpu_of ${AGENTS[$t]}); sleep "$SECS"; c1=$(cpu_of ${AGENTS[$t]})
  iperf "$t" "${POD2[$t]}" tcp >/dev/null; c2=$(cpu_of ${AGENTS[$t]})
  python3 -c "print('%.1f/%.1f' % (($c1-$c0)/$SECS*100, ($c2-$c1)/$SECS*100))"
}

declare -A R
q0=$(queued vxp); f0=$(queued vxpf)
for mode in tcp tcp4 udp64 ping sockperf flows mixed conn conn8 cpu; do
  for t in $PATHS; do R[$t-$mode]=""; done
  [[ " $MODES " == *" $mode "* ]] || continue
  for _ in $(seq "$ROUNDS"); do
    case $mode in
      tcp) for t in $PATHS; do R[$t-$mode]+=" $(iperf $t "${POD2[$t]}" tcp)"; done ;;
      tcp4) for t in $USERSPACE vx kvx; do R[$t-$mode]+=" $(iperf $t "${POD2[$t]}" tcp4)"; done ;;
      udp64) for t in $USERSPACE kvx; do R[$t-$mode]+=" $(iperf $t "${POD2[$t]}" udp64)"; done ;;
      ping) for t in $USERSPACE vx kvx; do R[$t-$mode]+=" $(pingrtt $t "${POD2[$t]}")"; done ;;
      sockperf) for t in $USERSPACE vx kvx; do R[$t-$mode]+=" $(sockperf_pp $t "${POD2[$t]}")"; done ;;
      flows) for t in $USERSPACE kvx; do R[$t-$mode]+=" $(udpflows $t "${POD2[$t]}")"; done ;;
      mixed) for t in $USERSPACE kvx; do R[$t-$mode]+=" $(udpflows $t "${POD2[$t]}" 64-1400)"; done ;;
      conn) for t in $CONN; do R[$t-$mode]+=" $(connrate $t "${POD2[$t]}")"; done ;;
      conn8) for t in $CONN; do R[$t-$mode]+=" $(connrate $t "${POD2[$t]}" 8)"; done ;;
      cpu) for t in $USERSPACE; do [[ $t == udpfw* ]] || R[$t-$mode]+=" $(cpu $t)"; done ;;
    esac
  done
done
q1=$(queued vxp); f1=$(queued vxpf)

ratio() { python3 -c "print('%.3f' % (float('$1' or 0)/float('$2') if '$2' and float('$2') else 0))"; }
med() { echo ${R[$1]} | median; }
printf '\n%-40s %12s %12s %8s\n' "test ($ROUNDS x ${SECS}s, median)" "weft" "reference" "ratio"
row() { # label path reference mode
  local a b; a=$(med "$2-$4"); b=$(med "$3-$4")
  printf '%-40s %12s %12s %8s\n' "$1" "$a" "$b" "$(ratio "$a" "$b")"
}
row "udp / kernel VXLAN, TCP (Gbit/s)" udp kvx tcp
row "udp / kernel VXLAN, TCP 4 streams (Gbit/s)" udp kvx tcp4
row "udp / kernel VXLAN, UDP 64 B (kpps)" udp kvx udp64
row "udp / kernel VXLAN, idle ping RTT (ms)" udp kvx ping
row "udp / kernel VXLAN, sockperf pp 64 B (us)" udp kvx sockperf
row "udp / kernel VXLAN, 1,000 UDP flows (kpps)" udp kvx flows
row "udp / kernel VXLAN, mixed sizes (kpps)" udp kvx mixed
row "vxlan / kernel VXLAN, TCP (Gbit/s)" vx kvx tcp
row "vxlan / kernel VXLAN, TCP 4 streams (Gbit/s)" vx kvx tcp4
row "vxlan / kernel VXLAN, idle ping RTT (ms)" vx kvx ping
row "vxlan / kernel VXLAN, sockperf pp 64 B (us)" vx kvx sockperf
row "vxlan userspace / kernel, TCP (Gbit/s)" vxu kvx tcp
row "vxlan userspace / kernel, TCP 4 streams (Gbit/s)" vxu kvx tcp4
row "vxlan userspace / kernel, UDP 64 B (kpps)" vxu kvx udp64
row "vxlan userspace / kernel, idle ping RTT (ms)" vxu kvx ping
row "vxlan userspace / kernel, sockperf pp 64 B (us)" vxu kvx sockperf
row "vxlan userspace / kernel, 1,000 UDP flows (kpps)" vxu kvx flows
row "vxlan userspace / kernel, mixed sizes (kpps)" vxu kvx mixed
row "udp+firewall / udp, TCP (Gbit/s)" udpfw udp tcp
row "udp+firewall / udp, TCP 4 streams (Gbit/s)" udpfw udp tcp4
row "udp+firewall / udp, UDP 64 B (kpps)" udpfw udp udp64
row "udp+firewall / udp, idle ping RTT (ms)" udpfw udp ping
row "udp+firewall / udp, sockperf pp 64 B (us)" udpfw udp sockperf
row "udp+firewall / udp, 1,000 UDP flows (kpps)" udpfw udp flows
row "udp+firewall / udp, mixed sizes (kpps)" udpfw udp mixed
row "vxlan+NFQUEUE / vxlan, TCP (Gbit/s)" vxp vx tcp
row "vxlan+NFQUEUE / vxlan, conn/s" vxp vx conn
row "same, every flow asked, conn/s" vxpf vx conn
row "vxlan+NFQUEUE / vxlan, conn/s, 8 clients" vxp vx conn8
row "same, every flow asked, 8 clients" vxpf vx conn8
row "same, nodes with --ip-masq, TCP (Gbit/s)" vxpm vxm tcp
row "same, nodes with --ip-masq, conn/s" vxpm vxm conn
row "host-gw / plain routes, TCP (Gbit/s)" hg plain tcp
row "vxlan / kernel VXLAN, conn/s" vx kvx conn
row "vxlan / kernel VXLAN, conn/s, 8 clients" vx kvx conn8
if [[ -n "${WEFT_BEFORE:-}" ]]; then
  for m in "tcp TCP (Gbit/s)" "tcp4 TCP 4 streams (Gbit/s)" "udp64 UDP 64 B (kpps)" "ping idle ping RTT (ms)" \
    "sockperf sockperf pp 64 B (us)" "flows 1,000 UDP flows (kpps)" "mixed mixed sizes (kpps)"; do
    row "udp / before, ${m#* }" udp udpb "${m%% *}"
    row "vxlan userspace / before, ${m#* }" vxu vxub "${m%% *}"
    row "udp+firewall / before, ${m#* }" udpfw udpfwb "${m%% *}"
  done
  row "vxlan+NFQUEUE / before, conn/s" vxp vxpb conn
  row "every flow asked / before, conn/s" vxpf vxpfb conn
  row "every flow asked / before, 8 clients" vxpf vxpfb conn8
fi
for t in $USERSPACE; do
  [[ $t == udpfw* ]] && continue
  printf '%-40s %25s\n' "agents' CPU, $t (% of a core: idle/TCP)" "$(echo ${R[$t-cpu]} | tr ' ' '\n' | tail -1)"
done
echo "packets node 1 of vxlan+NFQUEUE queued to its agent during the whole run: $((q1 - q0)) (every flow asked: $((f1 - f0)))"
# (if, not &&: a last empty row must not fail the pipeline under pipefail)
for k in "${!R[@]}"; do if [[ -n "${R[$k]}" ]]; then echo "runs $k:${R[$k]}"; fi; done | sort
