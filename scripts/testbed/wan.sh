#!/usr/bin/env bash
# WAN testbed in network namespaces: sender(s) -> router -> delay line -> receiver.
#
#   snd  eth0 10.77.1.2 ──── 10.77.1.1 to-snd   rtr   to-rcv 10.77.2.1 ─┐
#  [snd2 eth0 10.77.3.2 ──── 10.77.3.1 to-snd2  rtr]                    │ (L2)
#                                                  dly: dly-a <─delay─> dly-b
#   rcv  eth0 10.77.2.2 ────────────────────────────────────────────────┘
#
# The bottleneck is a TBF qdisc: on the router's egress toward the receiver
# (--bottleneck router, the default: a WAN router the sender cannot see) or on
# the sender's own egress (--bottleneck sender: where the eBPF monitor sees it).
# Propagation delay comes from lowtide-delayline (benches/delayline), an
# AF_PACKET bridge in its own namespace holding frames rtt/2 each way; the
# kernel has no netem. Offloads are off on every veth so frames are wire-sized.
#
# Usage:
#   wan.sh up   [--name NAME] [--rate 20mbit] [--rtt-ms 40] [--queue-ms 200 | --limit BYTES]
#               [--burst BYTES] [--bottleneck router|sender] [--senders 1|2] [--rt-prio 60]
#   wan.sh run  [same options] -- COMMAND [ARGS...]   # up, run COMMAND with LT_* set, always down
#               (COMMAND runs with stdin from /dev/null; INT/TERM are passed on to it)
#   wan.sh down --name NAME
#   wan.sh status --name NAME
#
# --rt-prio N runs the delay line at SCHED_FIFO priority N (default 60; 0 =
# normal scheduling): on a busy host a normal-priority delay line wakes late
# and adds milliseconds of jitter that look like queueing delay.
#
# `up` prints shell assignments (LT_NS_SND=..., LT_ADDR_RCV=...) also kept in
# /run/lowtide-testbed/NAME/env; run commands in the namespaces with
# `ip netns exec "$LT_NS_SND" ...`. Names are unique per run (lt<PID> unless
# --name is given), so testbeds can run side by side. Needs root.
set -euo pipefail

STATE_ROOT=/run/lowtide-testbed
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# Bounded waits (polls of 0.1 s).
READY_POLLS_MAX=50
STOP_POLLS_MAX=30

die() { echo "wan.sh: $*" >&2; exit 1; }
log() { echo "wan.sh: $*" >&2; }

name="lt$$"
rate=20mbit
rtt_ms=40
queue_ms=200
limit=""
burst=""
bottleneck=router
senders=1
rt_prio=60

parse_opts() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --name) name=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      --rtt-ms) rtt_ms=$2; shift 2 ;;
      --queue-ms) queue_ms=$2; shift 2 ;;
      --limit) limit=$2; shift 2 ;;
      --burst) burst=$2; shift 2 ;;
      --bottleneck) bottleneck=$2; shift 2 ;;
      --senders) senders=$2; shift 2 ;;
      --rt-prio) rt_prio=$2; shift 2 ;;
      --) shift; rest=("$@"); return 0 ;;
      *) die "unknown option $1 (see the header of $0)" ;;
    esac
  done
  rest=()
}

# "20mbit" -> bits per second
rate_bps() {
  local r=${1,,}
  case "$r" in
    *gbit) echo $(( ${r%gbit} * 1000000000 )) ;;
    *mbit) echo $(( ${r%mbit} * 1000000 )) ;;
    *kbit) echo $(( ${r%kbit} * 1000 )) ;;
    *bit) echo "${r%bit}" ;;
    *) die "rate $1: use e.g. 20mbit, 500kbit" ;;
  esac
}

delayline_bin() {
  if [ -n "${LOWTIDE_DELAYLINE:-}" ]; then echo "$LOWTIDE_DELAYLINE"; return; fi
  local target=${CARGO_TARGET_DIR:-$REPO/target}
  local bin=$target/release/lowtide-delayline
  if [ ! -x "$bin" ]; then
    log "building lowtide-delayline (release) into $target"
    (cd "$REPO" && cargo build -q --release -p lowtide-delayline) >&2
  fi
  echo "$bin"
}

