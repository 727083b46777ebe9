#!/usr/bin/env bash
# LAN benchmark: Lowtide foreground transfer (io_uring driver, portable driver)
# against iperf3 TCP over the same veth pair between two network namespaces.
#
#   scripts/bench-lan.sh [--size-mib N] [--runs N] [--json PATH]
#                        [--modes "offload software"]
#                        [--tools "lowtide-uring lowtide-uring-enc lowtide-uring-zc lowtide-portable iperf3-tcp"]
#                        [--zero-copy auto|on|off] [--bin PATH] [--no-build] [--logs DIR]
#                        [--perf DIR]
#
# Needs root, iproute2, ethtool, iperf3 and GNU time (/usr/bin/time).
# Tools: lowtide-uring (`--driver uring`, `--zero-copy auto` unless
# --zero-copy says otherwise: it probes and drops zero-copy send when the
# kernel reports copying, as it does on veth), lowtide-uring-zc (`--driver
# uring --zero-copy on`: SENDMSG_ZC forced, to measure what the copy fallback
# costs; table only, not in the JSON), lowtide-portable (`--driver portable`),
# lowtide-uring-enc (lowtide-uring with `fetch --encrypt`: every data payload
# sealed with AES-256-GCM; the script prints its cost against lowtide-uring
# measured in the same run), iperf3-tcp.
# Default: a 1 GiB file, 1 run. Every case runs in both segmentation modes:
#   offload   the veth's default offloads. GSO/TSO super-packets (up to 64 KB)
#             cross the veth unsplit, which no real NIC path does: flattering
#             to every tool, most of all to UDP GSO.
#   software  segmentation in software: `ethtool -K tx-udp-segmentation off
#             tx-tcp-segmentation off` (plus the tcp6/ecn/mangleid variants)
#             on both veth ends. The stack still builds GSO super-packets
#             (TCP always does; Lowtide's UDP_SEGMENT sends do too), but the
#             device no longer claims it can segment them, so
#             validate_xmit_skb() splits them into MTU-sized packets in
#             software before they reach the veth -- what happens in front of
#             a NIC without TSO/USO. `tx-generic-segmentation` (GSO) is left
#             on: with it off the kernel still segments in software at the same
#             point (TCP has no non-GSO path since 4.x), so it changes nothing
#             that matters here. The script checks the effect instead of
#             trusting it: the "pkt" column is the sender veth's tx_bytes /
#             tx_packets during the case (~1500 B = segmented; tens of KB =
#             super-packets crossed the veth whole).
#
# Measurement, the same for every tool:
#   goodput   file bytes * 8 / wall time of the process that completes the
#             transfer (the Lowtide fetch; the iperf3 client), timed by this
#             script around the process, start-up and tear-down included.
#   CPU       utime + stime of the sender and receiver processes, all threads,
#             from getrusage(RUSAGE_CHILDREN) as reported by `/usr/bin/time -f`
#             wrapping each process (10 ms resolution), divided by GiB moved.
#             Process start-up is included on both sides for every tool; the
#             file is hashed into the sender's store (`lowtide-xfer add`)
#             before any timing.
#   Data flows from namespace A (10.201.0.1: Lowtide server / iperf3 client)
#   to namespace B (10.201.0.2: Lowtide fetch / iperf3 -s -1).
#   Lowtide's receiver writes the file into a fresh store on /dev/shm (tmpfs)
#   when it fits, else /tmp (disk), and fsyncs as it verifies; iperf3 TCP
#   discards what it receives (memory to memory). The store location is
#   printed. TCP uses the system's default congestion control (printed).
#
# --logs DIR keeps every process's log, timing and JSON. --perf DIR also
# records a `perf record -e cpu-clock -g` profile of each sender and receiver
# process (DIR/<tool>-<mode>-<run>-{sender,receiver}.data; read them with
# `perf report -i FILE --no-children`). Profiling perturbs the figures: use it
# to see where the time goes, not for the table.
#
# With --runs N each case runs N times (cases interleaved) and the median of
# each figure is reported. --json PATH writes:
#   {"cases":[{"tool":"lowtide-uring"|"lowtide-portable"|"iperf3-tcp",
#     "segmentation":"offload"|"software","goodput_gbps":F,
#     "sender_cpu_s_per_gib":F,"receiver_cpu_s_per_gib":F}]}
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib=1024 runs=1 json_out="" modes="offload software"
tools="lowtide-uring lowtide-uring-enc lowtide-uring-zc lowtide-portable iperf3-tcp" zero_copy=auto bin="" build=1 logs="" perf_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --json) json_out="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --tools) tools="$2"; shift 2 ;;
    --zero-copy) zero_copy="$2"; shift 2 ;;
    --bin) bin="$2"; build=0; shift 2 ;;
    --no-build) build=0; shift ;;
    --logs) logs="$2"; shift 2 ;;
    --perf) perf_dir="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$size_mib$runs" in *[!0-9]*) echo "--size-mib and --runs take positive integers" >&2; exit 2 ;; esac
