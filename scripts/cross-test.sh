#!/usr/bin/env bash
# The cross-architecture checks that can run on this machine: builds the armv7 and
# aarch64-musl binaries (scripts/build-targets.sh), runs the pure core's unit tests and one
# end-to-end sync test (everything armv7) under qemu-arm, the filesystem tests under
# qemu-aarch64 (musl's rename path), then the
# end-to-end test with an x86_64 server, an armv7 client (inotify) and a static aarch64-musl
# client (poll, the Termux binary), all on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
    echo "+ $*" >&2
    "$@"
}

run scripts/build-targets.sh
run cargo test --target armv7-unknown-linux-gnueabihf --lib core::
# One end-to-end sync test with the test binary, server and clients all armv7 under qemu-arm.
FERRY_TEST_RUNNER="qemu-arm -L /usr/arm-linux-gnueabihf" \
    run cargo test --target armv7-unknown-linux-gnueabihf --test e2e sync::file_and_directory_operations_propagate
run cargo test --target aarch64-unknown-linux-musl --lib fsops::

armv7="qemu-arm -L /usr/arm-linux-gnueabihf $PWD/target/ferry-armv7-unknown-linux-gnueabihf-client-only"
arm64="qemu-aarch64 $PWD/target/ferry-aarch64-unknown-linux-musl-client-only"
export FERRY_CROSS_CLIENTS="armv7=inotify=$armv7;arm64=poll=$arm64"
run cargo test --test e2e cross -- --ignored
