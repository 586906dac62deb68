#!/usr/bin/env bash
# Bounded fuzzing (cargo fuzz / libFuzzer, AddressSanitizer, debug assertions on) of every parser that reads outside
# bytes: one run of SECONDS per target (default 60), one line per target. By hand, not in CI's test run.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (targets: fuzz/fuzz_targets/*.rs; default all)
#
# Needs the nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz when it is missing.
# The corpus grows in fuzz/corpus/<target> (seeded from fuzz/seeds/ and the test fixtures), crashes are written
# to fuzz/artifacts/<target>/ and each run's log to fuzz/artifacts/<target>.log. Exits 1 if any target crashed
# (a panic, a sanitizer error, a timeout over 10 s, or more than 2 GiB of memory).
#
# Reproduce a crash:  fuzz/target/x86_64-unknown-linux-gnu/release/<target> <artifact>
# Minimize it:        (cd fuzz && cargo +nightly fuzz tmin -a <target> <artifact>)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
fuzz="$root/fuzz"
seconds="${1:-60}"
shift || true

if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
export PATH="$HOME/.cargo/bin:$PATH"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for f in "$fuzz"/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

echo "building ${#targets[@]} targets (cargo +nightly fuzz build -a)" >&2
if [ $# -eq 0 ]; then
    (cd "$fuzz" && nice cargo +nightly fuzz build -a >&2)
else
    for t in "${targets[@]}"; do (cd "$fuzz" && nice cargo +nightly fuzz build -a "$t" >&2); done
fi
bin_dir="$fuzz/target/x86_64-unknown-linux-gnu/release"

# The targets write their files (a safetensors file, a YAML sidecar) in a temporary folder removed at the end.
scratch="$(mktemp -d -t pictor-fuzz.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"

# Seeds: the committed ones, plus small fixture files (with the mode byte the target expects in front).
seed() { # target name mode-byte-or-empty file
    local dir="$fuzz/corpus/$1"
    mkdir -p "$dir"
    [ -f "$4" ] || return 0
    if [ -n "$3" ]; then { printf "\\x$3"; cat "$4"; } >"$dir/fixture-$2"; else cp "$4" "$dir/fixture-$2"; fi
}
fixtures="$root/tests/fixtures"
seed image_decode png "" "$fixtures/init-64.png"
seed image_decode png2 "" "$fixtures/init-72x56.png"
seed init_image png 01 "$fixtures/init-64.png"
if [ -f "$fixtures/init-64.png" ]; then
    mkdir -p "$fuzz/corpus/init_image"
    { printf '\x00data:image/png;base64,'; base64 -w 76 "$fixtures/init-64.png"; } >"$fuzz/corpus/init_image/fixture-data-uri"
fi
seed safetensors_header emb "" "$fixtures/prompts/embeddings-st/pictor-style.safetensors"
seed embedding st 00 "$fixtures/prompts/embeddings-st/pictor-style.safetensors"
seed embedding pt 01 "$fixtures/prompts/embeddings/pictor-style.pt"
seed embedding sd2pt 01 "$fixtures/prompts/embeddings/sd2-style.pt"
seed embedding bin 02 "$fixtures/prompts/embeddings/pictor-dot.bin"
seed lora peft 00 "$fixtures/models/loras/tiny-peft.safetensors"

# Inputs up to this many bytes (libFuzzer's -max_len); files get more room than texts.
max_len() {
    case "$1" in
        image_decode | init_image | safetensors_header | embedding | lora) echo 65536 ;;
        *) echo 8192 ;;
    esac
}

# The value of libFuzzer's final `stat::NAME:` line in a log, or nothing.
stat_of() { (grep -o "stat::$1: *[0-9]*" "$2" || true) | tail -1 | tr -dc '0-9'; }

# sqlite's bundled C source (linked through the server crate) defines same-named static tables that ASan's
# one-definition-rule check takes for a violation at start-up; that check is about C linkage, not our code.
export ASAN_OPTIONS="detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

failed=0
printf '%-20s %12s %10s %14s  %s\n' target runs exec/s "peak RSS" crashes
for t in "${targets[@]}"; do
    corpus="$fuzz/corpus/$t"
    artifacts="$fuzz/artifacts/$t"
    log="$fuzz/artifacts/$t.log"
    mkdir -p "$corpus" "$artifacts"
    [ -d "$fuzz/seeds/$t" ] && cp -n "$fuzz/seeds/$t"/* "$corpus/" 2>/dev/null || true
    before="$(ls "$artifacts" | wc -l)"
    status=0
    nice "$bin_dir/$t" "$corpus" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len="$(max_len "$t")" \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(stat_of number_of_executed_units "$log")"
    rate="$(stat_of average_exec_per_sec "$log")"
    rss="$(stat_of peak_rss_mb "$log")"
    if [ -z "$runs" ]; then # a crash ends the run before the final stats: take the last status line
        runs="$( (grep -o '^#[0-9]*' "$log" || true) | tail -1 | tr -d '#')"
        rss="$( (grep -o 'rss: [0-9]*Mb' "$log" || true) | tail -1 | tr -dc '0-9')"
    fi
    crash="0"
    if [ "$status" -ne 0 ] || [ "$(ls "$artifacts" | wc -l)" -gt "$before" ]; then
        crash="$( (grep -o 'Test unit written to .*' "$log" || true) | tail -1 | sed 's/Test unit written to //')"
        crash="${crash:-exit status $status, see $log}"
        failed=1
    fi
    printf '%-20s %12s %10s %11s MB  %s\n' "$t" "${runs:-?}" "${rate:-?}" "${rss:-?}" "$crash"
done
exit "$failed"
