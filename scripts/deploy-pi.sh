#!/usr/bin/env bash
# Installs the ferry client on a Raspberry Pi (or any systemd Linux) over ssh: the binary, the
# secret, sample settings (kept if present) and ferry-client.service, run as a `ferry` user.
# Talks only to the host you give.
#   usage: scripts/deploy-pi.sh user@host path/to/ferry path/to/secret
set -euo pipefail
cd "$(dirname "$0")/.."
host=${1:?usage: scripts/deploy-pi.sh user@host path/to/ferry path/to/secret}
bin=${2:?usage: scripts/deploy-pi.sh user@host path/to/ferry path/to/secret}
secret=${3:?usage: scripts/deploy-pi.sh user@host path/to/ferry path/to/secret}
for f in "$bin" "$secret"; do [ -f "$f" ] || { echo "no such file: $f" >&2; exit 1; }; done
ssh "$host" 'rm -rf /tmp/ferry-deploy && mkdir -m 700 /tmp/ferry-deploy'
scp "$bin" "$secret" targets/raspberry-pi/ferry-client.service targets/raspberry-pi/client.env \
    "$host:/tmp/ferry-deploy/"
ssh "$host" "sudo sh -s $(basename "$bin") $(basename "$secret")" <<'REMOTE'
set -eu
cd /tmp/ferry-deploy
install -m 755 "$1" /usr/local/bin/ferry
id ferry >/dev/null 2>&1 || useradd --system --home /nonexistent --shell /usr/sbin/nologin ferry
install -d -m 750 -g ferry /etc/ferry
install -m 600 -o ferry -g ferry "$2" /etc/ferry/secret  # ferry refuses one others can read
[ -f /etc/ferry/client.env ] || install -m 644 client.env /etc/ferry/client.env
. /etc/ferry/client.env
install -d -o ferry -g ferry "$FERRY_ROOT"
install -m 644 ferry-client.service /etc/systemd/system/ferry-client.service
systemctl daemon-reload
systemctl enable --now ferry-client
rm -rf /tmp/ferry-deploy
/usr/local/bin/ferry --version
echo "ferry-client is running; edit /etc/ferry/client.env and: sudo systemctl restart ferry-client"
REMOTE
