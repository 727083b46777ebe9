#!/usr/bin/env bash
# WAN saturation benchmark (issue 4, item 5): the Lowtide background protocol and
# a TCP CUBIC bulk transfer (reference) on the WAN testbed (scripts/testbed/wan.sh).
#
# For every case (rate x RTT x bottleneck place), on one fresh testbed with two
# senders, in this order:
#   1. idle base RTT: the latency probe alone (3 s);
#   2. foreground solo: iperf3 -C cubic from snd (and from snd2 when the
#      bottleneck is on the router: with it on snd's own egress, snd2's path
#      does not cross it);
#   3. per tool: the background transfer snd -> rcv alone (warm-up, then the
#      solo window: utilisation and added delay), a foreground CUBIC flow from
#      snd, a pause, a foreground flow from snd2 (router only), a pause.
# The latency probe (lowtide-wanprobe probe: 16-byte UDP echo every 10 ms from
# rcv to snd and back through the bottleneck, RTT in µs from CLOCK_MONOTONIC)
# runs throughout; a tap (lowtide-wanprobe tap: AF_PACKET on rcv's eth0)
# counts the wire bytes of every flow arriving at the receiver in 10 ms bins.
# benches/wanprobe/analyze.py turns that into the table, JSON and plots.
#
# Usage: scripts/bench-wan.sh [--quick] [--rates 10,50] [--rtts 20,80]
#          [--bottlenecks router,sender] [--tools lowtide,tcp-cubic]
#          [--queue-ms 200] [--json PATH] [--out DIR] [--allow-foreground]
#          [--warm S] [--solo S] [--fg S] [--rec S] [--rt-prio 50]
#   --quick             10 Mbit/s and 50 Mbit/s at 20 ms, router bottleneck only
#   --allow-foreground  run the Lowtide transfer as a plain (foreground) fetch
#                       when lowtide-xfer has no --background (harness checks only)
#   --lowtide-foreground  always run it as a plain fetch (to compare with the
#                       foreground controller; the rows are then not the background protocol)
#   --rt-prio N         SCHED_FIFO priorities: the testbed's hosts are processes
#                       on one shared machine, and on a busy one a normal-priority
#                       process wakes milliseconds late, which the probe and the
#                       controllers see as queueing delay. By default the delay
#                       line runs at N+10, the probe, echo and tap at N+5, the
#                       transfers (lowtide-xfer, iperf3) at N, as if each host
#                       had a CPU of its own; 0 = normal scheduling for all.
#                       The idle probe's p95/p99 (idle95/99) show the floor left.
# Needs root, iperf3, python3 and gnuplot (installed with apt-get if missing).
# Binaries come from ${CARGO_TARGET_DIR:-target}/release (built if missing;
# LOWTIDE_XFER, LOWTIDE_WANPROBE, LOWTIDE_DELAYLINE override them).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF=$REPO/scripts/bench-wan.sh
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
PORT_LOWTIDE=7000
PORT_ECHO=9000
PORT_BG_TCP=5201
PORT_FG_SND=5202
PORT_FG_SND2=5203
BASE_S=5

log() { echo "bench-wan: $*" >&2; }
die() { echo "bench-wan: $*" >&2; exit 1; }
now_ns() { date +%s%N; }

