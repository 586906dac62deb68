# Sourced by scripts/test.sh and scripts/bench_queue.sh: starts a private PostgreSQL (Debian's `postgresql`
# binaries) in a temporary folder on a free loopback port, stopped and deleted when the calling script exits.
#   start_throwaway_postgres [EXTRA SERVER OPTIONS...]
# sets PG_BIN (the binaries), PG_PORT, PG_AS (the command prefix that runs them as the right user) and
# PG_ADMIN_URL (postgres://postgres@127.0.0.1:PORT/postgres).

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

start_throwaway_postgres() {
    PG_BIN="$(pg_bin)"
    [ -n "$PG_BIN" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; return 1; }
    PG_DIR="$(mktemp -d /tmp/pictor-pg.XXXXXX)"
    # initdb refuses to run as root: the package's postgres user owns the throwaway cluster then.
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$PG_DIR"
        PG_AS=(runuser -u postgres --)
    else
        PG_AS=()
    fi
    trap '"${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$PG_DIR"' EXIT
    "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust --no-sync >"$PG_DIR/initdb.log" 2>&1 \
        || { cat "$PG_DIR/initdb.log" >&2; return 1; }
    local tries
    for tries in 1 2 3 4 5; do
        PG_PORT=$((20000 + RANDOM % 30000))
        if "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 start \
            -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=300 $*" >/dev/null; then
            PG_ADMIN_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
            return 0
        fi
    done
    echo "PostgreSQL did not start:" >&2
    cat "$PG_DIR/server.log" >&2
    return 1
}
