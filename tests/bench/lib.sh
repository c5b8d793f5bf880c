# Shared by the benchmark scripts: namespaces, pods, Weft clusters, iperf3 runs. Every name
# starts with $P (unique per run) and everything is removed on exit.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
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

# setup_weft <tag> [backend] [pre-start command] [agent flags]: a two-node Weft cluster with its
# own embedded store ($TMP/<tag>.db). `backend` is a type name (udp unless given) or a whole
# Backend JSON object; the pre-start command runs (in node 1) before the agents start, e.g. to
# store a module; the flags are added to both agents' command lines.
# Sets POD2[<tag>] (the server pod's address) and MTU[<tag>].
declare -A POD2 MTU AGENTS
setup_weft() {
  local t=$1
  node_pair "$t"
  local backend=${2:-udp}
  [[ $backend == "{"* ]] || backend="{\"Type\":\"$backend\"}"
  echo "{\"Network\":\"10.244.0.0/16\",\"Backend\":$backend}" > "$TMP/$t-net.json"
  if [[ -n "${3:-}" ]]; then ip netns exec "$P-$t-n1" bash -c "$3"; fi
  for i in 1 2; do
    ip netns exec "$P-$t-n$i" "$WEFT" agent --iface eth0 --store "$TMP/$t.db" \
      --net-config "$TMP/$t-net.json" --subnet-file "$TMP/$t-n$i.env" \
      --state-dir "$TMP/$t-state$i" --admin-token-file "$TMP/$t-token" ${4:-} >"$TMP/$t-agent$i.log" 2>&1 &
    PIDS+=($!)
    AGENTS[$t]+=" $!"
  done
  for i in 1 2; do
    for _ in $(seq 100); do [[ -s "$TMP/$t-n$i.env" ]] && break; sleep 0.1; done
    [[ -s "$TMP/$t-n$i.env" ]] || { echo "weft agent $t/$i not ready:"; cat "$TMP/$t-agent$i.log"; exit 1; }
    local sub mtu
    sub=$(sed -n 's/^FLANNEL_SUBNET=\(.*\)\.1\/24$/\1/p' "$TMP/$t-n$i.env")
    mtu=$(sed -n 's/^FLANNEL_MTU=//p' "$TMP/$t-n$i.env")
    attach_pod "$t" "$i" "$sub" "$mtu"
    [[ $i == 2 ]] && POD2[$t]=$sub.2
  done
  MTU[$t]=$mtu
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
  elif [[ $mode == tcp4 ]]; then
    out=$(ip netns exec "$P-$t-p1" iperf3 -c "$ip" -P 4 -t "$SECS" -J)
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' <<<"$out"
  else
    out=$(ip netns exec "$P-$t-p1" iperf3 -c "$ip" -u -b 0 -l 64 -t "$SECS" -J)
    python3 -c 'import json,sys; d=json.load(sys.stdin); s=d["end"]["sum"]; print("%.1f" % ((s["packets"]-s["lost_packets"])/s["seconds"]/1e3))' <<<"$out"
  fi
  wait $spid 2>/dev/null || true
}

median() { tr ' ' '\n' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# pingrtt <tag> <ip> -> average RTT in ms of PINGS pings 5 ms apart (an idle path: each ping
# crosses it alone).
pingrtt() {
  ip netns exec "$P-$1-p1" ping -n -q -i 0.005 -c "${PINGS:-300}" -W 1 "$2" | sed -n 's|^rtt [^=]*= [0-9.]*/\([0-9.]*\)/.*|\1|p'
}

# sockperf_pp <tag> <ip> -> average latency in us of sockperf's UDP ping-pong, 64-byte messages.
sockperf_pp() {
  local t=$1 ip=$2 out
  ip netns exec "$P-$t-p2" sockperf sr -i "$ip" -p 11111 >/dev/null 2>&1 &
  local spid=$!
  sleep 0.3
  out=$(ip netns exec "$P-$t-p1" sockperf pp -i "$ip" -p 11111 -m 64 -t "$SECS" 2>&1)
  kill $spid 2>/dev/null; wait $spid 2>/dev/null || true
  sed -n 's/.*avg-latency=\([0-9.]*\).*/\1/p' <<<"$out" | tail -1
}

# udpflows <tag> <ip> [bytes] -> kpps received of 1,000 concurrent UDP flows of 64-byte datagrams
# (or of `bytes`, e.g. 64-1400: sizes that change from one datagram to the next).
UDPFLOWS=${UDPFLOWS_BIN:-$ROOT/target/release/udpflows}
udpflows() {
  local t=$1 ip=$2 bytes=${3:-64} out
  out=$(mktemp)
  ip netns exec "$P-$t-p2" "$UDPFLOWS" recv "$ip" 9999 "$SECS" >"$out" &
  local rpid=$!
  sleep 0.3
  ip netns exec "$P-$t-p1" "$UDPFLOWS" send "$ip" 9999 1000 "$SECS" "$bytes" 2>/dev/null
  wait $rpid 2>/dev/null || true
  cat "$out"; rm -f "$out"
}

# cpu_of <pids...> -> CPU seconds (user + system) the processes used so far, summed.
cpu_of() {
  local s=0 p
  for p in "$@"; do
    s=$(awk -v s="$s" '{ sub(/.*\) /, ""); split($0, f, " "); print s + (f[12] + f[13]) / 100 }' "/proc/$p/stat" 2>/dev/null || echo "$s")
  done
  echo "$s"
}

