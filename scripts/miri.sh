#!/usr/bin/env bash
# Runs the tests of ferry's one module of unsafe code, `src/core/text.rs` (the shared path
# text), under Miri, which fails them on any undefined behaviour: a use after free, a double
# free, an out-of-bounds read, a data race. The module is compiled alone, in a scratch crate
# under target/ (the library around it needs C code Miri cannot run).
# Installs the nightly toolchain's miri and rust-src components if they are missing; if that
# cannot be done (no network), says so on a "miri: skipped" line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo +nightly miri --version >/dev/null 2>&1; then
    echo "miri: installing the nightly toolchain's miri"
    if ! rustup toolchain install nightly --profile minimal --component miri,rust-src; then
        echo "miri: skipped: miri cannot be installed (no network?)"
        exit 0
    fi
fi

crate=target/miri-text
mkdir -p "$crate"
cat >"$crate/Cargo.toml" <<'TOML'
[package]
name = "ferry-text-miri"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
path = "lib.rs"

[workspace]
TOML
printf '#[path = "%s/src/core/text.rs"]\npub mod text;\n' "$PWD" >"$crate/lib.rs"
cd "$crate"
cargo +nightly miri test
