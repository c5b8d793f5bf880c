#!/usr/bin/env bash
# The latency rows (idle ping, sockperf ping-pong) of the userspace paths and of the kernel's
# VXLAN, with what the agents' CPU costs during the idle ping, under two things that move them:
#   - the guest's halt polling (a VM whose cpuidle driver is haltpoll): guest_halt_poll_ns says
#     how long an idle vCPU polls before it halts, and a halted vCPU takes tens of microseconds
#     to wake. The kernel's sockperf wakes both sockperf processes at every exchange, so a ratio
#     to the kernel read on one machine can differ from another's for this reason alone;
#   - Weft's own SpinMicros: the default (200) against its maximum (10000), with which a thread
#     spins across the 5 ms between two pings instead of sleeping.
# Every path and setting takes its turn inside each round.
#
#   sudo tests/bench/latency.sh                       # 3 rounds x 5 s; halt polling as found, 200 us
#   sudo VALUES="0 50000 200000" ROUNDS=5 tests/bench/latency.sh
#   sudo tests/bench/latency.sh --quick               # 1 round of 1 s, 50 pings (CI smoke run)
#
# The halt-polling setting is the machine's, not the namespaces': it is put back on exit,
# whatever happens (but SIGKILL). Where there is no haltpoll driver only "as found" is measured.
set -euo pipefail

ROUNDS=${ROUNDS:-3}; SECS=${SECS:-5}; PINGS=${PINGS:-300}
if [[ "${1:-}" == "--quick" ]]; then ROUNDS=1; SECS=1; PINGS=50; fi
source "$(dirname "$0")/lib.sh"
command -v sockperf >/dev/null || { echo "missing sockperf" >&2; exit 1; }
HP=/sys/module/haltpoll/parameters/guest_halt_poll_ns
if [[ -w $HP ]]; then
  FOUND=$(cat "$HP"); VALUES=${VALUES:-"$FOUND 200000"}
  trap 'echo "$FOUND" > "$HP"; cleanup' EXIT INT TERM
else
  echo "no haltpoll cpuidle driver here: halt polling as found only"
  FOUND=-; VALUES=-
fi
set_poll() { [[ $1 == - ]] || echo "$1" > "$HP"; }

echo "guest_halt_poll_ns as found: $FOUND; measured: $VALUES"
setup_weft udp udp
setup_weft udpspin '{"Type":"udp","SpinMicros":10000}'
setup_weft vxu '{"Type":"vxlan","Userspace":true}'
setup_kernel
PATHS="udp udpspin vxu kvx"
sleep 1

# pingcpu <tag> <setting>: the idle ping's RTT, and the % of one core the path's agents used
# meanwhile (both nodes' agents together).
declare -A R
pingcpu() {
  local t=$1 v=$2 c0 c1 s0 s1 p
  c0=$(cpu_of ${AGENTS[$t]:-}); s0=$(date +%s.%N)
  p=$(pingrtt "$t" "${POD2[$t]}")
  c1=$(cpu_of ${AGENTS[$t]:-}); s1=$(date +%s.%N)
  R[$t-$v-ping]+=" $p"
  R[$t-$v-cpu]+=" $(python3 -c "print('%.0f' % (($c1 - $c0) / ($s1 - $s0) * 100))")"
}
for r in $(seq "$ROUNDS"); do
  for v in $VALUES; do
    set_poll "$v"
    for t in $PATHS; do
      pingcpu "$t" "$v"
      R[$t-$v-sockperf]+=" $(sockperf_pp "$t" "${POD2[$t]}")"
    done
  done
  echo "round $r done"
done
set_poll "$FOUND"

med() { echo ${R[$1]} | median; }
times() { python3 -c "print('%.2fx' % ($1 / $2))"; }
printf '\n%-18s %-9s %14s %12s %14s %26s\n' "guest_halt_poll_ns" "path" "ping RTT (ms)" "agents' CPU" \
  "sockperf (us)" "x kernel: ping / sockperf"
for v in $VALUES; do
  kp=$(med "kvx-$v-ping"); ks=$(med "kvx-$v-sockperf")
  for t in $PATHS; do
    p=$(med "$t-$v-ping"); s=$(med "$t-$v-sockperf"); c="-"; x="-"
    if [[ $t != kvx ]]; then c="$(med "$t-$v-cpu") %"; x="$(times "$p" "$kp") / $(times "$s" "$ks")"; fi
    printf '%-18s %-9s %14s %12s %14s %26s\n' "$v" "$t" "$p" "$c" "$s" "$x"
  done
done
echo "(agents' CPU: % of one core both nodes' agents used during the idle ping)"
for k in "${!R[@]}"; do echo "runs $k:${R[$k]}"; done | sort
