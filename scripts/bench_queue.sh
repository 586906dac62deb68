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

. scripts/lib/throwaway_postgres.sh
# Durable settings (fsync on): what a production database would run with.
start_throwaway_postgres
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}')"
for N in 1 4 16 64; do
    "${PG_AS[@]}" "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "bench$N"
    "$BENCH" --database-url "postgres://postgres@127.0.0.1:$PG_PORT/bench$N" --workers "$N" --jobs "$JOBS" --beats 3
done
SQLITE="$(mktemp -d)"
"$BENCH" --database-url "sqlite:$SQLITE/jobs.db" --workers 4 --jobs "$JOBS" --beats 3
rm -rf "$SQLITE"
