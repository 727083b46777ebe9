#!/bin/sh
# Install the Lowtide agent as a systemd service.
#
#   scripts/systemd/install-agent.sh [--binary PATH] [--server-url URL] [--token TOKEN] [--secret SECRET] [--start]
#
# --secret is optional: the P2P deployment key comes from the server; a secret
# overrides it (then every agent needs the same one).
#
# Installs the binary to /usr/local/bin, the unit to /etc/systemd/system,
# creates the `lowtide` system user and group, and writes
# /etc/lowtide/agent.toml (root:lowtide, 0640: it holds the enrolment token)
# unless it exists. Add people who may run
# `lowtide-agent get` to the `lowtide` group.
set -eu

BIN=target/release/lowtide-agent
URL=""
TOKEN=""
SECRET=""
START=no
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BIN=$2; shift 2 ;;
        --server-url) URL=$2; shift 2 ;;
        --token) TOKEN=$2; shift 2 ;;
        --secret) SECRET=$2; shift 2 ;;
        --start) START=yes; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "install-agent.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || { echo "install-agent.sh: run as root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "install-agent.sh: no binary at $BIN: cargo build --release -p lowtide-agent, or pass --binary" >&2; exit 1; }
HERE=$(dirname "$0")

getent group lowtide >/dev/null || groupadd --system lowtide
getent passwd lowtide >/dev/null || useradd --system --gid lowtide --home-dir /var/lib/lowtide --no-create-home --shell /usr/sbin/nologin lowtide

install -m 0755 "$BIN" /usr/local/bin/lowtide-agent
install -m 0644 "$HERE/lowtide-agent.service" /etc/systemd/system/lowtide-agent.service
install -d -m 0755 /etc/lowtide
if [ ! -e /etc/lowtide/agent.toml ]; then
    [ -n "$URL" ] && [ -n "$TOKEN" ] || {
        echo "install-agent.sh: /etc/lowtide/agent.toml does not exist: pass --server-url and --token to write it" >&2
        exit 1
    }
    umask 027
    cat > /etc/lowtide/agent.toml <<TOML
server_url = "$URL"
enrol_token = "$TOKEN"
${SECRET:+deployment_secret = \"$SECRET\"}
listen = "0.0.0.0:4500"
cache_limit_mib = 10240
TOML
    chown root:lowtide /etc/lowtide/agent.toml
    chmod 0640 /etc/lowtide/agent.toml
fi
systemctl daemon-reload
if [ "$START" = yes ]; then
    systemctl enable --now lowtide-agent.service
    systemctl status --no-pager lowtide-agent.service || true
else
    echo "installed; start with: systemctl enable --now lowtide-agent"
fi
