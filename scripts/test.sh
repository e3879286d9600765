#!/usr/bin/env bash
# Runs the whole test suite on this machine (as root: the tests start sshd in network namespaces
# and use a Docker engine). Sets up what they need first (idempotent), then runs pytest in a venv.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (network namespaces, sshd, docker)" >&2; exit 1; }
scripts/setup-test-host.sh
scripts/venv.sh >/dev/null
exec .venv/bin/python -m pytest "$@"
