"""Stacks of kind systemd against a real systemd (PID 1 of a guest booted with systemd-nspawn), reached
with `pct exec` (the stand-in) as an LXC container is: GuestController stops only the listed units that
are active, holds down the sockets and timers that would start them, writes the marker before the first
stop, reports units systemd had to kill, and starts exactly what it stopped.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.pct_standin import make_pct
from tests.infra.systemd_guest import SystemdGuest, support_problem
from vzdump_hook import config as configuration
from vzdump_hook import marker as markers
from vzdump_hook.config import Kind
from vzdump_hook.controller import GuestController
from vzdump_hook.job import JobId

pytestmark = pytest.mark.integration

VMID = 181
SOCK = "/var/lib/vzdh/app.sock"
# ExecStop of the app keeps a copy of the marker as it is when systemd stops the app
MARKER_AT_STOP = "/var/lib/vzdh/marker-at-stop.json"
UNITS = {
    "vzdh-app.service": "[Service]\nExecStart=/bin/sleep infinity\nRestart=always\n"
                        f"ExecStop=/bin/sh -c 'cp /var/lib/vzdump-hook/marker.json {MARKER_AT_STOP}; kill $MAINPID'\n"
                        "[Install]\nWantedBy=multi-user.target\n",
    "vzdh-sock.socket": f"[Socket]\nListenStream={SOCK}\n[Install]\nWantedBy=sockets.target\n",
    "vzdh-sock.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    "vzdh-tick.timer": "[Timer]\nOnActiveSec=1h\n[Install]\nWantedBy=timers.target\n",
    "vzdh-tick.service": "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    "vzdh-idle.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    # ignores SIGTERM: systemd kills it with SIGKILL once TimeoutStopSec= runs out
    "vzdh-stubborn.service": "[Service]\nExecStart=/bin/sh -c 'trap \"\" TERM; while :; do sleep 0.1; done'\nTimeoutStopSec=1\n"
                             "[Install]\nWantedBy=multi-user.target\n",
}
ENABLE = ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer", "vzdh-stubborn.service")


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdGuest]:
    problem = support_problem()
    if problem:
        pytest.skip(problem)
    g = SystemdGuest(VMID, tmp_path_factory.mktemp("sd"), UNITS, ENABLE)
    g.ok(["mkdir", "-p", "/var/lib/vzdh"])
    try:
        yield g
    finally:
        g.close()


def controller(g: SystemdGuest, stacks: list[object], **over: object) -> GuestController:
    table = {"transport": "pct", "pct": {"path": make_pct(g.workdir)}, "stacks": stacks, "stop_timeout": 10, **over}
    return GuestController(configuration.validate_guest(VMID, table), JobId("node", "boot", 1, 1))


def soon(s: float = 120) -> float:
    return time.monotonic() + s


def connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


APP = {"kind": "systemd", "name": "app", "units": ["vzdh-app.service", "vzdh-sock.service", "vzdh-tick.service"]}
IDLE = {"kind": "systemd", "name": "idle", "units": ["vzdh-idle.service"]}


def test_stops_active_units_and_their_triggers_marker_first_then_starts_exactly_those(guest: SystemdGuest) -> None:
    assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-sock.service", "vzdh-tick.timer")] == ["active", "active", "inactive", "active"]
    ctl = controller(guest, [APP, IDLE])
    try:
        p = ctl.preflight(soon())
        assert p.selected == ("app",) and p.missing == ("idle",) and p.compose == ()
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert not q.errors and not q.killed
        (rec,) = q.stacks
        assert rec.kind is Kind.SYSTEMD and rec.units == ("vzdh-app.service",)  # vzdh-sock and vzdh-tick were not running
        assert set(rec.triggers) == {"vzdh-sock.socket", "vzdh-tick.timer"}
        # during the window: the app is down, and neither its socket nor its timer can start anything
        assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["inactive"] * 3
        assert not connects(guest.file(SOCK))
        assert guest.state("vzdh-sock.service") == "inactive"
        at_stop = markers.parse(guest.file(MARKER_AT_STOP).read_bytes())
        assert [s.units for s in at_stop.stacks] == [("vzdh-app.service",)] and at_stop.state == "stopping"
        written = markers.parse(guest.file("/var/lib/vzdump-hook/marker.json").read_bytes())
        assert written.stacks == q.stacks and written.state == "stopped"

        r = ctl.resume(soon())
        assert r.started == ("app",) and not r.failed and r.marker_removed
        assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["active"] * 3
        assert connects(guest.file(SOCK))  # listening again (this activates vzdh-sock.service, as it would without the hook)
        assert guest.state("vzdh-idle.service") == "inactive"  # never started: it was not running
        assert not guest.file("/var/lib/vzdump-hook/marker.json").exists()
    finally:
        ctl.close()
        # the test's connection waits in the socket's queue (the service never accepts): a new socket
        guest.ok(["systemctl", "stop", "vzdh-sock.socket", "vzdh-sock.service"])
        guest.ok(["systemctl", "start", "vzdh-sock.socket"])


def test_a_unit_systemd_had_to_kill_is_reported_as_killed_and_started_again(guest: SystemdGuest) -> None:
    assert guest.state("vzdh-stubborn.service") == "active"
    ctl = controller(guest, [{"kind": "systemd", "name": "stubborn", "units": ["vzdh-stubborn.service"]}])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.killed == ("stubborn:vzdh-stubborn.service",)
        assert guest.state("vzdh-stubborn.service") == "failed"
        r = ctl.resume(soon())
        assert r.started == ("stubborn",) and r.marker_removed
        assert guest.state("vzdh-stubborn.service") == "active"
    finally:
        ctl.close()


def test_a_unit_that_will_not_start_stays_in_the_marker(guest: SystemdGuest) -> None:
    ctl = controller(guest, [APP])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks[0].units == ("vzdh-app.service",)
        fail = "/run/systemd/system/vzdh-app.service.d"  # a drop-in that makes the start fail
        guest.ok(["sh", "-c", f"mkdir -p {fail} && printf '[Service]\\nExecStartPre=/bin/false\\n' > {fail}/fail.conf && systemctl daemon-reload"])
        r = ctl.resume(soon())
        assert r.failed == ("app",) and r.marker_left and "vzdh-app.service" in r.problems[0]
        left = markers.parse(guest.file("/var/lib/vzdump-hook/marker.json").read_bytes())
        assert [s.name for s in left.stacks] == ["app"] and left.stacks[0].triggers == q.stacks[0].triggers
        guest.ok(["sh", "-c", f"rm -r {fail} && systemctl daemon-reload"])
        r = ctl.resume(soon())
        assert r.started == ("app",) and r.marker_removed
        assert guest.state("vzdh-app.service") == "active"
    finally:
        ctl.close()


def test_a_unit_that_does_not_exist_is_missing_and_nothing_else_changes(guest: SystemdGuest) -> None:
    ctl = controller(guest, [{"kind": "systemd", "name": "ghost", "units": ["vzdh-no-such.service"]}])
    try:
        p = ctl.preflight(soon())
        assert p.selected == () and p.missing == ("ghost",)
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks == ()
        assert not guest.file("/var/lib/vzdump-hook/marker.json").exists()
    finally:
        ctl.close()
