#!/usr/bin/env bash
# ferry's benchmark, side by side with the baselines in the same run (see bench/bench.py).
#   scripts/bench.sh [--quick|--full] [--out DIR]
# Prints one markdown table per workload and writes DIR/RESULTS.md and DIR/results.json
# (default DIR: target/bench). Installs nothing: a missing baseline is named with its package.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/bench.py "$@"
