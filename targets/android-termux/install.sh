#!/data/data/com.termux/files/usr/bin/sh
# Run inside Termux (deploy-android.sh pushed this folder to /data/local/tmp/ferry-deploy):
# installs ferry into Termux's home. Keeps an existing ~/.ferry.env.
set -eu
src=/data/local/tmp/ferry-deploy
mkdir -p "$HOME/bin" "$HOME/.termux/boot"
cp "$src/ferry" "$HOME/bin/ferry" && chmod 755 "$HOME/bin/ferry"
cp "$src/ferry-start" "$HOME/bin/ferry-start" && chmod 755 "$HOME/bin/ferry-start"
cp "$src/boot-ferry" "$HOME/.termux/boot/ferry" && chmod 755 "$HOME/.termux/boot/ferry"
[ -f "$HOME/.ferry.env" ] || cp "$src/ferry.env" "$HOME/.ferry.env"
"$HOME/bin/ferry" --version
echo "installed. Next: put the secret in ~/.ferry-secret and chmod 600 it, edit ~/.ferry.env, run ferry-start."
