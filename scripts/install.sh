#!/usr/bin/env bash
# Installs vzdump-hook on a Proxmox VE node from a checkout (development; the Debian package is the
# way for production): a venv under /opt/vzdump-hook, the launcher as /usr/local/bin/vzdump-hook (an
# absolute path, as vzdump runs hooks with an empty environment), the full example config as
# /etc/vzdump-hook/config.example.toml, then `vzdump-hook setup` (a config that handles no guest yet,
# an SSH key, known_hosts).
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
# the console script pip makes starts Python without -I (a PYTHONPATH in root's environment would be
# read): the launcher below is the one way to start the program
rm -f "$prefix/bin/vzdump-hook"
# the launcher (examples/node/vzdump-hook) is what vzdump runs: it keeps a broken Python from failing backups
rm -f /usr/local/bin/vzdump-hook.new
sed "s|^PYTHON=.*|PYTHON=$prefix/bin/python|" "$src/examples/node/vzdump-hook" > /usr/local/bin/vzdump-hook.new
chmod 0755 /usr/local/bin/vzdump-hook.new && mv -f /usr/local/bin/vzdump-hook.new /usr/local/bin/vzdump-hook
install -d -m 0700 /etc/vzdump-hook
install -m 0644 "$src/examples/config.toml" /etc/vzdump-hook/config.example.toml
echo "installed: /usr/local/bin/vzdump-hook, running $prefix/bin/python ($(/usr/local/bin/vzdump-hook --version))"
# the config (examples/node/config.toml: no guest handled yet), the node's key and known_hosts, the vzdump.conf line
/usr/local/bin/vzdump-hook setup