[ "$size_mib" -gt 0 ] && [ "$runs" -gt 0 ] || { echo "--size-mib and --runs must be > 0" >&2; exit 2; }
for m in $modes; do case "$m" in offload|software) ;; *) echo "unknown mode $m" >&2; exit 2 ;; esac; done
for t in $tools; do case "$t" in lowtide-uring|lowtide-uring-enc|lowtide-uring-zc|lowtide-portable|iperf3-tcp) ;; *) echo "unknown tool $t" >&2; exit 2 ;; esac; done
[ "$(id -u)" = 0 ] || { echo "bench-lan.sh needs root (network namespaces, ethtool)" >&2; exit 1; }
for c in ip ethtool iperf3 /usr/bin/time awk; do
  command -v "$c" >/dev/null || { echo "missing $c (apt-get install iproute2 ethtool iperf3 time)" >&2; exit 1; }
done

if [ -n "$perf_dir" ]; then
  command -v perf >/dev/null || { echo "--perf needs perf (apt-get install linux-perf)" >&2; exit 1; }
  mkdir -p "$perf_dir"
  perf_dir="$(realpath "$perf_dir")"
fi

if [ "$build" = 1 ]; then
  echo "== building lowtide-xfer (release)" >&2
  cargo build --release -p lowtide-xfer --bin lowtide-xfer >&2
fi
[ -n "$bin" ] || bin="${CARGO_TARGET_DIR:-target}/release/lowtide-xfer"
bin="$(realpath "$bin")"
[ -x "$bin" ] || { echo "no lowtide-xfer at $bin (build it or pass --bin)" >&2; exit 1; }

