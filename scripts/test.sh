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

echo "== cargo test" >&2
cargo test --workspace --locked
