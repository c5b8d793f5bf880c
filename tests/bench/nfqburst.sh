#!/usr/bin/env bash
# How fast an agent answers a backlog on its NFQUEUE (issue 14): the kernel path's verdict loop
# on its own, where a new-connection benchmark mostly measures wake-ups. Node 1's agent (Weft
# vxlan with the firewall, "per_flow": every new flow is asked) is stopped; a pod sends one UDP
# datagram to each of COUNT ports of the other node's pod (COUNT new flows, all queued); the
# agent is woken and the time until the queue is empty gives packets answered per second.
#
#   sudo tests/bench/nfqburst.sh                      # 5 rounds of 4,000 packets
#   sudo tests/bench/nfqburst.sh --quick              # 1 round of 1,000 (CI smoke run)
#   sudo WEFT_BEFORE=/path/to/old/weft tests/bench/nfqburst.sh   # that build, same rounds
#
# Topology: lib.sh's two node namespaces on a veth pair, a pod behind a bridge on each.
# Traffic never leaves these namespaces.
set -euo pipefail

ROUNDS=${ROUNDS:-5}; COUNT=${COUNT:-4000}
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=1; COUNT=1000; fi
source "$(dirname "$0")/lib.sh"
FW=${WEFT_POLICY_DIR:-$ROOT/target/policies}/firewall.wasm
[[ -f "$FW" ]] || { echo "no $FW: run scripts/build-policies" >&2; exit 1; }
command -v iptables >/dev/null || { echo "missing iptables" >&2; exit 1; }
# Below the queue's 4,096 waiting packets: a full queue would let the rest through unasked.
(( COUNT <= 4000 )) || { echo "COUNT must be at most 4000" >&2; exit 1; }
BURST=$ROOT/tests/bench/nfqburst.py
CFG='{"per_flow":true,"default":"allow","rules":[{"action":"deny","protocol":"tcp","ports":["7777"]}]}'

setup_fw() { # tag binary
  WEFT=$2 setup_weft "$1" '{"Type":"vxlan"}' "'$2' module --store '$TMP/$1.db' add fw '$FW' --config-json '$CFG' >/dev/null"
}
setup_fw now "$WEFT"
TAGS=now
if [[ -n "${WEFT_BEFORE:-}" ]]; then
  [[ -x "$WEFT_BEFORE" ]] || { echo "WEFT_BEFORE=$WEFT_BEFORE is not an executable" >&2; exit 1; }
  setup_fw before "$WEFT_BEFORE"; TAGS+=" before"
fi
for t in $TAGS; do
  for _ in $(seq 50); do
    ip netns exec "$P-$t-p1" ping -c 1 -W 1 "${POD2[$t]}" >/dev/null 2>&1 && break
    sleep 0.2
  done
  ip netns exec "$P-$t-n1" iptables -S WEFT-POLICY | grep -q NFQUEUE \
    || { echo "the NFQUEUE policy is not active on path $t"; cat "$TMP"/$t-agent*.log; exit 1; }
done

# burst <tag> <round>: thousands of packets answered per second by node 1's agent.
burst() {
  local t=$1 r=$2 agent
  agent=$(awk '{print $1}' <<<"${AGENTS[$t]}")
  kill -STOP "$agent"
  ip netns exec "$P-$t-p1" python3 "$BURST" send "${POD2[$t]}" 20000 "$COUNT"
  ip netns exec "$P-$t-n1" python3 "$BURST" drain "$agent" "$COUNT" 8472 || { kill -CONT "$agent"; exit 1; }
}

declare -A R C
for r in $(seq "$ROUNDS"); do
  for t in $TAGS; do
    read -r rate cpu < <(burst "$t" "$r")
    R[$t]+=" $rate"; C[$t]+=" $cpu"
  done
done
printf '\n%-36s %12s %14s\n' "backlog of $COUNT new flows ($ROUNDS rounds, median)" "k packets/s" "agent CPU us/p"
for t in $TAGS; do
  printf '%-36s %12s %14s\n' "$t" "$(echo ${R[$t]} | median)" "$(echo ${C[$t]} | median)"
done
if [[ -n "${WEFT_BEFORE:-}" ]]; then
  python3 -c "print('%-36s %12.3f %14.3f' % ('now / before', $(echo ${R[now]} | median) / $(echo ${R[before]} | median), $(echo ${C[now]} | median) / $(echo ${C[before]} | median)))"
fi
for t in $TAGS; do echo "runs $t: packets/s${R[$t]}; CPU${C[$t]}"; done