bytes=$((size_mib << 20))
# Work dir: tmpfs when the source file, the sender's store copy and one
# receiver store fit with room to spare; otherwise /tmp.
need_kib=$((size_mib * 1024 * 3 + 512 * 1024))
if [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')" -gt "$need_kib" ] 2>/dev/null; then
  work="$(mktemp -d /dev/shm/ltlan.XXXXXX)" store_fs="/dev/shm (tmpfs)"
else
  work="$(mktemp -d /tmp/ltlan.XXXXXX)" store_fs="/tmp (disk)"
fi

ns_a="ltlan$$-a" ns_b="ltlan$$-b" dev_a="lt$$a" dev_b="lt$$b"
ip_a=10.201.0.1 ip_b=10.201.0.2
pids=()

cleanup() {
  local p
  # Each pid is a /usr/bin/time process: stop the measured tool under it
  # (time then exits), and time itself in case it had not started the tool yet.
  for p in "${pids[@]}"; do
    pkill -TERM -P "$p" 2>/dev/null || true
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  if [ -n "$logs" ] && [ -d "$work" ]; then
    mkdir -p "$logs" && cp "$work"/*.log "$work"/*.time "$work"/*.json "$work"/results "$logs"/ 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add "$dev_a" netns "$ns_a" type veth peer name "$dev_b" netns "$ns_b"
ip -n "$ns_a" addr add "$ip_a/24" dev "$dev_a"
ip -n "$ns_b" addr add "$ip_b/24" dev "$dev_b"
for n in "$ns_a" "$ns_b"; do ip -n "$n" link set lo up; done
ip -n "$ns_a" link set "$dev_a" up
ip -n "$ns_b" link set "$dev_b" up
ip netns exec "$ns_a" ping -c 1 -W 2 "$ip_b" >/dev/null

set_mode() {
  local onoff=on
  [ "$1" = software ] && onoff=off
  ip netns exec "$ns_a" ethtool -K "$dev_a" tx-udp-segmentation $onoff tx-tcp-segmentation $onoff \
    tx-tcp6-segmentation $onoff tx-tcp-ecn-segmentation $onoff tx-tcp-mangleid-segmentation $onoff 2>/dev/null
  ip netns exec "$ns_b" ethtool -K "$dev_b" tx-udp-segmentation $onoff tx-tcp-segmentation $onoff \
    tx-tcp6-segmentation $onoff tx-tcp-ecn-segmentation $onoff tx-tcp-mangleid-segmentation $onoff 2>/dev/null
}

# CPU seconds of all ksoftirqd threads (machine-wide): network work deferred
# out of the processes' own context is charged there, not to them.
clk_tck="$(getconf CLK_TCK)"
ksoft_s() {
  local p t=0
  for p in $(pgrep '^ksoftirqd/'); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  awk -v t="$t" -v hz="$clk_tck" 'BEGIN {printf "%.2f", t / hz}'
}

tx_stat() { ip netns exec "$ns_a" cat "/sys/class/net/$dev_a/statistics/tx_$1"; }
now_ns() { date +%s%N; }

# Start `ip netns exec NS /usr/bin/time ... CMD` in the background; sets $bg_pid
# (the time process: `ip netns exec` execs, so it is that pid).
start_timed() {
  local ns="$1" out="$2" log="$3"
  shift 3
  ip netns exec "$ns" /usr/bin/time -f '%e %U %S' -o "$out" "$@" >"$log" 2>&1 &
  bg_pid=$!
  pids+=("$bg_pid")
}

# The single child of a /usr/bin/time process (the measured tool).
child_of() {
  local i
  for i in $(seq 1 100); do
    local c
    c="$(cat "/proc/$1/task/$1/children" 2>/dev/null | awk '{print $1}')"
    [ -n "$c" ] && { echo "$c"; return; }
    sleep 0.05
  done
  return 1
}

wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local limit=$(($1 * 20))
  shift
  local i
  for i in $(seq 1 "$limit"); do
    "$@" && return 0
    sleep 0.05
  done
  return 1
}

forget_pid() {
  local p keep=()
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

# With --perf: profile the running process $1 into $perf_dir/$2 until
# perf_finish (servers); perf_wrap NAME prints the command prefix that runs a
# client under perf from its start.
perf_pids=()
perf_attach() {
  [ -n "$perf_dir" ] && [ -n "$1" ] || return 0
  perf record -q -e cpu-clock -g -p "$1" -o "$perf_dir/$2" >/dev/null 2>&1 &
  perf_pids+=("$!")
  pids+=("$!")
  wait_for 10 test -s "$perf_dir/$2" || true
  sleep 0.2
}
perf_wrap=()
set_perf_wrap() {
  perf_wrap=()
  [ -z "$perf_dir" ] || perf_wrap=(perf record -q -e cpu-clock -g -o "$perf_dir/$1" --)
}
perf_finish() {
  local p
  for p in "${perf_pids[@]}"; do
    kill -INT "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    forget_pid "$p"
  done
  perf_pids=()
}

timeout_secs=$((60 + size_mib / 8))

echo "== preparing a ${size_mib} MiB file in $store_fs" >&2
head -c "$bytes" /dev/urandom >"$work/file"
export LOWTIDE_KEY="bench-lan-$$-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export LOWTIDE_LOG="${LOWTIDE_LOG:-warn}"
id="$("$bin" --store "$work/tx-store" add "$work/file" | awk '{print $1}')"
rm -f "$work/file" # the sender serves from its store's copy
echo "== content $id" >&2

results="$work/results"
: >"$results"
port=4700

# run_lowtide DRIVER ZERO_COPY TOOL MODE RUN [FETCH FLAG]: one Lowtide transfer; appends a result line.
run_lowtide() {
  local driver="$1" zc="$2" tool="$3" mode="$4" run="$5" tag="$3-$4-$5" extra=("${@:6}")
  local rx="$work/rx-$tag"
  port=$((port + 1))
  start_timed "$ns_a" "$work/srv-$tag.time" "$work/srv-$tag.log" \
    "$bin" --store "$work/tx-store" --driver "$driver" --zero-copy "$zc" serve --listen "$ip_a:$port"
  local srv=$bg_pid
  wait_for 20 grep -q "serving on" "$work/srv-$tag.log" || {
    echo "lowtide server did not start:" >&2
    cat "$work/srv-$tag.log" >&2
    exit 1
  }
  local srv_child
  srv_child="$(child_of "$srv")"
  perf_attach "$srv_child" "$tag-sender.data"
  local p0 b0 k0 t0 t1 rc=0
  p0="$(tx_stat packets)" b0="$(tx_stat bytes)" k0="$(ksoft_s)"
  t0="$(now_ns)"
  # In the background and waited for, so that INT/TERM reach the trap at once.
  set_perf_wrap "$tag-receiver.data"
  ip netns exec "$ns_b" "${perf_wrap[@]}" /usr/bin/time -f '%e %U %S' -o "$work/cli-$tag.time" \
    "$bin" --store "$rx" --driver "$driver" --zero-copy "$zc" fetch "$id" --from "$ip_a:$port" \
    --json "$work/cli-$tag.json" -q --timeout-secs "$timeout_secs" "${extra[@]}" >"$work/cli-$tag.log" 2>&1 &
  local cli=$!
  pids+=("$cli")
  wait "$cli" || rc=$?
  t1="$(now_ns)"
  forget_pid "$cli"
  local pkts=$(($(tx_stat packets) - p0)) txb=$(($(tx_stat bytes) - b0)) ksoft
  ksoft="$(awk -v a="$k0" -v b="$(ksoft_s)" 'BEGIN {print b - a}')"
  kill -INT "$srv_child" 2>/dev/null || true
  wait "$srv" || true
  forget_pid "$srv"
  perf_finish
  rm -rf "$rx"
  if [ "$rc" != 0 ]; then
    echo "lowtide fetch ($tool, $mode) failed with status $rc:" >&2
    cat "$work/cli-$tag.log" >&2
    echo "server log:" >&2
    cat "$work/srv-$tag.log" >&2
    exit 1
  fi
  local own
  own="$(grep -o '"goodput_gbps": *[0-9.e+-]*' "$work/cli-$tag.json" | awk -F: '{printf "%.2f", $2}')"
  record "$tool" "$mode" "$t0" "$t1" "$work/srv-$tag.time" "$work/cli-$tag.time" "$pkts" "$txb" "$ksoft" "$own" \
    "$(grep -o 'served .*' "$work/srv-$tag.log" | tail -1)"
}

# run_iperf3 MODE RUN: one iperf3 TCP transfer of the same byte count, A -> B.
run_iperf3() {
  local mode="$1" run="$2" tag="iperf3-$1-$2"
  port=$((port + 1))
  start_timed "$ns_b" "$work/srv-$tag.time" "$work/srv-$tag.log" \
    iperf3 -s -1 -B "$ip_b" -p "$port"
  local srv=$bg_pid
  wait_for 20 sh -c "ip netns exec '$ns_b' ss -Hltn 'sport = :$port' | grep -q ." || {
    echo "iperf3 server did not start:" >&2
    cat "$work/srv-$tag.log" >&2
    exit 1
  }
  [ -z "$perf_dir" ] || perf_attach "$(child_of "$srv" || true)" "$tag-receiver.data"
  local p0 b0 k0 t0 t1 rc=0
  p0="$(tx_stat packets)" b0="$(tx_stat bytes)" k0="$(ksoft_s)"
  t0="$(now_ns)"
  set_perf_wrap "$tag-sender.data"
  ip netns exec "$ns_a" "${perf_wrap[@]}" /usr/bin/time -f '%e %U %S' -o "$work/cli-$tag.time" \
    iperf3 -c "$ip_b" -p "$port" -B "$ip_a" -n "$bytes" -J >"$work/cli-$tag.json" 2>"$work/cli-$tag.log" &
  local cli=$!
  pids+=("$cli")
  wait "$cli" || rc=$?
  t1="$(now_ns)"
  forget_pid "$cli"
  local pkts=$(($(tx_stat packets) - p0)) txb=$(($(tx_stat bytes) - b0)) ksoft
  ksoft="$(awk -v a="$k0" -v b="$(ksoft_s)" 'BEGIN {print b - a}')"
  if ! wait_for 10 sh -c "! kill -0 $srv 2>/dev/null"; then
    kill -TERM "$(child_of "$srv")" 2>/dev/null || true
  fi
  wait "$srv" || true
  forget_pid "$srv"
  perf_finish
  if [ "$rc" != 0 ]; then
    echo "iperf3 client ($mode) failed with status $rc:" >&2
    cat "$work/cli-$tag.log" "$work/cli-$tag.json" >&2
    exit 1
  fi
  # iperf3's own figure: receiver side bits_per_second of the sum_received block.
  local own
  own="$(awk '/"sum_received"/ {f=1} f && /"bits_per_second"/ {gsub(/[^0-9.e+]/, "", $2); printf "%.2f", $2 / 1e9; exit}' \
    "$work/cli-$tag.json")"
  record iperf3-tcp "$mode" "$t0" "$t1" "$work/cli-$tag.time" "$work/srv-$tag.time" "$pkts" "$txb" "$ksoft" "$own" \
    "retransmits $(grep -o '"retransmits": *[0-9]*' "$work/cli-$tag.json" | tail -1 | awk -F: '{print $2+0}')"
}

# record TOOL MODE T0 T1 SENDER_TIME RECEIVER_TIME TXPKTS TXBYTES KSOFTIRQD_S OWN NOTE
# Result line: tool mode goodput snd_cpu_per_gib rcv_cpu_per_gib snd_user snd_sys rcv_user rcv_sys pkt
#   ksoftirqd_per_gib own | note
record() {
  local s r
  s="$(cat "$5")" r="$(cat "$6")"
  awk -v tool="$1" -v mode="$2" -v t0="$3" -v t1="$4" -v s="$s" -v r="$r" -v pk="$7" -v tb="$8" \
    -v ks="$9" -v own="${10:-?}" -v note="${11}" -v bytes="$bytes" 'BEGIN {
      split(s, S, " "); split(r, R, " ")
      secs = (t1 - t0) / 1e9; gib = bytes / 2^30
      printf "%s %s %.3f %.3f %.3f %.2f %.2f %.2f %.2f %d %.3f %s | %s\n", tool, mode, bytes * 8 / secs / 1e9,
        (S[2] + S[3]) / gib, (R[2] + R[3]) / gib, S[2], S[3], R[2], R[3], (pk > 0 ? tb / pk : 0), ks / gib, own, note
    }' >>"$results"
  tail -1 "$results" | awk '{printf "   %-16s %-8s %6.2f Gbit/s  CPU s/GiB: sender %5.2f receiver %5.2f (ksoftirqd %4.2f)  pkt %d B\n", $1, $2, $3, $4, $5, $11, $10}' >&2
}

echo "== TCP congestion control: $(cat /proc/sys/net/ipv4/tcp_congestion_control); receiver store on $store_fs" >&2
for run in $(seq 1 "$runs"); do
  for mode in $modes; do
    set_mode "$mode"
    echo "== run $run/$runs, segmentation: $mode" >&2
    for tool in $tools; do
      case "$tool" in
        lowtide-uring) run_lowtide uring "$zero_copy" lowtide-uring "$mode" "$run" ;;
        lowtide-uring-enc) run_lowtide uring "$zero_copy" lowtide-uring-enc "$mode" "$run" --encrypt ;;
        lowtide-uring-zc) run_lowtide uring on lowtide-uring-zc "$mode" "$run" ;;
        lowtide-portable) run_lowtide portable auto lowtide-portable "$mode" "$run" ;;
        iperf3-tcp) run_iperf3 "$mode" "$run" ;;
      esac
    done
  done
done

# Medians per (tool, mode) over runs, in the order the cases ran.
summary="$work/summary"
awk '
  { key = $1 " " $2; if (!(key in n)) order[++k] = key; n[key]++
    for (f = 3; f <= 11; f++) v[key, f, n[key]] = $f }
  function median(key, f,   m, i, j, t, a) {
    m = n[key]; for (i = 1; i <= m; i++) a[i] = v[key, f, i]
    for (i = 2; i <= m; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
  }
  END { for (i = 1; i <= k; i++) { key = order[i]; printf "%s", key
          for (f = 3; f <= 11; f++) printf " %s", median(key, f); printf " %d\n", n[key] } }
' "$results" >"$summary"

echo
echo "Lowtide vs iperf3 TCP over veth, ${size_mib} MiB, median of $runs run(s); receiver store on $store_fs"
printf '%-17s %-9s %7s %14s %14s %15s %15s %7s %10s\n' tool segm. "Gbit/s" "snd CPU s/GiB" "rcv CPU s/GiB" \
  "snd user/sys s" "rcv user/sys s" "pkt B" "ksirq s/GiB"
awk '{printf "%-17s %-9s %7.2f %14.2f %14.2f %7.2f/%-7.2f %7.2f/%-7.2f %7d %10.2f\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11}' "$summary"
echo "(pkt B: sender veth tx_bytes/tx_packets; ksirq: machine-wide ksoftirqd CPU during the case, in no tool's figure)"
echo
echo "Ratios lowtide / iperf3-tcp (goodput; sender CPU per GiB; receiver CPU per GiB):"
awk '{ g[$1, $2] = $3; s[$1, $2] = $4; r[$1, $2] = $5; modes[$2] = 1 }
  END { split("lowtide-uring lowtide-uring-enc lowtide-uring-zc lowtide-portable", tools, " ")
        for (m in modes) for (t = 1; t <= 4; t++) {
          tool = tools[t]
          if (((tool, m) in g) && (("iperf3-tcp", m) in g) && g["iperf3-tcp", m] > 0)
            printf "  %-9s %-17s goodput %.2fx  sender CPU %sx  receiver CPU %sx\n", m, tool, g[tool, m] / g["iperf3-tcp", m],
              (s["iperf3-tcp", m] > 0 ? sprintf("%.2f", s[tool, m] / s["iperf3-tcp", m]) : "n/a"),
              (r["iperf3-tcp", m] > 0 ? sprintf("%.2f", r[tool, m] / r["iperf3-tcp", m]) : "n/a") } }' "$summary" | sort
if grep -q '^lowtide-uring-enc ' "$summary" && grep -q '^lowtide-uring ' "$summary"; then
  echo
  echo "Encryption cost, lowtide-uring-enc / lowtide-uring in the same run(s) (goodput; sender CPU per GiB; receiver CPU per GiB):"
  awk '{ g[$1, $2] = $3; s[$1, $2] = $4; r[$1, $2] = $5; modes[$2] = 1 }
    END { for (m in modes) if ((("lowtide-uring-enc", m) in g) && (("lowtide-uring", m) in g) && g["lowtide-uring", m] > 0)
            printf "  %-9s goodput %.2fx  sender CPU %.2fx  receiver CPU %.2fx\n", m, g["lowtide-uring-enc", m] / g["lowtide-uring", m],
              s["lowtide-uring-enc", m] / s["lowtide-uring", m], r["lowtide-uring-enc", m] / r["lowtide-uring", m] }' "$summary" | sort
fi
echo
echo "Each run (tool mode Gbit/s sndCPU/GiB rcvCPU/GiB snd-user snd-sys rcv-user rcv-sys pkt-B ksoftirqd/GiB tool's-own-Gbit/s | note):"
sed 's/^/  /' "$results"

if [ -n "$json_out" ]; then
  awk 'BEGIN { printf "{\"cases\":[" }
    $1 == "lowtide-uring-zc" { next }
    { printf "%s{\"tool\":\"%s\",\"segmentation\":\"%s\",\"goodput_gbps\":%.3f,\"sender_cpu_s_per_gib\":%.3f,\"receiver_cpu_s_per_gib\":%.3f}",
        (n++ ? "," : ""), $1, $2, $3, $4, $5 }
    END { print "]}" }' "$summary" >"$json_out"
  echo "wrote $json_out" >&2
fi
