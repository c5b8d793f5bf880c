#!/usr/bin/env bash
# What a Wasm policy costs the data path: two Weft `udp` clusters side by side in the same run,
# one with the firewall module (policies/firewall) active on both nodes and one with no module,
# on every row of the userspace data path (issue 14's goal: the module costs <= 5 % on each).
# Rows: TCP 1 and 4 streams, UDP 64 B, idle ping RTT, sockperf ping-pong (64 B), 1,000 UDP
# flows, and flows of changing sizes. Each round measures both clusters back to back, the one
# going first alternating from round to round, so a row's per-round ratio compares two runs
# a few seconds apart; it prints the ratio of the medians and the median and range of the
# per-round ratios (for latencies, firewall / none above 1 is the cost).
#
#   sudo tests/bench/module-overhead.sh            # 3 rounds of 10 s per test (recorded numbers)
#   sudo tests/bench/module-overhead.sh --quick    # 1 round of 2 s of TCP and UDP 64 B (CI smoke)
#   sudo ROUNDS=9 SECS=5 MODES="ping sockperf" tests/bench/module-overhead.sh   # chosen rows
#
# Needs target/release/weft and target/policies/firewall.wasm (scripts/build-policies).
set -euo pipefail

ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}
MODES=${MODES:-tcp tcp4 udp64 ping sockperf flows mixed}
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=1; SECS=2; MODES="tcp udp64"; fi
source "$(dirname "$0")/lib.sh"
FW=${WEFT_POLICY_DIR:-$ROOT/target/policies}/firewall.wasm
[[ -f "$FW" ]] || { echo "no $FW: run scripts/build-policies" >&2; exit 1; }

echo "setting up two Weft udp clusters (no module / firewall)..."
setup_weft none
setup_weft fw
# A realistic rule set: the flow under test matches none of the deny rules, so the module walks
# them all before the default allows it (once per flow; the cache answers every later packet).
CFG='{"default":"allow","rules":[
 {"action":"deny","protocol":"tcp","ports":["23","135-139","445"]},
 {"action":"deny","protocol":"udp","ports":["1900","5353"]},
 {"action":"deny","src":["192.0.2.0/24","198.51.100.0/24"]},
 {"action":"log","direction":"ingress","protocol":"tcp","ports":["22"]},
 {"action":"allow","protocol":"icmp"}]}'
ip netns exec "$P-fw-n1" "$WEFT" module --store "$TMP/fw.db" add fw "$FW" --config-json "$CFG"
for _ in $(seq 100); do
  ip netns exec "$P-fw-n1" "$WEFT" module --store "$TMP/fw.db" ls | grep -q '^fw .* 2/2$' && break
  sleep 0.1
done
ip netns exec "$P-fw-n1" "$WEFT" module --store "$TMP/fw.db" ls | grep -q '^fw .* 2/2$' \
  || { echo "firewall not loaded on both nodes"; cat "$TMP"/fw-agent*.log; exit 1; }
for t in none fw; do
  ip netns exec "$P-$t-p1" ping -c 2 -W 2 "${POD2[$t]}" >/dev/null || { echo "$t path broken"; cat "$TMP"/$t-agent*.log; exit 1; }
done

[[ -x "$UDPFLOWS" ]] || { MODES=${MODES//flows/}; MODES=${MODES//mixed/}; }
command -v sockperf >/dev/null || MODES=${MODES//sockperf/}

# measure <tag> <mode> -> the row's value for one cluster
measure() {
  case $2 in
    tcp|tcp4|udp64) iperf "$1" "${POD2[$1]}" "$2" ;;
    ping) pingrtt "$1" "${POD2[$1]}" ;;
    sockperf) sockperf_pp "$1" "${POD2[$1]}" ;;
    flows) udpflows "$1" "${POD2[$1]}" ;;
    mixed) udpflows "$1" "${POD2[$1]}" 64-1400 ;;
  esac
}

declare -A R
for mode in $MODES; do
  R[fw-$mode]=""; R[none-$mode]=""
  for r in $(seq "$ROUNDS"); do
    order="fw none"; (( r % 2 == 0 )) && order="none fw"
    for t in $order; do R[$t-$mode]+=" $(measure $t $mode)"; done
  done
done

calls=$(ip netns exec "$P-fw-n1" python3 -c '
import urllib.request
for l in urllib.request.urlopen("http://127.0.0.1:8286/metrics").read().decode().splitlines():
    if l.startswith(("weft_module_calls_total{", "weft_module_cache_hits_total{", "weft_module_call_nanoseconds_total{")):
        print(l)')
declare -A LABEL=([tcp]="TCP 1 stream (Gbit/s)" [tcp4]="TCP 4 streams (Gbit/s)" [udp64]="UDP 64 B received (kpps)"
  [ping]="idle ping RTT (ms)" [sockperf]="sockperf pp 64 B (us)" [flows]="1,000 UDP flows (kpps)"
  [mixed]="mixed sizes (kpps)")
printf '\n%-28s %10s %10s %8s %22s\n' "test ($ROUNDS x ${SECS}s, median)" "firewall" "no module" "ratio" "per round: median (range)"
for mode in $MODES; do
  python3 - "${LABEL[$mode]}" "${R[fw-$mode]}" "${R[none-$mode]}" <<'PY'
import statistics as st, sys
label, fw, none = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
pairs = [f / n for f, n in zip(fw, none) if n]
m_fw, m_none = st.median(fw), st.median(none)
spread = "%.3f (%.3f-%.3f)" % (st.median(pairs), min(pairs), max(pairs)) if pairs else "-"
print("%-28s %10s %10s %8.3f %22s" % (label, m_fw, m_none, m_fw / m_none if m_none else 0, spread))
PY
done
for mode in $MODES; do echo "runs $mode: fw${R[fw-$mode]} / none${R[none-$mode]}"; done
echo "node 1 of the firewall cluster:"; echo "$calls"
