#!/usr/bin/env bash
# The test command: installs what is missing, then format check, clippy, every test
# and a short run of every fuzz target. Each step prints its wall-clock and CPU time.
# Usage: scripts/test.sh            (CI runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

# CI builds a fresh clone once: incremental compilation's caches would only cost time.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi

# `step NAME COMMAND...`: run one step and say how long it took, in wall-clock
# seconds and in CPU seconds (user + system of everything it ran, which the other
# work on a shared machine disturbs less), with the load average at its end.
times_file="$(mktemp /tmp/lowtide-test-times.XXXXXX)"
trap 'rm -f "$times_file"' EXIT
steps=()
# Sets cpu_now: CPU seconds of this shell's finished children (no subshell: it would count its own).
child_cpu() {
  times >"$times_file"
  read -r cpu_now < <(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); n += p[1] * 60 + p[2] } } END { printf "%.0f\n", n }' "$times_file")
}
step() {
  local name="$1" t0 c0 line
  shift
  echo "== $name" >&2
  t0=$(date +%s)
  child_cpu
  c0=$cpu_now
  "$@"
  child_cpu
  line="$(printf '%-10s %5d s wall %6d s CPU   load %s' "$name" $(($(date +%s) - t0)) $((cpu_now - c0)) "$(cut -d' ' -f1-3 /proc/loadavg)")"
  echo "   $line" >&2
  steps+=("$line")
}

step setup scripts/setup.sh

step fmt cargo fmt --all -- --check

step clippy cargo clippy --workspace --all-targets --locked -- -D warnings

# The server's tests run the same suite on SQLite and on a private PostgreSQL.
echo "== PostgreSQL for the server tests (scripts/pg-test.sh)" >&2
# A port (and data directory) of this run's own, so two runs on one machine do not stop each other's database.
export LOWTIDE_PG_PORT="${LOWTIDE_PG_PORT:-$((56000 + $$ % 1000))}"
LOWTIDE_TEST_PG_URL="$(scripts/pg-test.sh start)"
export LOWTIDE_TEST_PG_URL
trap 'scripts/pg-test.sh stop; rm -f "$times_file"' EXIT

# Built first, then run: the step times tell the build from the tests.
step "test build" cargo test --workspace --locked --no-run
step tests cargo test --workspace --locked

# Every fuzz target for a bounded time (LOWTIDE_FUZZ_SECONDS each, default 20; 0 skips):
# mostly a replay of the committed corpora plus a little exploring. Without ASan here:
# no code of ours that a target reaches has an `unsafe` block (the parsers are safe
# Rust; unsafe lives in the socket, io_uring, eBPF and host-facts code), so it would
# find nothing the debug assertions and bounds checks miss, and it makes the build
# slower and each run half as fast. The hour-long runs (scripts/fuzz.sh without
# --no-asan) keep it.
fuzz_seconds="${LOWTIDE_FUZZ_SECONDS:-20}"
if [ "$fuzz_seconds" != 0 ]; then
  step fuzz scripts/fuzz.sh --seconds "$fuzz_seconds" --quick-build --no-asan
fi

echo "== times (scripts/test.sh)" >&2
printf '   %s\n' "${steps[@]}" >&2
