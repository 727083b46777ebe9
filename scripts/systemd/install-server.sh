#!/bin/sh
# Install the Lowtide server as a systemd service.
#
#   scripts/systemd/install-server.sh --public-url URL [--binary PATH] [--tls-cert PEM --tls-key PEM] [--start]
#
# --public-url is how agents reach this server (http://host:7400, or https://
# with --tls-cert/--tls-key); it is written into every signed manifest as the
# origin, so set it right before publishing anything.
#
# Installs the binary to /usr/local/bin, the unit to /etc/systemd/system,
# creates the `lowtide-server` system user and group and its state directory
# /var/lib/lowtide-server, and writes /etc/lowtide/server.toml
# (root:lowtide-server, 0640: it holds the admin token, generated here)
# unless it exists. Run admin commands as that user:
#   runuser -u lowtide-server -- lowtide-server --config /etc/lowtide/server.toml token create
set -eu

BIN=target/release/lowtide-server
URL=""
CERT=""
KEY=""
START=no
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BIN=$2; shift 2 ;;
        --public-url) URL=$2; shift 2 ;;
        --tls-cert) CERT=$2; shift 2 ;;
        --tls-key) KEY=$2; shift 2 ;;
        --start) START=yes; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "install-server.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || { echo "install-server.sh: run as root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "install-server.sh: no binary at $BIN: cargo build --release -p lowtide-server, or pass --binary" >&2; exit 1; }
if [ -n "$CERT" ] || [ -n "$KEY" ]; then
    if [ -z "$CERT" ] || [ -z "$KEY" ]; then
        echo "install-server.sh: --tls-cert and --tls-key go together" >&2
        exit 2
    fi
fi
[ -e /etc/lowtide/server.toml ] || [ -n "$URL" ] || {
    echo "install-server.sh: /etc/lowtide/server.toml does not exist: pass --public-url to write it" >&2
    exit 1
}
HERE=$(dirname "$0")

getent group lowtide-server >/dev/null || groupadd --system lowtide-server
getent passwd lowtide-server >/dev/null || useradd --system --gid lowtide-server --home-dir /var/lib/lowtide-server --no-create-home --shell /usr/sbin/nologin lowtide-server

install -m 0755 "$BIN" /usr/local/bin/lowtide-server
install -m 0644 "$HERE/lowtide-server.service" /etc/systemd/system/lowtide-server.service
# Admin commands run as lowtide-server before the first start need it (systemd creates it too).
install -d -m 0750 -o lowtide-server -g lowtide-server /var/lib/lowtide-server
install -d -m 0755 /etc/lowtide
if [ ! -e /etc/lowtide/server.toml ]; then
    ADMIN=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
    umask 027
    cat > /etc/lowtide/server.toml <<TOML
listen = "0.0.0.0:7400"
public_url = "$URL"
admin_token = "$ADMIN"
${CERT:+tls_cert = \"$CERT\"}
${KEY:+tls_key = \"$KEY\"}
TOML
    chown root:lowtide-server /etc/lowtide/server.toml
    chmod 0640 /etc/lowtide/server.toml
    echo "wrote /etc/lowtide/server.toml (the admin token for the HTTP admin API is in it)"
fi
systemctl daemon-reload
if [ "$START" = yes ]; then
    systemctl enable --now lowtide-server.service
    systemctl status --no-pager lowtide-server.service || true
else
    echo "installed; start with: systemctl enable --now lowtide-server"
fi
