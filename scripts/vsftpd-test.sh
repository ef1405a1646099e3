#!/usr/bin/env bash
# Runs the --ftp-external end-to-end test against Debian's vsftpd. Needs root: it installs
# vsftpd if missing, creates a local account `ferry-ftp-test` (no shell, home /) with a random
# password, and a PAM service `ferry-ftp-test` that checks only that account's password. vsftpd
# listens on 127.0.0.1 only and lets only that account in.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "vsftpd-test.sh needs root (local account, PAM service)" >&2; exit 1; }
if [ ! -x /usr/sbin/vsftpd ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends vsftpd >/dev/null
fi
# The package may start its own vsftpd on port 21; the test runs its own on a free loopback port.
systemctl stop vsftpd 2>/dev/null || service vsftpd stop 2>/dev/null || true
user=ferry-ftp-test
# vsftpd enters the home before local_root, so it must exist: `/`.
id "$user" >/dev/null 2>&1 || useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin "$user"
usermod --home / "$user"
pass_file=$(mktemp)
trap 'rm -f "$pass_file"' EXIT
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$pass_file"
echo "$user:$(cat "$pass_file")" | chpasswd
printf 'auth required pam_unix.so\naccount required pam_unix.so\nsession required pam_unix.so\n' \
    > /etc/pam.d/ferry-ftp-test
export FERRY_VSFTPD_USER=$user FERRY_VSFTPD_PASSWORD_FILE=$pass_file FERRY_VSFTPD_PAM=ferry-ftp-test
echo "+ cargo test --test e2e external -- --ignored" >&2
cargo test --test e2e external -- --ignored
