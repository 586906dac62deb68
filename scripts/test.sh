#!/usr/bin/env bash
# Runs every test: `cargo test --workspace`, with a throwaway PostgreSQL server for the job-store contract tests
# Debian's chromium + chromium-driver for the playground's browser test and python3-venv for the client tests
# (installed here when missing).
# PostgreSQL comes from Debian's `postgresql` package (installed here when missing and this user may install);
# the server lives in a temporary folder on a free loopback port and is stopped and deleted at the end.
# Set PICTOR_TEST_DATABASE_URL to use a server of your own instead (a user that may create databases).
# Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/throwaway_postgres.sh

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then
    echo "test.sh: installing chromium and chromium-driver (Debian packages) for the browser test" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# The client tests install ModelsLab's SDK and CLI, webuiapi and openai from PyPI into venvs under target/.
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "test.sh: installing python3 and python3-venv (Debian packages) for the client tests" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
fi

if [ -z "${PICTOR_TEST_DATABASE_URL:-}" ]; then
    if [ -z "$(pg_bin)" ]; then
        echo "test.sh: installing PostgreSQL (Debian package postgresql)" >&2
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    fi
    # Durability off: the tests throw the data away.
    start_throwaway_postgres -c fsync=off -c synchronous_commit=off -c full_page_writes=off
    export PICTOR_TEST_DATABASE_URL="$PG_ADMIN_URL"
    echo "test.sh: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT" >&2
fi

cargo test --workspace "$@"
