#!/usr/bin/env bash
# What a Wasm policy costs the data path: pod-to-pod throughput through two Weft `udp` clusters
# side by side in the same run, one with the firewall module (policies/firewall) active on both
# nodes and one with no module. Prints firewall/none ratios; the cached path must keep >= 0.95.
#
#   sudo tests/bench/module-overhead.sh            # 3 rounds of 10 s per test (recorded numbers)
#   sudo tests/bench/module-overhead.sh --quick    # 1 round of 2 s (CI smoke run)
#
# Needs target/release/weft and target/policies/firewall.wasm (scripts/build-policies).
set -euo pipefail

ROUNDS=3; SECS=10
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=1; SECS=2; fi
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

declare -A R
for mode in tcp udp64; do
  for t in none fw; do R[$t-$mode]=""; done
  for _ in $(seq "$ROUNDS"); do
    R[fw-$mode]+=" $(iperf fw "${POD2[fw]}" $mode)"
    R[none-$mode]+=" $(iperf none "${POD2[none]}" $mode)"
  done
done

calls=$(ip netns exec "$P-fw-n1" python3 -c '
import urllib.request
for l in urllib.request.urlopen("http://127.0.0.1:8286/metrics").read().decode().splitlines():
    if l.startswith(("weft_module_calls_total{", "weft_module_cache_hits_total{", "weft_module_call_nanoseconds_total{")):
        print(l)')
printf '\n%-28s %14s %14s %8s\n' "test ($ROUNDS x ${SECS}s, median)" "firewall" "no module" "ratio"
for mode in tcp udp64; do
  f=$(echo ${R[fw-$mode]} | median); n=$(echo ${R[none-$mode]} | median)
  unit=$([[ $mode == tcp ]] && echo "Gbit/s" || echo "kpps")
  label=$([[ $mode == tcp ]] && echo "TCP 1 stream" || echo "UDP 64 B received")
  printf '%-28s %14s %14s %8s\n' "$label ($unit)" "$f" "$n" "$(python3 -c "print('%.3f' % ($f/$n if $n else 0))")"
done
echo "all runs: fw tcp:${R[fw-tcp]} none tcp:${R[none-tcp]} fw udp64:${R[fw-udp64]} none udp64:${R[none-udp64]}"
echo "node 1 of the firewall cluster:"; echo "$calls"
