#!/usr/bin/env bash
# A private, throw-away PostgreSQL for the server's tests and benchmark.
#
#   scripts/pg-test.sh start   # prints the URL; `eval "$(scripts/pg-test.sh env)"` exports it
#   scripts/pg-test.sh env     # start if needed, print `export LOWTIDE_TEST_PG_URL=...`
#   scripts/pg-test.sh stop    # stop it and delete its data directory
#   scripts/pg-test.sh crash   # SIGKILL the postmaster and its backends (fault tests)
#   scripts/pg-test.sh resume  # start it again on the same data (crash recovery)
#
# Uses Debian's postgresql (scripts/setup.sh installs it) on port LOWTIDE_PG_PORT
# (default 55432), listening on 127.0.0.1 only, with its data under
# LOWTIDE_PG_DIR (default /tmp/lowtide-pg-$PORT). As root it runs the server as
# the `postgres` user (PostgreSQL refuses to run as root). fsync is off: this
# database is for tests and is deleted on stop. LOWTIDE_PG_DURABLE=1 keeps fsync
# and synchronous commits on (the crash tests count what a crash loses).
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
  pg_start "$bin"
  as_pg "$bin/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qAt -c "CREATE DATABASE $DB" >/dev/null
  echo "pg-test: PostgreSQL on 127.0.0.1:$PORT, data in $DIR" >&2
  echo "$URL"
}

pg_start() {
  local opts="-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=300"
  if [ "${LOWTIDE_PG_DURABLE:-0}" = 1 ]; then
    opts="$opts -c fsync=on -c synchronous_commit=on"
  else
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  as_pg "$1/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 -o "$opts" start >/dev/null \
    || { tail -n 20 "$DIR/server.log" >&2; echo "pg-test: PostgreSQL did not start on port $PORT (in use?)" >&2; exit 1; }
}

# SIGKILL the postmaster and every backend it started, as a crash would.
crash() {
  local pm
  pm=$(head -n 1 "$DIR/data/postmaster.pid" 2>/dev/null) || { echo "pg-test: no PostgreSQL running in $DIR" >&2; exit 1; }
  local kids
  kids=$(ps -o pid= --ppid "$pm" | tr '\n' ' ')
  kill -KILL "$pm" $kids 2>/dev/null || true
  # Bounded wait (5 s) until every one of them is gone, so a resume finds the port and shared memory free.
  for _ in $(seq 50); do
    local alive=0
    for p in $pm $kids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  echo "pg-test: PostgreSQL processes still alive 5 s after SIGKILL" >&2
  exit 1
}

resume() {
  [ -d "$DIR/data" ] || { echo "pg-test: no data directory $DIR/data to resume; use start" >&2; exit 1; }
  running && return 0
  pg_start "$(bin_dir)"
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
  crash) crash ;;
  resume) resume ;;
  *) echo "usage: $0 start|env|stop|crash|resume" >&2; exit 2 ;;
esac
