#!/usr/bin/env bash
# The Lowtide demo, one command on a fresh Debian machine (as root):
#
#   scripts/demo.sh [--size-mb 200] [--json PATH] [--rate 20mbit] [--rtt-ms 40]
#                   [--agents 4] [--kill-rvp b1] [--keep-work]
#
# Installs what is missing (scripts/setup.sh), builds the release binaries,
# then scripts/testbed/sites.py builds a head office (metadata server with
# SQLite, an origin, 2 agents), two branches each behind its own WAN link
# (TBF bottleneck + delay line, 20 Mbit/s, 40 ms RTT), a Wi-Fi child site under
# branch 1 and a VPN site, in network namespaces; uploads the topology CSV,
# publishes a generated package, enrols the agents and asks every agent to get
# it. It prints a live view (per agent progress, bytes on each WAN link) and a
# final report: per agent the time and the sources used (`get --json`), per
# WAN link the bytes carried as counted on the link, the origin's egress, and
# the delay a 10 ms UDP probe saw added on each WAN link during the transfer.
# Namespaces, processes and files are removed on exit and on Ctrl-C; on a
# failure the files (logs) are kept in /tmp/ltd-<pid>. Other options go to sites.py.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "demo.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, qdiscs): sudo -E env \"PATH=\$PATH\" $0 $*"

args=(--size-mb 200)
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    --size-mb|--json|--rate|--rtt-ms|--agents|--kill-rvp|--vpn-rate|--wifi-agents|--vpn-agents)
      [ $# -ge 2 ] || die "$1 needs a value"; args+=("$1" "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

LOWTIDE_WITH_POSTGRES=0 scripts/setup.sh
target=${CARGO_TARGET_DIR:-$PWD/target}
echo "demo.sh: building release binaries into $target" >&2
cargo build --release -q -p lowtide-server -p lowtide-agent -p lowtide-delayline -p lowtide-wanprobe
python3 scripts/testbed/sites.py cleanup
exec python3 scripts/testbed/sites.py run --methods lowtide --live --bin-dir "$target/release" "${args[@]}"
