#!/usr/bin/env bash
# Creates ./.venv with vzdump-hook installed (editable) and the test dependencies; prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "$PWD/.venv"