# ---------------------------------------------------------------- one case ---
# Runs inside `wan.sh run` (LT_* set) as: bench-wan.sh __case DIR
run_case() {
  local dir=$1
  # shellcheck disable=SC1091
  . "$dir/meta.env"
  local events=$dir/events
  : >"$events"
  ev() { echo "$1 $(now_ns)${2:+ $2}" >>"$events"; }
  tc_sent() {
    ip netns exec "$LT_BOTTLENECK_NS" tc -s qdisc show dev "$LT_BOTTLENECK_DEV" |
      awk '/Sent/ {print $2; exit}'
  }
  # Global, not local: the EXIT trap runs after this function has returned.
  pids=()
  # shellcheck disable=SC2317
  cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do stop_pid "$p" TERM; done
  }
  stop_pid() { # PID SIGNAL: signal, wait up to 5 s, then SIGKILL
    local i=0
    kill -"$2" "$1" 2>/dev/null || return 0
    while kill -0 "$1" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  }
  trap cleanup EXIT
  # SCHED_FIFO prefixes (empty with --rt-prio 0): probes above transfers.
  local rt_probe=() rt_ep=()
  if [ "$RT_PRIO" -gt 0 ]; then
    rt_probe=(chrt -f $((RT_PRIO + 5)))
    rt_ep=(chrt -f "$RT_PRIO")
  fi
  trap 'exit 143' TERM
  trap 'exit 130' INT
  # Background processes are started with `ip netns exec` directly (it execs the
  # command), so that $! is the process itself and a signal reaches it.

  ip netns exec "$LT_NS_RCV" "${rt_probe[@]}" "$WANPROBE" tap --iface eth0 --out "$dir/tap.csv" 2>>"$dir/wanprobe.log" &
  local tap_pid=$!
  pids+=($!)
  ip netns exec "$LT_NS_SND" "${rt_probe[@]}" "$WANPROBE" echo --listen "$LT_ADDR_SND:$PORT_ECHO" 2>>"$dir/wanprobe.log" &
  pids+=($!)
  local port
  for port in $PORT_BG_TCP $PORT_FG_SND $PORT_FG_SND2; do
    ip netns exec "$LT_NS_RCV" "${rt_ep[@]}" iperf3 -s -p "$port" >/dev/null 2>&1 &
    pids+=($!)
  done
  local id=""
  if [[ ",$TOOLS," == *,lowtide,* ]]; then
    rm -rf "$SHM/srv-store"
    ip netns exec "$LT_NS_SND" "${rt_ep[@]}" env LOWTIDE_KEY=bench ${LOWTIDE_SERVE_LOG:+LOWTIDE_LOG=$LOWTIDE_SERVE_LOG} "$XFER" --store "$SHM/srv-store" serve --listen "$LT_ADDR_SND:$PORT_LOWTIDE" \
      --add "$SHM/data.bin" >"$dir/serve.out" 2>"$dir/serve.log" &
    pids+=($!)
    local i=0
    until grep -q 'serving on' "$dir/serve.log" 2>/dev/null; do
      i=$((i + 1))
      [ $i -lt 600 ] || die "lowtide-xfer serve did not start: $(cat "$dir/serve.log")"
      kill -0 "${pids[-1]}" 2>/dev/null || die "lowtide-xfer serve exited: $(cat "$dir/serve.log")"
      sleep 0.1
    done
    id=$(awk 'NR==1 {print $1}' "$dir/serve.out")
    [ -n "$id" ] || die "no content id from lowtide-xfer serve"
  fi
  sleep 0.5

  # 1. idle base RTT
  ip netns exec "$LT_NS_RCV" "${rt_probe[@]}" "$WANPROBE" probe --to "$LT_ADDR_SND:$PORT_ECHO" --out "$dir/probe-base.csv" 2>>"$dir/wanprobe.log" &
  local probe_pid=$!
  pids+=($!)
  sleep "$BASE_S"
  stop_pid "$probe_pid" TERM

  # 2. foreground solo
  fg_flow() { # HOST PORT SECONDS LOG
    local ns=$LT_NS_SND
    [ "$1" = snd2 ] && ns=$LT_NS_SND2
    ip netns exec "$ns" "${rt_ep[@]}" iperf3 -c "$LT_ADDR_RCV" -p "$2" -C cubic -t "$3" >"$4" 2>&1 ||
      log "iperf3 from $1 failed: $(tail -2 "$4")"
  }
  local hosts=(snd)
  [ "$SECOND_HOST" = 1 ] && hosts+=(snd2)
  local h
  for h in "${hosts[@]}"; do
    port=$PORT_FG_SND; [ "$h" = snd2 ] && port=$PORT_FG_SND2
    ev "fgsolo_${h}_start"
    fg_flow "$h" "$port" "$FG_S" "$dir/iperf-fgsolo-$h.log"
    ev "fgsolo_${h}_end"
    sleep 1
  done

  # 3. per tool
  local tool total bg_pid
  total=$((WARM_S + SOLO_S + ${#hosts[@]} * (FG_S + REC_S) + 5))
  for tool in ${TOOLS//,/ }; do
    log "  $tool"
    ip netns exec "$LT_NS_RCV" "${rt_probe[@]}" "$WANPROBE" probe --to "$LT_ADDR_SND:$PORT_ECHO" --out "$dir/probe-$tool.csv" 2>>"$dir/wanprobe.log" &
    probe_pid=$!
    pids+=($!)
    sleep 0.5
    ev "bg_start_$tool"
    case "$tool" in
      lowtide)
        rm -rf "$SHM/fetch-store"
        ip netns exec "$LT_NS_RCV" "${rt_ep[@]}" env LOWTIDE_KEY=bench "$XFER" --store "$SHM/fetch-store" fetch "$id" --from "$LT_ADDR_SND:$PORT_LOWTIDE" \
          $BG_FLAG -q --json "$dir/fetch.json" >"$dir/fetch.log" 2>&1 &
        bg_pid=$! ;;
      tcp-cubic)
        ip netns exec "$LT_NS_SND" "${rt_ep[@]}" iperf3 -c "$LT_ADDR_RCV" -p "$PORT_BG_TCP" -C cubic -t "$total" >"$dir/iperf-bg.log" 2>&1 &
        bg_pid=$! ;;
      *) die "unknown tool $tool" ;;
    esac
    pids+=("$bg_pid")
    sleep "$WARM_S"
    ev "tc_solo_start_$tool" "$(tc_sent)"
    ev "solo_start_$tool"
    sleep "$SOLO_S"
    ev "solo_end_$tool"
    ev "tc_solo_end_$tool" "$(tc_sent)"
    kill -0 "$bg_pid" 2>/dev/null || log "  $tool: the background transfer ended before the solo window did ($(tail -1 "$dir/fetch.log" 2>/dev/null))"
    for h in "${hosts[@]}"; do
      port=$PORT_FG_SND; [ "$h" = snd2 ] && port=$PORT_FG_SND2
      ev "fg_${h}_start_$tool"
      fg_flow "$h" "$port" "$FG_S" "$dir/iperf-fg-$h-$tool.log"
      ev "fg_${h}_end_$tool"
      sleep "$REC_S"
    done
    kill -0 "$bg_pid" 2>/dev/null || log "  $tool: the background transfer ended early"
    ev "bg_end_$tool"
    stop_pid "$bg_pid" INT
    stop_pid "$probe_pid" TERM
    sleep 1
  done
  stop_pid "$tap_pid" TERM
  ip netns exec "$LT_BOTTLENECK_NS" tc -s qdisc show dev "$LT_BOTTLENECK_DEV" >"$dir/tc-final.txt"
}

