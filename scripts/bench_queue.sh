#!/usr/bin/env bash
# How many GPU workers one PostgreSQL job database serves: starts a throwaway PostgreSQL (as scripts/test.sh
# does), then runs the queue benchmark (crates/server/examples/queue_bench.rs) with 1, 4, 16 and 64 simulated
# workers (each claim followed by 3 heartbeats and a finish) and, for comparison, the embedded SQLite store.
# Prints one JSON line per run. Run by hand; the README's figures come from it.
#   scripts/bench_queue.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${1:-3000}"
cargo build --release -q -p pictor-server --example queue_bench
BENCH=target/release/examples/queue_bench

BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -n "$BIN" ] || { echo "install PostgreSQL first (apt-get install postgresql)" >&2; exit 1; }
PGDIR="$(mktemp -d /tmp/pictor-bench-pg.XXXXXX)"
if [ "$(id -u)" = 0 ]; then chown postgres "$PGDIR"; AS=(runuser -u postgres --); else AS=(); fi
trap '"${AS[@]}" "$BIN/pg_ctl" -D "$PGDIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$PGDIR"' EXIT
"${AS[@]}" "$BIN/initdb" -D "$PGDIR/data" -U postgres -A trust >/dev/null
PORT=$((20000 + RANDOM % 30000))
# Durable settings (fsync on): what a production database would run with.
"${AS[@]}" "$BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w start \
    -o "-p $PORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=300" >/dev/null
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, PostgreSQL $("$BIN/postgres" --version | awk '{print $3}')"
for N in 1 4 16 64; do
    "${AS[@]}" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "bench$N"
    "$BENCH" --database-url "postgres://postgres@127.0.0.1:$PORT/bench$N" --workers "$N" --jobs "$JOBS" --beats 3
done
SQLITE="$(mktemp -d)"
"$BENCH" --database-url "sqlite:$SQLITE/jobs.db" --workers 4 --jobs "$JOBS" --beats 3
rm -rf "$SQLITE"
