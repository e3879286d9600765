"""Shared pytest set-up: the real-peer fixtures (tests/infra/fixtures.py).

With VZDUMP_HOOK_NO_SKIP=1 (set by .ci/run) a skipped test counts as a failure: CI installs every
peer, so a skip there means a broken set-up, not a machine that cannot run the test. The one
exception: the VM tier (tests/vm/) on a machine that cannot run QEMU at all skips with a reason that
starts with ``VM tier skipped on this machine:``, and the run's summary says so in one loud line.
"""

from __future__ import annotations

import functools
import os
import re
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
    """For a parallel run (scripts/test.sh: pytest-xdist, scheduled by pytest_xdist_make_scheduler below),
    keep together what shares an expensive fixture: the VM tier (one VM a session) and the LXC tier (one
    container a session) each on one worker, and a module whose fixture is module-scoped (a booted systemd
    guest, the Debian roots) on one worker. Every other test goes to whichever worker is free.

    The scheduler runs in the controller, which collects nothing: it groups by a test's path alone
    (group_of). Here, where the fixtures are known, every test's group is checked against it."""
    wrong = [f"{item.nodeid}: {group_of(item.nodeid)!r}, its fixtures say {_group(item)!r}"
             for item in items if _group(item) not in (None, group_of(item.nodeid))]  # more is harmless
    if wrong:
        raise pytest.UsageError("tests/conftest.py group_of() places tests apart from what they share:\n  "
                                + "\n  ".join(wrong[:20]))
    # On xdist's workers, the longest groups first, so that a worker starts each at once rather than at
    # the end: the VM tier (about 10 min of one worker), then the LXC tier. Not in a run without workers:
    # there the VM (a session fixture) would idle through every later test, taking a core.
    if hasattr(config, "workerinput"):
        first = {"vm-tier": 0, "lxc-tier": 1}
        items.sort(key=lambda item: first.get(group_of(item.nodeid) or "", 2))


def _tier(path: Path) -> str | None:
    """The tier a test file belongs to (one VM or one container for all of its tests), or None."""
    return f"{path.parts[1]}-tier" if path.parts[:2] in (("tests", "vm"), ("tests", "lxc")) else None


def _group(item: pytest.Item) -> str | None:
    """The group of a collected test, from its place and its fixtures."""
    path = Path(str(item.path)).resolve().relative_to(ROOT)
    if tier := _tier(path):
        return tier
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        if defs and defs[-1].scope in ("module", "package"):
            return str(path)
    return None


_MODULE_SCOPED = re.compile(r"""@pytest\.fixture\([^)]*scope=["'](module|package)["']""")


@functools.cache
def _module_scoped(path: str) -> bool:
    """The test module defines a module-scoped fixture (none is defined in a conftest.py: checked above)."""
    try:
        return bool(_MODULE_SCOPED.search((ROOT / path).read_text()))
    except OSError:
        return False


def group_of(nodeid: str) -> str | None:
    """The group of a test from its node id alone (what xdist's controller has)."""
    path = nodeid.split("::", 1)[0]
    return _tier(Path(path)) or (path if _module_scoped(path) else None)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's own loadgroup relies on renaming node ids, which pytest 9.2 no longer allows (its tests then
    land on any worker, and each worker boots its own VM): a group is a scope of xdist's load-scope
    scheduler instead, and every test outside a group is a scope of its own."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid) or nodeid

    return GroupScheduling(config, log)


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
