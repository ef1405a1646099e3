#!/usr/bin/env bash
# Pushes a ferry binary and the Termux files to a phone over adb. adb cannot write into
# Termux's private home (no root), so the files go to /data/local/tmp/ferry-deploy and one
# command run inside Termux copies them home (it is printed at the end).
#   usage: scripts/deploy-android.sh path/to/ferry   (an aarch64 Android or static musl build)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: scripts/deploy-android.sh path/to/ferry}
[ -f "$bin" ] || { echo "no such file: $bin" >&2; exit 1; }
command -v adb >/dev/null || { echo "adb not found: install it (Debian: apt install adb)" >&2; exit 1; }
dest=/data/local/tmp/ferry-deploy
adb shell mkdir -p "$dest"
adb push "$bin" "$dest/ferry"
for f in ferry-start boot-ferry ferry.env install.sh; do
    adb push "targets/android-termux/$f" "$dest/$f"
done
# World-readable so the Termux app's user can copy them.
adb shell chmod 755 "$dest" "$dest/ferry" "$dest/ferry-start" "$dest/boot-ferry" "$dest/install.sh"
adb shell chmod 644 "$dest/ferry.env"
echo
echo "Now, in Termux on the phone, run:"
echo "  sh $dest/install.sh"
