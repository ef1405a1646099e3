#!/usr/bin/env bash
# ferry's benchmark, side by side with the baselines in the same run (see bench/bench.py).
#   scripts/bench.sh [--quick|--full] [--out DIR]
# Prints one markdown table per workload and writes DIR/RESULTS.md and DIR/results.json
# (default DIR: bench/ with --full, target/bench with --quick). Installs nothing: a missing
# baseline (rsync; with --full also syncthing, unison, lsyncd) is named with its Debian package
# and skipped. Everything runs on 127.0.0.1 in temporary directories and is killed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/bench.py "$@"
