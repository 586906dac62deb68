#!/usr/bin/env bash
# Schema-driven API test (hardening, issue 23): schemathesis against `GET /openapi.json` of a `pictor serve` on
# loopback, bounded in examples and time. Fails on any 5xx, any status code, content type, header or body that
# the document does not describe, a server that dies or panics, or a run that does not finish in time.
#
#   scripts/schema_check.sh                      # defaults below
#   MAX_EXAMPLES=20 TIME_BOUND=900 scripts/schema_check.sh
#
# Settings (environment): MAX_EXAMPLES (test cases per operation and phase, default 50), TIME_BOUND (seconds for
# the whole schemathesis run, default 600), WORKERS (default 1: with two, Python 3.11's ast.parse, which hypothesis
# calls from both threads, now and then fails with "AST constructor recursion depth mismatch"), SEED (default 1,
# for a reproducible run), MAX_RESPONSE_TIME (seconds one answer may take, default 30), SKIP_BUILD=1 (use
# target/release/pictor as it is), REPORT_DIR (default target/schema-report: the log, an NDJSON event log, a JUnit
# file and answers.jsonl, one line per answer), SCALE_OUT=1 (the job store on a throwaway PostgreSQL, Debian's
# package, and files in a bucket of the tests' S3 server, target/release/pictor-test-s3: build it with
# `cargo build --release -p pictor-testkit`).
#
# The venv (target/schema-venv, schemathesis pinned) is made on first use; the server runs on a free port with a
# random demo model, a throwaway data folder, an API key and an admin key, and `--sync-timeout 0` (ModelsLab
# routes answer "processing" at once). scripts/schema_check_hooks.py sends the keys and keeps generations small.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${MAX_EXAMPLES:-50}
TIME_BOUND=${TIME_BOUND:-600}
WORKERS=${WORKERS:-1}
SEED=${SEED:-1}
MAX_RESPONSE_TIME=${MAX_RESPONSE_TIME:-30}
REPORT_DIR=${REPORT_DIR:-$ROOT/target/schema-report}
VENV=$ROOT/target/schema-venv
BIN=$ROOT/target/release/pictor

die() {
    echo "schema_check: $*" >&2
    exit 2
}

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "version $SCHEMATHESIS_VERSION\$"; then
    echo "schema_check: installing schemathesis==$SCHEMATHESIS_VERSION into $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
    "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION" || die "pip install failed"
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    nice cargo build --release -p pictor-cli || die "build failed"
fi
[ -x "$BIN" ] || die "$BIN is missing"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pictor-schema.XXXXXX")
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" make-demo-model "$WORK/models/checkpoints/demo" >/dev/null || die "make-demo-model failed"

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY=schema-key-$RANDOM$RANDOM
ADMIN=schema-admin-$RANDOM$RANDOM
BASE=http://127.0.0.1:$PORT

MODE_ARGS=()
MODE_ENV=()
if [ "${SCALE_OUT:-0}" = 1 ]; then
    # shellcheck source=lib/throwaway_postgres.sh
    . "$ROOT/scripts/lib/throwaway_postgres.sh"
    start_throwaway_postgres -c fsync=off >/dev/null || die "PostgreSQL did not start"
    S3_BIN=$ROOT/target/release/pictor-test-s3
    [ -x "$S3_BIN" ] || die "$S3_BIN is missing: cargo build --release -p pictor-testkit"
    "$S3_BIN" schema >"$WORK/s3.json" &
    S3_PID=$!
    trap 'kill $S3_PID 2>/dev/null; cleanup; "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1; rm -rf "$PG_DIR"' EXIT
    for _ in $(seq 1 100); do [ -s "$WORK/s3.json" ] && break; sleep 0.1; done
    mapfile -t MODE_ENV < <(python3 -c 'import json,sys; [print(f"{k}={v}") for k, v in json.load(open(sys.argv[1])).items()]' "$WORK/s3.json")
    MODE_ARGS=(--database-url "$PG_ADMIN_URL" --storage s3://schema)
    echo "scale-out mode: PostgreSQL on port $PG_PORT, S3 bucket 'schema'"
fi

env -u PICTOR_API_KEYS -u PICTOR_ADMIN_KEY -u PICTOR_DATABASE_URL -u PICTOR_STORAGE "${MODE_ENV[@]}" \
    "$BIN" serve --listen "127.0.0.1:$PORT" --no-demo \
    --models-dir "$WORK/models" --data-dir "$WORK/data" \
    --api-key "$KEY" --admin-key "$ADMIN" --sync-timeout 0 "${MODE_ARGS[@]}" \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 600); do
    if curl -sf "$BASE/health" >/dev/null 2>&1; then
        break
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "the server exited at start"; }
    sleep 0.1
