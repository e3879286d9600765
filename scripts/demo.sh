#!/usr/bin/env bash
# The main job on a machine without Proxmox: installs what is needed (as root), then plays a
# simulated vzdump backup against a demo guest (sshd in a network namespace + a compose PostgreSQL).
#   scripts/demo.sh [--type lxc|qemu] [--mode stop|suspend|snapshot] [--transfer SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (network namespace, sshd, docker)" >&2; exit 1; }
scripts/setup-test-host.sh --demo
scripts/venv.sh >/dev/null
exec .venv/bin/python scripts/demo.py "$@"