ns_names() {
  NS_SND=$name-snd; NS_SND2=$name-snd2; NS_RTR=$name-rtr; NS_DLY=$name-dly; NS_RCV=$name-rcv
}

down() {
  ns_names
  local state=$STATE_ROOT/$name
  if [ -f "$state/delayline.pid" ]; then
    local pid; pid=$(cat "$state/delayline.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      local i=0
      while kill -0 "$pid" 2>/dev/null && [ $i -lt $STOP_POLLS_MAX ]; do sleep 0.1; i=$((i + 1)); done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    [ -f "$state/delayline.log" ] && sed 's/^/wan.sh: /' "$state/delayline.log" | grep 'forwarded' >&2 || true
  fi
  for ns in "$NS_SND" "$NS_SND2" "$NS_RTR" "$NS_DLY" "$NS_RCV"; do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$state"
}

# Offloads off: wire-sized frames for TBF and the delay line (see benches/delayline).
no_offloads() { ip netns exec "$1" ethtool -K "$2" tso off gso off gro off tx off >/dev/null 2>&1 || true; }

new_ns() {
  ip netns add "$1"
  ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$1" link set lo up
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, qdiscs)"
  case "$bottleneck" in router|sender) ;; *) die "--bottleneck router|sender" ;; esac
  case "$senders" in 1|2) ;; *) die "--senders 1|2" ;; esac
  [ ${#name} -le 24 ] || die "--name at most 24 characters"
  local bps; bps=$(rate_bps "$rate")
  [ -n "$limit" ] || limit=$(( bps / 8 * queue_ms / 1000 ))
  [ "$limit" -ge 3000 ] || limit=3000
  # At least one timer tick of tokens (HZ <= 1000; 250 common), or the rate is not reached.
  [ -n "$burst" ] || burst=$(( bps / 8 / 250 ))
  [ "$burst" -ge 3200 ] || burst=3200
  local delay_us=$(( rtt_ms * 1000 / 2 ))
  local bin; bin=$(delayline_bin)
  [ -x "$bin" ] || die "no delay line binary at $bin"
  ns_names
  ip netns list | grep -q "^$NS_RTR\b" && die "a testbed named $name exists (wan.sh down --name $name)"
  local state=$STATE_ROOT/$name
  mkdir -p "$state"
  trap 'log "setup failed, tearing down"; down' EXIT

  for ns in "$NS_SND" "$NS_RTR" "$NS_DLY" "$NS_RCV"; do new_ns "$ns"; done
  [ "$senders" = 2 ] && new_ns "$NS_SND2"

  # sender <-> router
  ip -n "$NS_SND" link add eth0 type veth peer name to-snd netns "$NS_RTR"
  ip -n "$NS_SND" addr add 10.77.1.2/24 dev eth0
  ip -n "$NS_RTR" addr add 10.77.1.1/24 dev to-snd
  if [ "$senders" = 2 ]; then
    ip -n "$NS_SND2" link add eth0 type veth peer name to-snd2 netns "$NS_RTR"
    ip -n "$NS_SND2" addr add 10.77.3.2/24 dev eth0
    ip -n "$NS_RTR" addr add 10.77.3.1/24 dev to-snd2
  fi
  # router <-> delay line <-> receiver (one L2 segment through the bridge)
  ip -n "$NS_RTR" link add to-rcv type veth peer name dly-a netns "$NS_DLY"
  ip -n "$NS_RCV" link add eth0 type veth peer name dly-b netns "$NS_DLY"
  ip -n "$NS_RTR" addr add 10.77.2.1/24 dev to-rcv
  ip -n "$NS_RCV" addr add 10.77.2.2/24 dev eth0

  local pairs=("$NS_SND eth0" "$NS_RTR to-snd" "$NS_RTR to-rcv" "$NS_DLY dly-a" "$NS_DLY dly-b" "$NS_RCV eth0")
  [ "$senders" = 2 ] && pairs+=("$NS_SND2 eth0" "$NS_RTR to-snd2")
  for p in "${pairs[@]}"; do
    # shellcheck disable=SC2086
    set -- $p
    no_offloads "$1" "$2"
    ip -n "$1" link set "$2" up
  done
  ip netns exec "$NS_RTR" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$NS_SND" route add default via 10.77.1.1
  [ "$senders" = 2 ] && ip -n "$NS_SND2" route add default via 10.77.3.1
  ip -n "$NS_RCV" route add default via 10.77.2.1

  # the bottleneck
  local tbf_ns=$NS_RTR tbf_dev=to-rcv
  if [ "$bottleneck" = sender ]; then tbf_ns=$NS_SND; tbf_dev=eth0; fi
  ip netns exec "$tbf_ns" tc qdisc replace dev "$tbf_dev" root tbf rate "$rate" burst "$burst" limit "$limit"

  # the delay line
  local rt=()
  [[ "$rt_prio" =~ ^[0-9]+$ ]] && [ "$rt_prio" -le 99 ] || die "--rt-prio 0..99"
  [ "$rt_prio" -gt 0 ] && rt=(chrt -f "$rt_prio")
  ip netns exec "$NS_DLY" "${rt[@]}" "$bin" --if-a dly-a --if-b dly-b --delay-us "$delay_us" \
    >"$state/delayline.log" 2>&1 &
  echo $! >"$state/delayline.pid"
  local i=0
  until ip netns exec "$NS_SND" ping -c1 -W1 -q 10.77.2.2 >/dev/null 2>&1; do
    i=$((i + 1))
    kill -0 "$(cat "$state/delayline.pid")" 2>/dev/null || { cat "$state/delayline.log" >&2; die "delay line exited"; }
    [ $i -lt $READY_POLLS_MAX ] || die "receiver not reachable through the delay line"
    sleep 0.1
  done

  cat >"$state/env" <<ENV
LT_NAME=$name
LT_NS_SND=$NS_SND
LT_NS_RTR=$NS_RTR
LT_NS_DLY=$NS_DLY
LT_NS_RCV=$NS_RCV
LT_NS_SND2=$([ "$senders" = 2 ] && echo "$NS_SND2")
LT_ADDR_SND=10.77.1.2
LT_ADDR_SND2=$([ "$senders" = 2 ] && echo 10.77.3.2)
LT_ADDR_RCV=10.77.2.2
LT_IF_SND=eth0
LT_BOTTLENECK=$bottleneck
LT_BOTTLENECK_NS=$tbf_ns
LT_BOTTLENECK_DEV=$tbf_dev
LT_RATE_BPS=$bps
LT_RTT_MS=$rtt_ms
LT_QUEUE_LIMIT_BYTES=$limit
LT_TBF_BURST_BYTES=$burst
LT_DELAYLINE_PID=$(cat "$state/delayline.pid")
ENV
  trap - EXIT
  cat "$state/env"
}

cmd=${1:-}
[ -n "$cmd" ] || die "usage: wan.sh up|down|run|status [options] (see the header of $0)"
shift
parse_opts "$@"
case "$cmd" in
  up) up ;;
  down) down ;;
  status)
    [ -f "$STATE_ROOT/$name/env" ] || die "no testbed named $name"
    cat "$STATE_ROOT/$name/env"
    # shellcheck disable=SC1090
    . "$STATE_ROOT/$name/env"
    ip netns exec "$LT_BOTTLENECK_NS" tc -s qdisc show dev "$LT_BOTTLENECK_DEV" ;;
  run)
    [ ${#rest[@]} -gt 0 ] || die "run needs -- COMMAND"
    trap down EXIT
    envs=$(up)
    trap down EXIT
    set -a
    eval "$envs"
    set +a
    # In the background so that INT/TERM reach this shell at once (bash
    # defers traps until a foreground child ends): forward them, tear down.
    "${rest[@]}" &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null; exit 143' TERM
    trap 'kill -INT "$child" 2>/dev/null; exit 130' INT
    status=0
    wait "$child" || status=$?
    exit $status ;;
  *) die "unknown command $cmd" ;;
esac
