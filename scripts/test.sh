#!/usr/bin/env bash
# The one command that runs ferry's checks and tests: formatting, clippy, the unit and
# end-to-end tests, then the whole suite again with the polling watcher as the compile-time
# default (what Android gets).
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
    echo "+ $*" >&2
    "$@"
}

for script in scripts/*.sh targets/android-termux/ferry-start targets/android-termux/install.sh; do
    run bash -n "$script"  # syntax of the deploy and build scripts
done
run cargo fmt --all -- --check
run cargo clippy --all-targets -- -D warnings
run cargo clippy --all-targets --no-default-features -- -D warnings
run cargo test
run cargo test --features poll-default
