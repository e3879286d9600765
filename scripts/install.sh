#!/usr/bin/env bash
# Installs vzdump-hook on a Proxmox VE node (Debian, externally managed Python): a venv under
# /opt/vzdump-hook, the command linked to /usr/local/bin/vzdump-hook (an absolute path, as vzdump
# runs hooks with an empty environment), /etc/vzdump-hook with an example config and an SSH key.
# Idempotent; changes nothing in /etc/vzdump.conf (it prints the line to add).
#   scripts/install.sh [PREFIX]        default PREFIX: /opt/vzdump-hook
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-/opt/vzdump-hook}
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  echo "installing python3-venv"; apt-get install -y -qq python3-venv >/dev/null
fi
[ -x "$prefix/bin/python" ] || python3 -m venv "$prefix"
"$prefix/bin/python" -m pip install -q --disable-pip-version-check "$src"
ln -sfn "$prefix/bin/vzdump-hook" /usr/local/bin/vzdump-hook
install -d -m 0700 /etc/vzdump-hook
if [ ! -e /etc/vzdump-hook/config.toml ]; then
  install -m 0600 "$src/examples/config.toml" /etc/vzdump-hook/config.toml
  echo "wrote /etc/vzdump-hook/config.toml (example: edit the [guests.VMID] tables)"
fi
if [ ! -e /etc/vzdump-hook/id_ed25519 ]; then
  ssh-keygen -q -t ed25519 -N '' -C "vzdump-hook@$(hostname -s)" -f /etc/vzdump-hook/id_ed25519
  echo "made the key /etc/vzdump-hook/id_ed25519: add /etc/vzdump-hook/id_ed25519.pub to each guest's authorized_keys"
fi
touch /etc/vzdump-hook/known_hosts
echo "installed: /usr/local/bin/vzdump-hook -> $prefix/bin/vzdump-hook ($("$prefix/bin/vzdump-hook" --help >/dev/null && echo ok))"
if ! grep -qs '^script:' /etc/vzdump.conf; then
  echo "to enable it for every backup job: echo 'script: /usr/local/bin/vzdump-hook' >> /etc/vzdump.conf"
fi
