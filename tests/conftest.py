"""Shared pytest set-up: the real-peer fixtures (tests/infra/fixtures.py).

With VZDUMP_HOOK_NO_SKIP=1 (set by .ci/run) a skipped test counts as a failure: CI installs every
peer, so a skip there means a broken set-up, not a machine that cannot run the test. The one
exception: the VM tier (tests/vm/) on a machine that cannot run QEMU at all skips with a reason that
starts with ``VM tier skipped on this machine:``, and the run's summary says so in one loud line.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

pytest_plugins = ["tests.infra.fixtures"]
VM_TIER_SKIP = "VM tier skipped on this machine:"  # tests/vm/conftest.py
_vm_tier_skips: set[str] = set()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in sorted(_vm_tier_skips):
        terminalreporter.write_line(f"!!! {VM_TIER_SKIP} {reason} !!!", red=True, bold=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("VZDUMP_HOOK_NO_SKIP") and report.skipped and not hasattr(report, "wasxfail"):
        if VM_TIER_SKIP in str(report.longrepr):
            _vm_tier_skips.add(str(report.longrepr).split(VM_TIER_SKIP, 1)[1].split("'")[0].strip())
            return
        report.outcome = "failed"
        report.longrepr = f"skipped, but VZDUMP_HOOK_NO_SKIP is set: {report.longrepr}"


@pytest.fixture(autouse=True)
def _no_resident_outlives_its_test(tmp_path_factory: pytest.TempPathFactory) -> Generator[None, None, None]:
    """A resident (vzdump_hook/resident.py) of a test whose guest is gone would go on retrying until
    its deadline, and load every later test: end the ones whose files are in this session's temp
    directories once the test is over. (Tests that care check that their residents end by themselves.)"""
    yield
    base = str(tmp_path_factory.getbasetemp()).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"vzdump_hook.resident" in argv and any(a.startswith(base) for a in argv):
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
