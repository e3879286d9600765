#!/usr/bin/env bash
# Creates ./.venv with vzdump-hook installed (editable) and the test dependencies; prints its path.
# pip runs only when pyproject.toml changed since the last install (a stamp in the venv keeps its hash).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat .venv/.vzdh-installed 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import vzdump_hook, pytest, xdist' 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  printf '%s' "$want" > .venv/.vzdh-installed
fi
echo "$PWD/.venv"
