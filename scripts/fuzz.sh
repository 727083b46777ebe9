#!/usr/bin/env bash
# Run every fuzz target for a bounded time each (CI runs this; so can you).
#
#   scripts/fuzz.sh [--seconds N] [--jobs N] [--quick-build] [--no-asan] [--merge] [--list] [CRATE:TARGET ...]
#
#   --seconds N  time per target (default 20)
#   --jobs N     targets run at once, each a single libFuzzer process on its own
#                core (default: the number of CPUs); every target still gets
#                its --seconds
#   --quick-build  build the fuzz workspace's [profile.dev] (opt-level 1, many
#                codegen units; what `cargo fuzz build --dev` builds) instead of
#                cargo-fuzz's release build with one codegen unit: far quicker
#                to build cold, fewer executions per second (CI uses it: its
#                runs are short)
#   --no-asan    build without AddressSanitizer (cargo-fuzz's default, kept
#                here for the unsafe code); about twice the executions per second.
#                Debug assertions and overflow checks are on either way.
#   --merge      add new interesting inputs to the committed corpus (then
#                minimise it before committing, e.g. `cargo fuzz cmin` or
#                libFuzzer's -merge=1; keep it small)
#   --list       print the targets and exit
#   CRATE:TARGET run only these (e.g. server:manifest); CRATE is engine, server or agent
#
# Fuzz crates: engine/fuzz, server/fuzz, agent/fuzz, members of one workspace
# (fuzz/Cargo.toml, lock file fuzz/Cargo.lock) that is not part of the main one.
# Each target reads its committed corpus in <crate>/fuzz/corpus/<target>;
# without --merge new inputs go to a temporary directory. A crash stops the run
# with exit 1; the input is in <crate>/fuzz/artifacts/<target>/ and the log
# gives the command that replays it. Every crash fixed gets a regression test.
#
# cargo-fuzz is not needed: this script builds every target in one `cargo build`
# with the flags `cargo fuzz build` passes (SanitizerCoverage, --cfg fuzzing,
# -Zsanitizer=address, debug assertions, --target <host>), so shared
# dependencies are built once, and runs the libFuzzer binaries itself.
# RUSTC_BOOTSTRAP=1 (set here) allows the -Z flag on stable Rust. The build goes
# to FUZZ_TARGET_DIR (default: $CARGO_TARGET_DIR or target/, the main build's:
# the fuzz build's own files go under <dir>/<host triple>/, and build scripts
# and proc macros, built without the fuzzing flags, are shared with the main
# build).
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
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) only+=("$1"); shift ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "fuzz.sh: --seconds takes a whole number" >&2; exit 2 ;; esac
case "$jobs" in ''|0|*[!0-9]*) echo "fuzz.sh: --jobs takes a whole number of at least 1" >&2; exit 2 ;; esac

export RUSTC_BOOTSTRAP=1
target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}}"
triple="$(rustc -vV | sed -n 's/^host: //p')"

# The targets: the [[bin]]s of each fuzz crate.
targets=()
for crate in engine server agent; do
  [ -f "$crate/fuzz/Cargo.toml" ] || continue
  for t in $(awk '/^\[\[bin\]\]/ { bin = 1; next } /^\[/ { bin = 0 } bin && /^name *=/ { gsub(/^name *= *"|" *$/, ""); print }' "$crate/fuzz/Cargo.toml"); do
    targets+=("$crate:$t")
  done
done
if [ ${#only[@]} -gt 0 ]; then
  for o in "${only[@]}"; do
    printf '%s\n' "${targets[@]}" | grep -qx "$o" || { echo "fuzz.sh: no target $o (see --list)" >&2; exit 2; }
  done
  targets=("${only[@]}")
fi
if [ "$list" = 1 ]; then printf '%s\n' "${targets[@]}"; exit 0; fi

# cargo-fuzz 0.13's flags for `cargo fuzz build [--dev] --debug-assertions [--sanitizer none]`.
rustflags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
rustflags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
rustflags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
rustflags+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0"
[ "$sanitizer" = none ] || rustflags+=" -Zsanitizer=$sanitizer"
rustflags+=" -Cllvm-args=-sanitizer-coverage-stack-depth -Cdebug-assertions"
build=(--manifest-path fuzz/Cargo.toml --locked --target "$triple" --target-dir "$target_dir")
if [ "$quick" = 1 ]; then
  profile_dir=debug
else
  # Release with one codegen unit: the sancov passes keep ThinLTO from importing anything.
  rustflags+=" -Ccodegen-units=1"
  build+=(--release --config 'profile.release.debug="line-tables-only"')
  profile_dir=release
fi
bins=()
for ct in "${targets[@]}"; do bins+=(--bin "${ct#*:}"); done

echo "== building the fuzz targets (fuzz/Cargo.toml, $profile_dir, sanitizer $sanitizer)" >&2
start=$(date +%s)
RUSTFLAGS="$rustflags${RUSTFLAGS:+ $RUSTFLAGS}" cargo build "${build[@]}" --workspace "${bins[@]}"
echo "   built in $(( $(date +%s) - start )) s" >&2
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"
scratch="$(mktemp -d /tmp/lowtide-fuzz.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT

# Run one target (in the background, from the loop below): its log in $scratch/<crate>-<target>.log.
run_target() {
  local crate="$1" t="$2" corpus="$PWD/$1/fuzz/corpus/$2"
  local dirs=("$corpus")
  if [ "$merge" = 0 ]; then dirs=("$scratch/$crate-$t" "$corpus"); mkdir -p "$scratch/$crate-$t"; fi
  mkdir -p "$PWD/$crate/fuzz/artifacts/$t"
  (cd "$crate/fuzz" && "$target_dir/$triple/$profile_dir/$t" -artifact_prefix="$PWD/artifacts/$t/" "${dirs[@]}" \
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
  echo "fuzz.sh: $ct CRASHED; the input is under $crate/fuzz/artifacts/$t/; replay it with" >&2
  echo "  $target_dir/$triple/$profile_dir/$t $crate/fuzz/artifacts/$t/<file>   (or: cd $crate && cargo fuzz run $t <file>)" >&2
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
