#!/usr/bin/env bash
# Load benchmark of lowtide-server: simulated agents heartbeating and asking for
# sources, on SQLite and on PostgreSQL, all on loopback.
#
#   scripts/bench-server.sh [--json PATH] [--db sqlite|postgres|postgres2|both|all] [--agents N]
#                           [--sites N] [--concurrency N] [--seconds N]
#
# Builds the release binaries, then for each case: starts a fresh server
# (SQLite in a temporary state dir; PostgreSQL from scripts/pg-test.sh on port
# LOWTIDE_PG_PORT, default 55439; postgres2: two server processes on that one
# PostgreSQL, the simulated agents split between them), runs
# lowtide-server-loadgen against it (a heartbeat phase, then a sources phase,
# --seconds each), and stops everything. Prints a table; with --json writes
#   {"cases":[{"db":"sqlite"|"postgres"|"postgres2","servers":N,"agents":N,"heartbeats_per_s":F,
#              "sources_per_s":F,"p99_ms":F,"errors":N, ...}]}
# Target on a 2-core machine: >= 5000 heartbeats/s with p99 <= 20 ms on SQLite.
set -euo pipefail
here="$(pwd)"
cd "$(dirname "$0")/.."

json_out="" dbs="sqlite postgres" agents=10000 sites=100 concurrency=16 seconds=10
while [ $# -gt 0 ]; do
  case "$1" in
    --json) case "$2" in /*) json_out="$2" ;; *) json_out="$here/$2" ;; esac; shift 2 ;;
    --db) case "$2" in both) dbs="sqlite postgres" ;; all) dbs="sqlite postgres postgres2" ;; sqlite|postgres|postgres2) dbs="$2" ;; *) echo "--db sqlite|postgres|postgres2|both|all" >&2; exit 2 ;; esac; shift 2 ;;
    --agents) agents="$2"; shift 2 ;;
    --sites) sites="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

echo "== building release binaries" >&2
cargo build --release --locked -p lowtide-server --bins >&2
bin="${CARGO_TARGET_DIR:-target}/release"

export LOWTIDE_PG_PORT="${LOWTIDE_PG_PORT:-55439}"
admin_token="bench-admin-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
work="$(mktemp -d /tmp/lowtide-bench.XXXXXX)"
chmod 755 "$work"
server_pids=() pg_started=""
stop_servers() {
  for p in "${server_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${server_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  server_pids=()
}
cleanup() {
  stop_servers
  if [ -n "$pg_started" ]; then scripts/pg-test.sh stop; fi
  rm -rf "$work"
}
trap cleanup EXIT

cases=()
port=$((17400 + RANDOM % 1000))
for db in $dbs; do
  db_args=() nservers=1
  if [ "$db" != sqlite ]; then
    url="$(scripts/pg-test.sh start)"
    pg_started=1
    db_args=(--database-url "$url")
  fi
  [ "$db" = postgres2 ] && nservers=2
  urls=()
  for s in $(seq "$nservers"); do
    port=$((port + 1))
    state="$work/state-$db-$s"
    mkdir -p "$state"
    echo "== $db: server $s on 127.0.0.1:$port" >&2
    LOWTIDE_LOG=warn LOWTIDE_ADMIN_TOKEN="$admin_token" LOWTIDE_INACTIVE_AFTER_SECS=86400 LOWTIDE_DB_CONNECTIONS_MAX=16 \
      "$bin/lowtide-server" --state-dir "$state" "${db_args[@]}" serve --listen "127.0.0.1:$port" 2>"$work/server-$db-$s.log" &
    server_pids+=($!)
    urls+=(--url "http://127.0.0.1:$port")
  done
  if ! out="$(LOWTIDE_ADMIN_TOKEN="$admin_token" "$bin/lowtide-server-loadgen" "${urls[@]}" --db "$db" \
      --agents "$agents" --sites "$sites" --concurrency "$concurrency" --seconds "$seconds" --work-dir "$work")"; then
    echo "bench-server: the $db run failed; server logs:" >&2
    tail -n 30 "$work"/server-"$db"-*.log >&2
    exit 1
  fi
  # Errors the servers logged (the loadgen counts failed requests; this catches what it cannot see).
  logged=$(cat "$work"/server-"$db"-*.log | grep -c -E 'ERROR|WARN' || true)
  stop_servers
  if [ -n "$pg_started" ]; then scripts/pg-test.sh stop; pg_started=""; fi
  cases+=("${out%\}},\"server_log_errors\":$logged}")
done

joined="$(IFS=,; echo "${cases[*]}")"
result="{\"cases\":[$joined]}"
python3 - "$result" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"{'db':<10} {'servers':>7} {'agents':>7} {'heartbeats/s':>13} {'sources/s':>10} {'p99 ms':>7} {'hb p99':>7} {'src p99':>8} {'errors':>7} {'logged':>7}")
for c in r["cases"]:
    print(f"{c['db']:<10} {c['servers']:>7} {c['agents']:>7} {c['heartbeats_per_s']:>13.0f} {c['sources_per_s']:>10.0f} {c['p99_ms']:>7.2f} "
          f"{c['heartbeat_p99_ms']:>7.2f} {c['sources_p99_ms']:>8.2f} {c['errors']:>7} {c['server_log_errors']:>7}")
PY
if [ -n "$json_out" ]; then
  echo "$result" | python3 -m json.tool > "$json_out"
  echo "wrote $json_out" >&2
fi
