#!/usr/bin/env bash
# The control plane at cluster scale (issue 13): initial sync, one new lease, 1,024 deletions in
# one revision, a restart under ping, memory, and many agents at once, against Debian's etcd
# with fake peers in flannel's format. Each figure is printed beside a reference from the same
# run. As root; `--quick` is the CI variant (1,000 leases, 4 agents, no 20,000-lease table).
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ $(id -u) == 0 ]] || { echo "run as root: the benchmark creates network namespaces" >&2; exit 1; }
exec cargo bench --locked -p weft-tests --bench scale -- "$@"
