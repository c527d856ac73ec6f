#!/usr/bin/env bash
# Installs (or upgrades) ttspool as a systemd service. Idempotent: run it
# again after `git pull` to upgrade; an existing config is never overwritten.
#   sudo systemd/install.sh            build, install, enable, (re)start
#   sudo systemd/install.sh --no-start install only
set -euo pipefail
cd "$(dirname "$0")/.."
start=1
[ "${1:-}" = "--no-start" ] && start=0
PREFIX=${PREFIX:-/usr/local}

if [ ! -x target/release/ttspool ] || [ -n "$(find src Cargo.toml -newer target/release/ttspool -print -quit)" ]; then
  cargo build --release --locked
fi

getent group ttspool >/dev/null || groupadd --system ttspool
getent passwd ttspool >/dev/null || useradd --system --gid ttspool --home-dir /var/lib/ttspool --shell /usr/sbin/nologin ttspool
for g in video render; do getent group "$g" >/dev/null && usermod -aG "$g" ttspool || true; done

install -m 0755 target/release/ttspool "$PREFIX/bin/ttspool.new"
mv -f "$PREFIX/bin/ttspool.new" "$PREFIX/bin/ttspool"
install -d -m 0750 -o root -g ttspool /etc/ttspool
[ -e /etc/ttspool/ttspool.toml ] || install -m 0640 -o root -g ttspool systemd/ttspool.toml /etc/ttspool/ttspool.toml
install -d -m 0750 -o ttspool -g ttspool /var/lib/ttspool /var/lib/ttspool/spool /var/lib/ttspool/spool/pending /var/lib/ttspool/outputs /var/lib/ttspool/voices
install -D -m 0644 README.md /usr/share/doc/ttspool/README.md
install -m 0644 systemd/ttspool.service /etc/systemd/system/ttspool.service

"$PREFIX/bin/ttspool" check -c /etc/ttspool/ttspool.toml || echo "warning: ttspool check found problems (see above)" >&2
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable ttspool.service
  if [ $start -eq 1 ]; then systemctl restart ttspool.service; fi
  systemctl --no-pager status ttspool.service || true
else
  echo "systemd is not running here: installed files only" >&2
fi
