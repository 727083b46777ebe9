#!/usr/bin/env bash
# The test command: installs what is missing, then format check, clippy, and every test.
# Usage: scripts/test.sh            (CI runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check

echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

# The server's tests run the same suite on SQLite and on a private PostgreSQL.
echo "== PostgreSQL for the server tests (scripts/pg-test.sh)" >&2
# A port (and data directory) of this run's own, so two runs on one machine do not stop each other's database.
export LOWTIDE_PG_PORT="${LOWTIDE_PG_PORT:-$((56000 + $$ % 1000))}"
LOWTIDE_TEST_PG_URL="$(scripts/pg-test.sh start)"
export LOWTIDE_TEST_PG_URL
trap 'scripts/pg-test.sh stop' EXIT

echo "== cargo test" >&2
cargo test --workspace --locked

# Every fuzz target for a bounded time (LOWTIDE_FUZZ_SECONDS each, default 20; 0 skips).
fuzz_seconds="${LOWTIDE_FUZZ_SECONDS:-20}"
if [ "$fuzz_seconds" != 0 ]; then
  echo "== fuzzing (scripts/fuzz.sh --seconds $fuzz_seconds --quick-build)" >&2
  scripts/fuzz.sh --seconds "$fuzz_seconds" --quick-build
fi