done
curl -sf "$BASE/health" >/dev/null || die "the server did not become healthy"

mkdir -p "$REPORT_DIR"
LOG=$REPORT_DIR/schemathesis.log
echo "schema_check: schemathesis $SCHEMATHESIS_VERSION against $BASE/openapi.json" \
    "(max examples $MAX_EXAMPLES, workers $WORKERS, seed $SEED, bound ${TIME_BOUND}s)"
TRACE=$REPORT_DIR/answers.jsonl
rm -f "$TRACE"
started=$(date +%s)
# From the throwaway folder, so that schemathesis's own cache (.schemathesis/) is not left in the checkout.
(cd "$WORK" && PICTOR_SCHEMA_TRACE=$TRACE PICTOR_SCHEMA_KEY=$KEY PICTOR_SCHEMA_ADMIN_KEY=$ADMIN \
    SCHEMATHESIS_HOOKS=$ROOT/scripts/schema_check_hooks.py timeout --kill-after=10 "$TIME_BOUND" \
    "$VENV/bin/schemathesis" run "$BASE/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" --workers "$WORKERS" --seed "$SEED" \
    --generation-with-security-parameters false --generation-database none \
    --max-response-time "$MAX_RESPONSE_TIME" --request-timeout "$((MAX_RESPONSE_TIME * 2))" \
    --continue-on-failure --no-color \
    --report ndjson,junit --report-dir "$REPORT_DIR" \
    --report-ndjson-path "$REPORT_DIR/events.ndjson" --report-junit-path "$REPORT_DIR/junit.xml" \
    >"$LOG" 2>&1)
status=$?
elapsed=$(($(date +%s) - started))
jobs=$(curl -s "$BASE/metrics" | awk '/^pictor_job_duration_seconds_count/ {sub(/.*outcome="/, ""); sub(/"}/, ""); printf "%s%s", sep, $1 "=" $2; sep=", "}')

failed=0
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "schema_check: schemathesis did not finish within ${TIME_BOUND}s" >&2
    failed=1
elif [ "$status" -ne 0 ]; then
    failed=1
fi
alive=yes
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    alive=no
    failed=1
fi
panics=$(grep -c "panicked" "$WORK/server.log")
[ "$panics" -eq 0 ] || failed=1
errors_logged=$(grep -c "internal error" "$WORK/server.log")

# schemathesis's own summary, then ours.
sed -n '/^=* *FAILURES *=*$/,$p' "$LOG" | head -400
sed -n '/^=* *SUMMARY *=*$/,$p' "$LOG"
operations=$(grep -m1 -E '^\s+Tested: [0-9]+' "$LOG" | grep -oE '[0-9]+' | head -1)
cases=$(grep -m1 -oE '[0-9]+ generated' "$LOG" | grep -oE '[0-9]+')
found=$(grep -m1 -oE 'found [0-9]+ unique failure' "$LOG" | grep -oE '[0-9]+')
python3 - "$TRACE" <<'PY'
import collections, json, sys
codes, generated = collections.Counter(), collections.Counter()
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError:
    lines = []
for line in lines:
    a = json.loads(line)
    codes[a["code"]] += 1
    if a["generates"]:
        ok = a["code"] == 200 and (a["outcome"] in (None, "success", "processing"))
        generated["accepted" if ok else "refused"] += 1
print()
print("answers by HTTP status:", ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())))
print("generation requests:", ", ".join(f"{k} {v}" for k, v in sorted(generated.items())))
PY
echo "jobs run by the server (outcome=count): ${jobs:-none}"
echo
echo "schema_check summary: operations ${operations:-?}, test cases ${cases:-?}, failures ${found:-0}," \
    "schemathesis exit $status, ${elapsed}s; server alive $alive, panics $panics, internal errors logged $errors_logged"
echo "schema_check: full log $LOG, reports in $REPORT_DIR"
if [ "$failed" -ne 0 ]; then
    if [ "$panics" -ne 0 ] || [ "$alive" = no ]; then
        echo "--- server log (tail) ---" >&2
        tail -50 "$WORK/server.log" >&2
    fi
    echo "schema_check: FAILED" >&2
    exit 1
fi
echo "schema_check: OK"
