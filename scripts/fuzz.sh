#!/usr/bin/env bash
# Run every cargo-fuzz target for a bounded time each (CI runs this; so can you).
#
#   scripts/fuzz.sh [--seconds N] [--jobs N] [--quick-build] [--no-asan] [--merge] [--list] [CRATE:TARGET ...]
#
#   --seconds N  time per target (default 20: all targets together stay within a
#                few minutes of CI, building included)
#   --jobs N     targets run at once, each a single libFuzzer process on its own
#                core (default: the number of CPUs); every target still gets
#                its --seconds
#   --quick-build  build at opt-level 1 with many codegen units (cargo fuzz build
#                --dev and the fuzz crates' [profile.dev]) instead of cargo-fuzz's
#                release build with one codegen unit: far quicker to build cold,
#                fewer executions per second (CI uses it: its runs are short)
#   --no-asan    build without AddressSanitizer (cargo-fuzz's default, kept
#                here for the unsafe code); about twice the executions per second.
#                Debug assertions and overflow checks are on either way.
#   --merge      add new interesting inputs to the committed corpus (then run
#                `cargo fuzz cmin` before committing; keep it small)
#   --list       print the targets and exit
#   CRATE:TARGET run only these (e.g. server:manifest); CRATE is engine, server or agent
#
# Fuzz crates: engine/fuzz, server/fuzz, agent/fuzz (not workspace members).
# Each target reads its committed corpus in <crate>/fuzz/corpus/<target>;
# without --merge new inputs go to a temporary directory. A crash stops the run
# with exit 1; the input is in <crate>/fuzz/artifacts/<target>/ and cargo-fuzz
# prints the command that replays it. Every crash fixed gets a regression test.
# Installs cargo-fuzz if missing; needs RUSTC_BOOTSTRAP=1 (set here) because
# only stable Rust is installed. All crates build into one target directory
# (FUZZ_TARGET_DIR, default $CARGO_TARGET_DIR/fuzz or target/fuzz) so shared
# dependencies are built once.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=20 sanitizer=address merge=0 list=0 quick=0 only=()
jobs="$(nproc 2>/dev/null || echo 1)"
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --quick-build) quick=1; shift ;;
    --no-asan) sanitizer=none; shift ;;
    --merge) merge=1; shift ;;
    --list) list=1; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) only+=("$1"); shift ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "fuzz.sh: --seconds takes a whole number" >&2; exit 2 ;; esac
case "$jobs" in ''|0|*[!0-9]*) echo "fuzz.sh: --jobs takes a whole number of at least 1" >&2; exit 2 ;; esac

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/fuzz}"

targets=()
for crate in engine server agent; do
  [ -d "$crate/fuzz" ] || continue
  for t in $(cd "$crate" && cargo fuzz list); do targets+=("$crate:$t"); done
done
if [ ${#only[@]} -gt 0 ]; then
  for o in "${only[@]}"; do
    printf '%s\n' "${targets[@]}" | grep -qx "$o" || { echo "fuzz.sh: no target $o (see --list)" >&2; exit 2; }
  done
  targets=("${only[@]}")
fi
if [ "$list" = 1 ]; then printf '%s\n' "${targets[@]}"; exit 0; fi

flags=(--sanitizer "$sanitizer" --debug-assertions --target-dir "$target_dir")
if [ "$quick" = 1 ]; then flags+=(--dev); fi
scratch="$(mktemp -d /tmp/lowtide-fuzz.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT

for crate in engine server agent; do
  printf '%s\n' "${targets[@]}" | grep -q "^$crate:" || continue
  echo "== building $crate/fuzz" >&2
  start=$(date +%s)
  (cd "$crate" && cargo fuzz build "${flags[@]}")
  echo "   built in $(( $(date +%s) - start )) s" >&2
done

# Run one target (in the background, from the loop below): its log in $scratch/<crate>-<target>.log.
run_target() {
  local crate="$1" t="$2" corpus="$PWD/$1/fuzz/corpus/$2"
  local dirs=("$corpus")
  if [ "$merge" = 0 ]; then dirs=("$scratch/$crate-$t" "$corpus"); mkdir -p "$scratch/$crate-$t"; fi
  (cd "$crate" && cargo fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1) \
    >"$scratch/$crate-$t.log" 2>&1
}

summary=() failed=()
for ((at = 0; at < ${#targets[@]}; at += jobs)); do
  batch=("${targets[@]:at:jobs}") pids=()
  echo "== ${batch[*]} for $seconds s" >&2
  for ct in "${batch[@]}"; do
    mkdir -p "$PWD/${ct%%:*}/fuzz/corpus/${ct#*:}"
    run_target "${ct%%:*}" "${ct#*:}" &
    pids+=($!)
  done
  for i in "${!batch[@]}"; do
    wait "${pids[$i]}" || failed+=("${batch[$i]}")
  done
  [ ${#failed[@]} = 0 ] || break
done
for ct in "${failed[@]}"; do
  crate="${ct%%:*}" t="${ct#*:}"
  tail -n 60 "$scratch/$crate-$t.log" >&2
  echo "fuzz.sh: $ct CRASHED; the input is under $crate/fuzz/artifacts/$t/ (replay command above)" >&2
done
[ ${#failed[@]} = 0 ] || exit 1
for ct in "${targets[@]}"; do
  crate="${ct%%:*}" t="${ct#*:}" corpus="$PWD/${ct%%:*}/fuzz/corpus/${ct#*:}"
  log="$scratch/$crate-$t.log"
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo '?')
  summary+=("$(printf '%-28s %12s execs  cov %6s  corpus %5s files' "$ct" "$runs" "$cov" "$(ls "$corpus" | wc -l)")")
done
echo "== fuzz summary ($seconds s each, $jobs at once, sanitizer $sanitizer$([ "$quick" = 1 ] && echo ', quick build'))" >&2
printf '%s\n' "${summary[@]}" >&2
