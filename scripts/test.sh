#!/usr/bin/env bash
# Runs the test suite on this machine (as root: the tests start sshd in network namespaces and use a
# Docker engine). Sets up what they need first (idempotent), then runs pytest in a venv.
#   scripts/test.sh [pytest args...]     the whole suite on 3 pytest-xdist workers (CI runs this): the
#                                        VM tier, the LXC tier and each module with a module-scoped fixture
#                                        stay on one worker each (tests/conftest.py), tests with compose
#                                        projects take turns on the Docker engine (tests/infra/engine.py)
#   scripts/test.sh --quick [args...]    what needs no real peer (unit tests, guest-side sh programs
#                                        under dash and busybox, fuzzers), 4 workers: the edit-test loop
#   VZDH_WORKERS=N scripts/test.sh ...   N workers instead (0: one test at a time, no xdist)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (network namespaces, sshd, docker)" >&2; exit 1; }
workers() { if [ "$1" = 0 ]; then echo "-p no:xdist"; else echo "-n $1"; fi; }  # grouping: tests/conftest.py
if [ "${1:-}" = --quick ]; then
  shift
  missing=()
  for p in busybox dash; do command -v "$p" >/dev/null || missing+=("$p"); done
  [ "${#missing[@]}" = 0 ] || apt-get install -y -qq "${missing[@]}" >/dev/null
  scripts/venv.sh >/dev/null
  # shellcheck disable=SC2046  # the options are words
  exec .venv/bin/python -m pytest $(workers "${VZDH_WORKERS:-4}") tests/unit tests/guest_sh tests/fuzz "$@"
fi
scripts/setup-test-host.sh
scripts/venv.sh >/dev/null
# shellcheck disable=SC2046
exec .venv/bin/python -m pytest $(workers "${VZDH_WORKERS:-3}") "$@"
