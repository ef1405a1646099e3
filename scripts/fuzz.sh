#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ (cargo-fuzz, libFuzzer) for SECONDS (default 60): the frame
# decoder, the path validator, and the pure core (plan, renames, index).
#   usage: scripts/fuzz.sh [SECONDS]
# Installs the nightly toolchain (minimal profile) and cargo-fuzz if they are missing; if that
# cannot be done (no network), says so on a "fuzz: skipped" line and exits 0. Exits non-zero
# if a target finds a crash, naming the input that causes it (reproduce with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`).
# Inputs found interesting are kept in fuzz/corpus/ (not in git) and reused by the next run;
# the small seeds in fuzz/seeds/ are real frames and paths to start from.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
case $secs in
    '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 2 ;;
esac
targets=(frame path plan)
t0=$SECONDS

skip() {
    echo "fuzz: skipped: $*"
    exit 0
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain (minimal profile)"
    rustup toolchain install nightly --profile minimal ||
        skip "the nightly toolchain cannot be installed (no network?)"
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked || skip "cargo-fuzz cannot be installed (no network?)"
fi

start=$SECONDS
cargo +nightly fuzz build
echo "fuzz: targets built in $((SECONDS - start)) s ($((start - t0)) s of installing before)"

failed=0
for t in "${targets[@]}"; do
    corpus=$PWD/fuzz/corpus/$t
    mkdir -p "$corpus"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("$PWD/fuzz/seeds/$t")
    log=$PWD/fuzz/artifacts/$t.log
    mkdir -p "$(dirname "$log")"
    echo "fuzz: $t for $secs s"
    # -rss_limit_mb bounds memory (also per allocation); -timeout flags a hung input;
    # -max_len leaves room for frames over the handshake limit and paths near MAX_PATH.
    if cargo +nightly fuzz run "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -max_len=8192 \
        -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units)' "$log" | sed "s/^/fuzz: $t: /" || true
    else
        failed=1
        echo "fuzz: $t FAILED; the end of its log ($log):"
        grep -v '^"' "$log" | tail -n 40
        grep -h 'Test unit written to' "$log" | sed "s/^.*Test unit written to /fuzz: $t: crash input: /" || true
    fi
done
echo "fuzz: done in $((SECONDS - t0)) s (installs and build included)"
exit $failed
