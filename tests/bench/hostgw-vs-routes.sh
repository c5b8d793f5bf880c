#!/usr/bin/env bash
# Pod-to-pod TCP through Weft's `host-gw` backend and, in the same run, through the same
# topology with the routes added by hand (`ip route add <subnet> via <peer>`): what Weft's
# programming costs, which should be nothing. Prints host-gw/plain ratios.
#
#   sudo tests/bench/hostgw-vs-routes.sh            # 3 rounds of 10 s (recorded numbers)
#   sudo tests/bench/hostgw-vs-routes.sh --quick    # 1 round of 2 s (CI smoke run)
set -euo pipefail

ROUNDS=3; SECS=10
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=1; SECS=2; fi
source "$(dirname "$0")/lib.sh"

echo "setting up Weft host-gw and hand-made routes..."
setup_weft hg host-gw
for _ in $(seq 50); do
  ip netns exec "$P-hg-p1" ping -c 1 -W 1 "${POD2[hg]}" >/dev/null 2>&1 && break
  sleep 0.2
done
ip netns exec "$P-hg-p1" ping -c 2 -W 2 "${POD2[hg]}" >/dev/null || { echo "host-gw path broken"; cat "$TMP"/hg-agent*.log; exit 1; }
node_pair plain
attach_pod plain 1 10.246.1 1500
attach_pod plain 2 10.246.2 1500
ip -n "$P-plain-n1" route add 10.246.2.0/24 via 198.18.1.2 dev eth0
ip -n "$P-plain-n2" route add 10.246.1.0/24 via 198.18.1.1 dev eth0
ip netns exec "$P-plain-p1" ping -c 2 -W 2 10.246.2.2 >/dev/null || { echo "plain path broken"; exit 1; }

declare -A R
R[hg]=""; R[plain]=""
for _ in $(seq "$ROUNDS"); do
  R[hg]+=" $(iperf hg "${POD2[hg]}" tcp)"
  R[plain]+=" $(iperf plain 10.246.2.2 tcp)"
done
h=$(echo ${R[hg]} | median); p=$(echo ${R[plain]} | median)
printf '\n%-28s %14s %14s %8s\n' "test ($ROUNDS x ${SECS}s, median)" "weft host-gw" "plain routes" "ratio"
printf '%-28s %14s %14s %8s\n' "TCP 1 stream (Gbit/s)" "$h" "$p" "$(python3 -c "print('%.3f' % ($h/$p if $p else 0))")"
echo "all runs: host-gw:${R[hg]} plain:${R[plain]}; MTU ${MTU[hg]} vs 1500"
