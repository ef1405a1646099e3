#!/usr/bin/env bash
# Builds every ferry target that can be built on this machine and prints a table: target,
# build, stripped size, linkage, default watcher. Fails if a binary is over its size budget.
# What cannot be built here is skipped with the reason. Needs (Debian): gcc-arm-linux-gnueabihf
# libc6-dev-armhf-cross gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross (headers for the C in ring) qemu-user clang llvm, and the rustup targets.
set -euo pipefail
cd "$(dirname "$0")/.."

# Budgets in bytes (README, "Targets"): the full agent, and the client-only build for phones.
FULL_BUDGET=$((8 * 1024 * 1024))
CLIENT_BUDGET=$((4 * 1024 * 1024))

rows=()
fail=0

have_target() { rustup target list --installed 2>/dev/null | grep -qx "$1"; }

build() { # target runner build-name profile cargo-flags...
    local target=$1 runner=$2 name=$3 profile=$4
    shift 4
    echo "+ cargo build --profile $profile --target $target $*" >&2
    cargo build --profile "$profile" --target "$target" "$@" >&2
    local bin="target/$target/$profile/ferry"
    local out="target/ferry-$target-$name"
    cp "$bin" "$out"
    local size linkage watcher budget
    size=$(stat -c %s "$out")
    if file "$out" | grep -q "statically linked"; then linkage=static; else linkage=dynamic; fi
    # shellcheck disable=SC2086
    watcher=$($runner "$out" --version | sed -n 's/.*default watcher \([a-z]*\).*/\1/p')
    budget=$FULL_BUDGET
    [ "$name" = client-only ] && budget=$CLIENT_BUDGET
    local verdict=ok
    if [ "$size" -gt "$budget" ]; then verdict="OVER BUDGET ($((budget / 1024)) KiB)"; fail=1; fi
    rows+=("| $target | $name | $((size / 1024)) KiB | $linkage | $watcher | $verdict |")
}

for spec in "armv7-unknown-linux-gnueabihf|qemu-arm -L /usr/arm-linux-gnueabihf|arm-linux-gnueabihf-gcc" \
            "aarch64-unknown-linux-musl|qemu-aarch64|aarch64-linux-gnu-gcc"; do
    IFS='|' read -r target runner linker <<<"$spec"
    if ! have_target "$target"; then
        rows+=("| $target | - | - | - | - | skipped: rustup target add $target |")
        continue
    fi
    if ! command -v "$linker" >/dev/null || ! command -v "${runner%% *}" >/dev/null; then
        rows+=("| $target | - | - | - | - | skipped: needs $linker and ${runner%% *} (apt) |")
        continue
    fi
    build "$target" "$runner" full release
    # The client profile: release with panic = "abort" (Cargo.toml, README "Targets").
    build "$target" "$runner" client-only client --no-default-features
done

# Android: type-checks and compiles the C deps with Debian's clang; linking needs the NDK's
# bionic, which `cross build --target aarch64-linux-android` brings (Cross.toml).
if have_target aarch64-linux-android && command -v clang >/dev/null && command -v llvm-ar >/dev/null; then
    echo "+ cargo check --target aarch64-linux-android" >&2
    CC_aarch64_linux_android=clang AR_aarch64_linux_android=llvm-ar \
    CFLAGS_aarch64_linux_android="--target=aarch64-linux-android -isystem /usr/aarch64-linux-gnu/include" \
        cargo check --target aarch64-linux-android >&2
    rows+=("| aarch64-linux-android | checked | - | - | poll | cargo check passes; link with cross (needs the NDK) |")
else
    rows+=("| aarch64-linux-android | - | - | - | poll | skipped: needs the rustup target, clang and llvm-ar |")
fi
rows+=("| armv7-unknown-linux-musleabihf | - | - | - | inotify | not built here: use cross (Cross.toml) |")

echo
echo "| target | build | size (stripped) | linkage | default watcher | |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
exit $fail
