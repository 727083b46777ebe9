#!/usr/bin/env bash
# Installs what Lowtide needs to build, test and benchmark on a Debian machine.
# Idempotent: installs only what is missing. Needs root (or sudo) for apt.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
# Rust links with the system C compiler; ring's build script compiles C too.
{ have cc && [ -e /usr/include/stdio.h ]; } || need_apt+=(gcc libc6-dev)
have clang-19 || need_apt+=(clang-19 llvm-19)
[ -e /usr/include/bpf/bpf_helpers.h ] || need_apt+=(libbpf-dev)
have ip || need_apt+=(iproute2)
have iperf3 || need_apt+=(iperf3)
have ping || need_apt+=(iputils-ping)
have ethtool || need_apt+=(ethtool)
# bench-lan.sh measures CPU time with GNU time.
[ -x /usr/bin/time ] || need_apt+=(time)
have nft || need_apt+=(nftables)
have python3 || need_apt+=(python3)
have curl || need_apt+=(curl)
# bench-distribution.sh's parallel HTTP reference.
have aria2c || need_apt+=(aria2)
if [ "${LOWTIDE_WITH_POSTGRES:-1}" = 1 ] && [ ! -x /usr/lib/postgresql/15/bin/postgres ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # postgresql's package starts a cluster on install; we run our own on a private port.
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

have cargo || { echo "setup: cargo not found; install Rust 1.95 (rustup) first" >&2; exit 1; }
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" 2>/dev/null || true
done
