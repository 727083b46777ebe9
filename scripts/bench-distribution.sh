#!/usr/bin/env bash
# Distribution benchmark: the demo topology (scripts/testbed/sites.py: head
# office, two branches behind 20 Mbit/s 40 ms WAN links, a Wi-Fi child site, a
# VPN site), one run, three cases in turn on the same namespaces:
#
#   lowtide        every agent `lowtide-agent get`s the package
#   origin-http    every agent's namespace downloads it from the origin with curl
#   parallel-http  the same with aria2c -x8 -s8 -k1M (a plain parallel downloader)
#
# Usage: scripts/bench-distribution.sh [--size-mb 50] [--json PATH] [--methods a,b,c]
#                                       [--rate 20mbit] [--rtt-ms 40] [--full-json PATH]
#
# Prints a table with the targets next to the figures and, with --json, writes
#   {"package_bytes":N,"cases":[{"method":..,"time_to_last_s":F,
#     "wan_bytes_per_link_max_ratio":F,"origin_bytes_ratio":F,
#     "added_delay_p95_ms":F,"agents_verified":N,"agents":N}]}
# (ratios to the package size). --full-json keeps sites.py's whole report
# (per link, per agent, probe percentiles). How each figure is measured:
# scripts/testbed/README.md. Needs root; installs aria2 etc. with setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "bench-distribution.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, qdiscs): sudo $0 $*"

json=""
full=""
args=(--size-mb 50 --methods lowtide,origin-http,parallel-http)
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    --json) [ $# -ge 2 ] || die "--json needs a path"; json=$2; shift 2 ;;
    --full-json) [ $# -ge 2 ] || die "--full-json needs a path"; full=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

LOWTIDE_WITH_POSTGRES=0 scripts/setup.sh
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p lowtide-server -p lowtide-agent -p lowtide-delayline -p lowtide-wanprobe
python3 scripts/testbed/sites.py cleanup
tmp=$(mktemp -d /tmp/bench-distribution.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
[ -n "$full" ] || full=$tmp/full.json
echo "bench-distribution.sh: load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 scripts/testbed/sites.py run --bin-dir "$target/release" "${args[@]}" --json "$full" >"$tmp/report.txt" || {
  cat "$tmp/report.txt"; die "the run failed (see above)"; }
echo "bench-distribution.sh: load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
cat "$tmp/report.txt"
python3 - "$full" "$json" <<'PY'
import json, sys
full = json.load(open(sys.argv[1]))
size = full["package_bytes"]
keys = ["method", "time_to_last_s", "wan_bytes_per_link_max_ratio", "origin_bytes_ratio",
        "added_delay_p95_ms", "agents_verified", "agents"]
print(f"\nDistribution benchmark: {size / 1e6:.0f} MB package, branch WAN {full['topology']['rate']} "
      f"{full['topology']['rtt_ms']} ms RTT, VPN {full['topology']['vpn_rate']}")
print(f"{'method':<14} {'time to last s':>15} {'WAN bytes/link':>15} {'origin bytes':>13} {'added delay p95':>16} "
      f"{'verified':>9}")
floor = None
for c in full["cases"]:
    floor = c["wan_floor_s"]
    fan = ""
    rvps = [a["time_s"] for a in c["agent_results"] if a.get("you_are_rvp") and a["site"] not in ("hq", "vpn")
            and a["time_s"] is not None]
    if rvps:
        fan = f"  (LAN fan-out after the last branch RVP: {c['time_to_last_s'] - max(rvps):.1f} s)"
    p95 = c["added_delay_p95_ms"]
    print(f"{c['method']:<14} {c['time_to_last_s']:>15.1f} {c['wan_bytes_per_link_max_ratio']:>14.3f}x "
          f"{c['origin_bytes_ratio']:>12.3f}x {('-' if p95 is None else f'{p95:.1f} ms'):>16} "
          f"{c['agents_verified']:>4}/{c['agents']:<4}{fan}")
print(f"{'target':<14} {'<= ' + format(1.25 * floor, '.1f') + ' + fan-out':>15} {'<= 1.05x':>15} {'':>13} "
      f"{'<= 5 ms':>16} {'all':>9}")
print(f"(WAN floor = package / slowest branch WAN rate = {floor:.1f} s; WAN bytes = transport payload counted on "
      f"each branch link, both directions; origin bytes = payload the origin sent; delay = max over WAN links)")
if sys.argv[2]:
    out = {"package_bytes": size, "cases": [{k: c[k] for k in keys} for c in full["cases"]]}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {sys.argv[2]}", file=sys.stderr)
PY
