#!/usr/bin/env bash
# Installs vzdump-hook on a Proxmox VE node (Debian, externally managed Python): a venv under
# /opt/vzdump-hook, the launcher as /usr/local/bin/vzdump-hook (an absolute path, as vzdump runs
# hooks with an empty environment), /etc/vzdump-hook with a config that handles no guest yet, the
# full example beside it, and an SSH key.
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
# the launcher (examples/node/vzdump-hook) is what vzdump runs: it keeps a broken Python from failing backups
rm -f /usr/local/bin/vzdump-hook.new
sed "s|^PYTHON=.*|PYTHON=$prefix/bin/python|" "$src/examples/node/vzdump-hook" > /usr/local/bin/vzdump-hook.new
chmod 0755 /usr/local/bin/vzdump-hook.new && mv -f /usr/local/bin/vzdump-hook.new /usr/local/bin/vzdump-hook
install -d -m 0700 /etc/vzdump-hook
install -m 0644 "$src/examples/config.toml" /etc/vzdump-hook/config.example.toml
if [ ! -e /etc/vzdump-hook/config.toml ]; then
  # no guest is handled until the admin adds one: the example's guests are not this node's
  cat > /etc/vzdump-hook/config.toml <<TOML
# vzdump-hook: no guest is handled until you add a [guests.VMID] table (or tag a guest vzdump-hook).
# Every key with its default: /etc/vzdump-hook/config.example.toml. Check with: vzdump-hook check
[defaults]

# [guests.101]
# ssh = { host = "192.0.2.10" }
# stacks = "auto"
TOML
  chmod 0600 /etc/vzdump-hook/config.toml
  echo "wrote /etc/vzdump-hook/config.toml (no guests yet; every key: /etc/vzdump-hook/config.example.toml)"
fi
if [ ! -e /etc/vzdump-hook/id_ed25519 ]; then
  ssh-keygen -q -t ed25519 -N '' -C "vzdump-hook@$(hostname -s)" -f /etc/vzdump-hook/id_ed25519
  echo "made the key /etc/vzdump-hook/id_ed25519: add /etc/vzdump-hook/id_ed25519.pub to each guest's authorized_keys"
fi
touch /etc/vzdump-hook/known_hosts
echo "installed: /usr/local/bin/vzdump-hook, running $prefix/bin/python ($(/usr/local/bin/vzdump-hook --version))"
if ! grep -qs '^script: */usr/local/bin/vzdump-hook *$' /etc/vzdump.conf; then
  echo "to enable it for every backup job: vzdump-hook enable   (keeps an existing script: line working, in [hook] chain)"
fi
