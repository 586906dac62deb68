#!/usr/bin/env bash
# Runs every test: `cargo test --workspace`, with a throwaway PostgreSQL server for the job-store contract tests.
# PostgreSQL comes from Debian's `postgresql` package (installed here when missing and this user may install);
# the server lives in a temporary folder on a free loopback port and is stopped and deleted at the end.
# Set PICTOR_TEST_DATABASE_URL to use a server of your own instead (a user that may create databases).
# Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "${PICTOR_TEST_DATABASE_URL:-}" ]; then
    if [ -z "$(pg_bin)" ]; then
        echo "test.sh: installing PostgreSQL (Debian package postgresql)" >&2
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    fi
    BIN="$(pg_bin)"
    PGDIR="$(mktemp -d /tmp/pictor-test-pg.XXXXXX)"
    # initdb refuses to run as root: the package's postgres user owns the throwaway cluster then.
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$PGDIR"
        AS=(runuser -u postgres --)
    else
        AS=()
    fi
    stop_pg() {
        "${AS[@]}" "$BIN/pg_ctl" -D "$PGDIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PGDIR"
    }
    trap stop_pg EXIT
    "${AS[@]}" "$BIN/initdb" -D "$PGDIR/data" -U postgres -A trust --no-sync >"$PGDIR/initdb.log" 2>&1 \
        || { cat "$PGDIR/initdb.log" >&2; exit 1; }
    started=""
    for _ in 1 2 3 4 5; do
        PORT=$((20000 + RANDOM % 30000))
        if "${AS[@]}" "$BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -t 30 start \
            -o "-p $PORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off \
                -c synchronous_commit=off -c full_page_writes=off" >/dev/null; then
            started=1
            break
        fi
    done
    [ -n "$started" ] || { echo "test.sh: PostgreSQL did not start:" >&2; cat "$PGDIR/server.log" >&2; exit 1; }
    export PICTOR_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
    echo "test.sh: PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT" >&2
fi

cargo test --workspace "$@"
