"""Shared pytest set-up: the real-peer fixtures (tests/infra/fixtures.py).

With VZDUMP_HOOK_NO_SKIP=1 (set by .ci/run) a skipped test counts as a failure: CI installs every
peer, so a skip there means a broken set-up, not a machine that cannot run the test.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

pytest_plugins = ["tests.infra.fixtures"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("VZDUMP_HOOK_NO_SKIP") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but VZDUMP_HOOK_NO_SKIP is set: {report.longrepr}"
