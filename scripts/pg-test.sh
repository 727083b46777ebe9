#!/usr/bin/env bash
# A private, throw-away PostgreSQL for the server's tests and benchmark.
#
#   scripts/pg-test.sh start   # prints the URL; `eval "$(scripts/pg-test.sh env)"` exports it
#   scripts/pg-test.sh env     # start if needed, print `export LOWTIDE_TEST_PG_URL=...`
#   scripts/pg-test.sh stop    # stop it and delete its data directory
#
# Uses Debian's postgresql (scripts/setup.sh installs it) on port LOWTIDE_PG_PORT
# (default 55432), listening on 127.0.0.1 only, with its data under
# LOWTIDE_PG_DIR (default /tmp/lowtide-pg-$PORT). As root it runs the server as
# the `postgres` user (PostgreSQL refuses to run as root). fsync is off: this
# database is for tests and is deleted on stop.
set -euo pipefail

PORT="${LOWTIDE_PG_PORT:-55432}"
DIR="${LOWTIDE_PG_DIR:-/tmp/lowtide-pg-$PORT}"
DB=lowtide
URL="postgres://postgres@127.0.0.1:$PORT/$DB"

bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
    echo "pg-test: PostgreSQL is not installed; run scripts/setup.sh (apt-get install postgresql)" >&2
    exit 1
  fi
  echo "$d"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() {
  [ -f "$DIR/data/postmaster.pid" ] && as_pg "$(bin_dir)/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1
}

start() {
  local bin
  bin=$(bin_dir)
  if running; then
    echo "$URL"
    return 0
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
  as_pg "$bin/initdb" -D "$DIR/data" -U postgres -A trust --no-sync -E UTF8 >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; echo "pg-test: initdb failed" >&2; exit 1; }
  as_pg "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
    start >/dev/null \
    || { cat "$DIR/server.log" >&2; echo "pg-test: PostgreSQL did not start on port $PORT (in use?)" >&2; exit 1; }
  as_pg "$bin/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qAt -c "CREATE DATABASE $DB" >/dev/null
  echo "pg-test: PostgreSQL on 127.0.0.1:$PORT, data in $DIR" >&2
  echo "$URL"
}

stop() {
  if [ -d "$DIR/data" ]; then
    as_pg "$(bin_dir)/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  env) echo "export LOWTIDE_TEST_PG_URL=$(start)" ;;
  stop) stop ;;
  *) echo "usage: $0 start|env|stop" >&2; exit 2 ;;
esac