if [ "${1:-}" = __case ]; then
  run_case "$2"
  exit 0
fi

# ------------------------------------------------------------------- main ---
rates=10,50
rtts=20,80
bottlenecks=router,sender
tools=lowtide,tcp-cubic
queue_ms=200
json=""
out=""
allow_fg=0
lowtide_fg=0
WARM_S=4 SOLO_S=8 FG_S=8 REC_S=4
RT_PRIO=50
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) rates=10,50; rtts=20; bottlenecks=router; shift ;;
    --rates) rates=$2; shift 2 ;;
    --rtts) rtts=$2; shift 2 ;;
    --bottlenecks) bottlenecks=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --queue-ms) queue_ms=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --allow-foreground) allow_fg=1; shift ;;
    --lowtide-foreground) lowtide_fg=1; shift ;;
    --warm) WARM_S=$2; shift 2 ;;
    --solo) SOLO_S=$2; shift 2 ;;
    --fg) FG_S=$2; shift 2 ;;
    --rec) REC_S=$2; shift 2 ;;
    --rt-prio) RT_PRIO=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (--help)" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
[[ "$RT_PRIO" =~ ^[0-9]+$ ]] && [ "$RT_PRIO" -le 89 ] || die "--rt-prio 0..89"
command -v iperf3 >/dev/null || die "needs iperf3 (scripts/setup.sh)"
command -v python3 >/dev/null || die "needs python3"
if ! command -v gnuplot >/dev/null; then
  log "installing gnuplot-nox (for the plots)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox; } >/dev/null 2>&1 ||
    log "could not install gnuplot: no plots"
fi
[ -n "$out" ] || out=$TARGET/bench-wan/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
out=$(cd "$out" && pwd)

