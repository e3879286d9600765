#!/usr/bin/env bash
# Runs the fuzzers (tests/fuzz/) longer than the default test run does: random seeds and 25 times the
# examples (HYPOTHESIS_PROFILE=long; about 15 minutes on 2 cores). A failure prints the example and a
# @reproduce_failure line.
#   scripts/fuzz.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
HYPOTHESIS_PROFILE=long exec scripts/test.sh tests/fuzz "$@"
