"""The LXC tier: one real LXC container per test session (tests/infra/lxc_ct.py), booted from the root
that scripts/setup-test-host.sh built (built here when missing), reached through the `pct` stand-in
over ``lxc-attach``. The container runs systemd and its own Docker engine (nesting).

It is not skipped in CI: with VZDUMP_HOOK_NO_SKIP=1 a machine without LXC fails (tests/conftest.py).
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra import compose
from tests.infra.compose import ComposeProject
from tests.infra.lxc_ct import LxcContainer, cleanup_stale, make_pct, read_calls, support_problem

VMID = 9151
PROJECTS = "/srv/vzdh"  # compose projects in the CT


@pytest.fixture(scope="session")
def ct() -> Iterator[LxcContainer]:
    """The session's container, booted (systemd running, docker up with the test image loaded)."""
    problem = support_problem()
    if problem:
        pytest.skip(f"LXC container: {problem}")
    cleanup_stale()
    c = LxcContainer(VMID)
    try:
        c.start()
        print(f"\nLXC tier: CT {VMID} booted in {c.boot_seconds:.1f} s")
        c.ok(["mkdir", "-p", "/var/lib/vzdh", PROJECTS])
        yield c
    finally:
        c.close()


@pytest.fixture(autouse=True)
def _thawed_and_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves the CT frozen or stopped, or a marker in it (a job that could not resume), does not
    take the next ones with it."""
    yield
    if "ct" in request.fixturenames:
        c: LxcContainer = request.getfixturevalue("ct")
        state = c.state()
        if state == "FROZEN":
            c.unfreeze()
        elif state == "STOPPED":
            c.start()
        shutil.rmtree(c.file("/var/lib/vzdump-hook"), ignore_errors=True)


def in_flight(calls: list[dict[str, object]], start: float, end: float) -> list[dict[str, object]]:
    """The pct calls that ran (from pct's start to its end; a call that never ended runs on) at some moment
    of [start, end]."""
    return [c for c in calls if float(c["time"]) <= end and (c["end"] is None or float(c["end"]) >= start)]  # type: ignore[arg-type]


@dataclass
class Pct:
    """A per-test `pct` for the session's CT: its path and its call log."""

    path: str
    state: Path

    def calls(self) -> list[dict[str, object]]:
        return read_calls(self.state)


@pytest.fixture
def pct(ct: LxcContainer, tmp_path: Path) -> Pct:
    state = tmp_path / "pct"
    return Pct(make_pct(state, ct.lxcpath), state)


class CtCompose:
    """Compose projects in the CT's own engine, written into its root from the host (compose.make_project),
    driven with lxc-attach. A project's ``workdir`` is its directory in the CT."""

    def __init__(self, c: LxcContainer) -> None:
        self.ct = c
        self.made: list[ComposeProject] = []

    def make(self, name: str, services: dict[str, str]) -> ComposeProject:
        p = compose.make_project(name, services, workdir=self.ct.file(PROJECTS))
        q = ComposeProject(name=p.name, workdir=Path(PROJECTS) / p.name, compose=p.compose, services=p.services)
        self.made.append(q)
        self.ct.ok(["sh", "-c", q.shell_command("up", "-d")], timeout=300)
        return q

    def containers(self, p: ComposeProject) -> list[dict[str, object]]:
        """`docker inspect` of the project's containers in the CT."""
        label = f"{compose.LABEL_PROJECT}={p.name}"
        ids = self.ct.ok(["docker", "ps", "-aq", "--no-trunc", "--filter", f"label={label}"]).split()
        return json.loads(self.ct.ok(["docker", "inspect", *ids])) if ids else []

    def running(self, p: ComposeProject) -> set[str]:
        return {c["Config"]["Labels"][compose.LABEL_SERVICE] for c in self.containers(p) if c["State"]["Running"]}  # type: ignore[index]

    def remove(self) -> None:
        if self.made and self.ct.state() == "FROZEN":  # a test left it frozen: compose would wait for the thaw
            self.ct.unfreeze()
        for p in self.made:
            self.ct.attach(["sh", "-c", f"{p.shell_command('down', '-t', '0')}; rm -rf {shlex.quote(str(p.workdir))}"],
                           timeout=120)


@pytest.fixture
def ct_compose(ct: LxcContainer) -> Iterator[CtCompose]:
    made = CtCompose(ct)
    try:
        yield made
    finally:
        made.remove()