build() { # PACKAGE BIN VAR
  local bin=$TARGET/release/$2
  if [ -n "${!3:-}" ]; then echo "${!3}"; return; fi
  if [ ! -x "$bin" ]; then
    log "building $2 (release) into $TARGET"
    (cd "$REPO" && cargo build -q --release -p "$1" --bin "$2") >&2
  fi
  echo "$bin"
}
WANPROBE=$(build lowtide-wanprobe lowtide-wanprobe LOWTIDE_WANPROBE)
XFER=""
BG_FLAG=""
if [[ ",$tools," == *,lowtide,* ]]; then
  XFER=$(build lowtide-xfer lowtide-xfer LOWTIDE_XFER)
  if [ "$lowtide_fg" = 1 ]; then
    log "WARNING: --lowtide-foreground: the lowtide rows are FOREGROUND fetches (for comparison)"
  elif "$XFER" fetch --help | grep -q -- '--background'; then
    BG_FLAG=--background
  elif [ "$allow_fg" = 1 ]; then
    log "WARNING: $XFER has no 'fetch --background': the lowtide rows are FOREGROUND fetches"
  else
    die "$XFER has no 'fetch --background' (use --allow-foreground to check the harness with plain fetches)"
  fi
fi
export LOWTIDE_DELAYLINE=${LOWTIDE_DELAYLINE:-$(build lowtide-delayline lowtide-delayline LOWTIDE_DELAYLINE)}

SHM=/dev/shm/lowtide-bench-wan-$$
mkdir -p "$SHM"
trap 'rm -rf "$SHM"' EXIT
if [ -n "$XFER" ]; then
  # Enough for the fastest case to outlast its measurement.
  max_rate=0
  for r in ${rates//,/ }; do [ "$r" -gt "$max_rate" ] && max_rate=$r; done
  secs=$((WARM_S + SOLO_S + 2 * (FG_S + REC_S) + 10))
  mb=$((max_rate * secs / 8 * 13 / 10 + 16))
  log "generating ${mb} MB of content on $SHM"
  head -c "${mb}M" /dev/urandom >"$SHM/data.bin"
fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "uncommitted in engine/: $(git -C "$REPO" status --short engine 2>/dev/null | tr '\n' ' ')"
  echo "lowtide-xfer: ${XFER:-not used} ${BG_FLAG:-(foreground fetch)}"
  echo "args: rates=$rates rtts=$rtts bottlenecks=$bottlenecks tools=$tools queue_ms=$queue_ms rt_prio=$RT_PRIO"
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/provenance.txt"
n=0
log "output in $out"
for b in ${bottlenecks//,/ }; do
  for r in ${rates//,/ }; do
    for rtt in ${rtts//,/ }; do
      n=$((n + 1))
      dir=$out/case-$(printf %02d $n)-${r}mbit-${rtt}ms-$b
      mkdir -p "$dir"
      second=0; [ "$b" = router ] && second=1
      cat >"$dir/meta.env" <<META
RATE_BPS=$((r * 1000000))
RTT_MS=$rtt
BOTTLENECK=$b
QUEUE_MS=$queue_ms
TOOLS=$tools
SECOND_HOST=$second
WARM_S=$WARM_S
SOLO_S=$SOLO_S
FG_S=$FG_S
REC_S=$REC_S
RT_PRIO=$RT_PRIO
BG_FLAG=$BG_FLAG
WANPROBE=$WANPROBE
XFER=$XFER
SHM=$SHM
META
      log "case $n: ${r} Mbit/s, RTT ${rtt} ms, bottleneck on $b, queue ${queue_ms} ms"
      "$REPO/scripts/testbed/wan.sh" run --name "bw$$" --rate "${r}mbit" --rtt-ms "$rtt" --queue-ms "$queue_ms" \
        --bottleneck "$b" --senders 2 --rt-prio $((RT_PRIO > 0 ? RT_PRIO + 10 : 0)) -- bash -c 'env | grep "^LT_" | sort >"$1/testbed.env"; exec "$2" __case "$1"' \
        _ "$dir" "$SELF" 2> >(grep -v '^wan.sh: delayline' >&2) || log "case $n failed (see $dir)"
      grep -h 'QUEUE_LIMIT_BYTES' "$dir/testbed.env" 2>/dev/null | sed 's/^LT_//' >>"$dir/meta.env" || true
    done
  done
done

args=(--out "$out" --plot-all)
[ -n "$json" ] && args+=(--json "$json")
python3 "$REPO/benches/wanprobe/analyze.py" "${args[@]}" | tee "$out/table.txt"
if [ -z "$BG_FLAG" ] && [ -n "$XFER" ]; then
  echo "NOTE: the lowtide rows are FOREGROUND fetches (no --background used)" | tee -a "$out/table.txt"
fi
log "raw data, table and plots in $out"
