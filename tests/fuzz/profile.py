"""Hypothesis settings for the fuzzers: a fixed seed and a small budget in the default test run
(HYPOTHESIS_PROFILE=ci, a few seconds per fuzzer), random seeds and 25 times the examples with
HYPOTHESIS_PROFILE=long (scripts/fuzz.sh)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_SCALE = {"ci": 1, "long": 25}[PROFILE]
_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def budget(examples: int) -> settings:
    """Settings for a fuzzer that runs `examples` examples in the default run."""
    return settings(max_examples=examples * _SCALE, derandomize=PROFILE == "ci", print_blob=True, **_COMMON)  # type: ignore[arg-type]
