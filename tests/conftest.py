"""Shared pytest set-up: the real-peer fixtures (tests/infra/fixtures.py).

With VZDUMP_HOOK_NO_SKIP=1 (set by .ci/run) a skipped test counts as a failure: CI installs every
peer, so a skip there means a broken set-up, not a machine that cannot run the test. The one
exception: the VM tier (tests/vm/) on a machine that cannot run QEMU at all skips with a reason that
starts with ``VM tier skipped on this machine:``, and the run's summary says so in one loud line.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.infra.fixtures"]
VM_TIER_SKIP = "VM tier skipped on this machine:"  # tests/vm/conftest.py
_vm_tier_skips: set[str] = set()
ROOT = Path(__file__).resolve().parents[1]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """The VM tier's skip, as the process that prints the summary sees it (with xdist, a worker's
    report reaches the controller here)."""
    if report.skipped and VM_TIER_SKIP in str(report.longrepr):
        _vm_tier_skips.add(str(report.longrepr).split(VM_TIER_SKIP, 1)[1].split("'")[0].strip())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For a parallel run (scripts/test.sh: pytest-xdist, --dist loadgroup), keep together what shares
    an expensive fixture: the VM tier (one VM per session) and the LXC tier (one container per session)
    each on one worker, and a module whose fixture is module-scoped (a booted systemd guest, the Debian
    roots) on one worker. Every other test goes to whichever worker is free."""
    for item in items:
        group = _group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # On xdist's workers, the longest groups first, so that a worker starts each at once rather than at
    # the end: the VM tier (about 10 min of one worker), then the LXC tier. Not in a run without workers:
    # there the VM (a session fixture) would idle through every later test, taking a core.
    if hasattr(config, "workerinput"):
        first = {"vm-tier": 0, "lxc-tier": 1}
        items.sort(key=lambda item: first.get(_group(item) or "", 2))


def _group(item: pytest.Item) -> str | None:
    path = Path(str(item.path)).resolve().relative_to(ROOT)
    if path.parts[:2] in (("tests", "vm"), ("tests", "lxc")):
        return f"{path.parts[1]}-tier"
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        if defs and defs[-1].scope in ("module", "package"):
            return str(path)
    return None


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
    """A resident (vzdump_hook/resident/process.py) of a test whose guest is gone would go on retrying until
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
        if b"vzdump_hook.resident.process" in argv and any(a.startswith(base) for a in argv):
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
