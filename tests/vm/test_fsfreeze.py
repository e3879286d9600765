"""Frozen file systems, for real: `fsfreeze-freeze`/`-thaw` through the PVE API double to the VM's agent.

- While frozen, writes to the root file system block (a writer in the VM stalls for the whole freeze)
  and the agent refuses `guest-exec`, so nothing the hook sends through the agent runs then.
- examples/guest/fsfreeze-hook.d/vzdump-hook-thaw, installed where Debian's qemu-guest-agent runs its
  hooks (``/etc/qemu/fsfreeze-hook.d/``, agent started with ``-F``), starts the stacks a marker lists on
  the agent's thaw, not on its freeze.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra import vm_compose
from tests.infra.pve_api import PveApiDouble
from tests.infra.vm import TestVm
from tests.vm.conftest import VMID
from tests.vm.test_agent import agent, api  # noqa: F401 - fixtures
from vzdump_hook import config as configuration
from vzdump_hook.errors import TransportError
from vzdump_hook.guest.install import Installer, Layout
from vzdump_hook.guest.session import GuestSession
from vzdump_hook.node.job import JobId
from vzdump_hook.transports.base import Transport

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
THAW = REPO / "examples" / "guest" / "fsfreeze-hook.d" / "vzdump-hook-thaw"
MARKER = "/var/lib/vzdump-hook/marker.json"
TICKS = "/run/vzdh-ticks"  # tmpfs: not frozen


def _post(api: PveApiDouble, what: str) -> object:
    return api.handle("POST", f"/api2/json/nodes/{api.node}/qemu/{VMID}/agent/{what}", {},
                      f"PVEAPIToken={api.token_id}={api.secret}")


@pytest.fixture
def thawed(api: PveApiDouble) -> Iterator[PveApiDouble]:
    """Whatever a test does, the VM's file systems are thawed afterwards."""
    yield api
    if _post(api, "fsfreeze-status") == {"result": "frozen"}:
        _post(api, "fsfreeze-thaw")


def _ticks(vm: TestVm) -> int:
    """Lines in TICKS (tmpfs), read over ssh: a session without a tty writes nothing to the frozen root."""
    return int(vm.ok(f"wc -l < {TICKS}", timeout=30))


def test_writes_block_while_frozen_and_the_agent_runs_nothing(vm: TestVm, thawed: PveApiDouble,
                                                              agent: Transport) -> None:
    # TICKS exists (empty) before the writer starts: the first count may come before its first tick
    vm.ok(f"rm -f {TICKS}; : > {TICKS}; "
          f"setsid nohup sh -c 'while :; do echo x > /root/vzdh-tick && sync /root/vzdh-tick && "
          f"echo >> {TICKS}; sleep 0.05; done' >/dev/null 2>&1 < /dev/null & echo $! > /run/vzdh-ticker.pid")
    try:
        until = time.monotonic() + 60
        while _ticks(vm) < 2:  # the writer writes
            assert time.monotonic() < until, "the writer in the VM does not write"
            time.sleep(0.2)
        assert _post(thawed, "fsfreeze-freeze")["result"] >= 1  # type: ignore[index]  # file systems frozen
        assert _post(thawed, "fsfreeze-status") == {"result": "frozen"}
        frozen_at = _ticks(vm)  # the write in progress at the freeze may still land: count from here
        with agent as t, pytest.raises(TransportError, match="frozen"):
            t.run(["true"], timeout=30)  # the agent refuses guest-exec while frozen
        time.sleep(3)  # the duration under test: the writer must not get a single write through
        assert _ticks(vm) <= frozen_at + 1
        assert _post(thawed, "fsfreeze-thaw")["result"] >= 1  # type: ignore[index]
        assert _post(thawed, "fsfreeze-status") == {"result": "thawed"}
        until = time.monotonic() + 60
        while _ticks(vm) <= frozen_at + 2:  # and it writes again once thawed
            assert time.monotonic() < until, "the writer did not come back after the thaw"
            time.sleep(0.2)
    finally:
        vm.ssh("kill $(cat /run/vzdh-ticker.pid); rm -f /run/vzdh-ticker.pid /root/vzdh-tick")


@pytest.fixture
def thaw_hook(vm: TestVm) -> Iterator[None]:
    """Guest side installed, vzdump-hook-thaw in Debian's fsfreeze-hook.d, the agent restarted with -F."""
    guest = configuration.validate_guest(VMID, {"ssh": {"host": vm.host, "user": "root",
                                                        "identity_file": vm.identity_file,
                                                        "known_hosts": vm.known_hosts_file}, "marker_path": MARKER})
    lines: list[str] = []
    assert Installer(guest, Layout(), lines.append, restrict=False).run(), lines
    vm.ok("install -m 0755 /dev/stdin /etc/qemu/fsfreeze-hook.d/vzdump-hook-thaw", input=THAW.read_text())
    dropin = "[Service]\nExecStart=\nExecStart=-/usr/sbin/qemu-ga -F\n"
    vm.ok("mkdir -p /etc/systemd/system/qemu-guest-agent.service.d && "
          "cat > /etc/systemd/system/qemu-guest-agent.service.d/vzdh-fsfreeze-hook.conf && "
          "systemctl daemon-reload && systemctl restart qemu-guest-agent", input=dropin)
    until = time.monotonic() + 60
    while True:  # the agent is back when it answers
        try:
            vm.qga.call("guest-ping", timeout=5)
            break
        except Exception:
            assert time.monotonic() < until, "qemu-ga did not come back after the restart"
            time.sleep(0.5)
    try:
        yield
    finally:
        vm.ssh("rm -rf /etc/qemu/fsfreeze-hook.d/vzdump-hook-thaw /etc/systemd/system/qemu-guest-agent.service.d; "
               f"systemctl daemon-reload; systemctl restart qemu-guest-agent; rm -f {MARKER}")


def test_the_agents_thaw_runs_the_hook_that_starts_the_stacks(vm: TestVm, thawed: PveApiDouble,
                                                              thaw_hook: None) -> None:
    project = vm_compose.make(vm, "thaw", {"app": "sleeper"})
    try:
        vm_compose.up(vm, project)
        guest = configuration.validate_guest(VMID, {"ssh": {"host": vm.host, "user": "root",
                                                            "identity_file": vm.identity_file,
                                                            "known_hosts": vm.known_hosts_file},
                                                    "marker_path": MARKER, "stacks": [project.name],
                                                    "stop_timeout": 10})
        ctl = GuestSession(guest, JobId.current())
        try:
            q = ctl.quiesce("qemu", "snapshot", time.monotonic() + 120)
        finally:
            ctl.close()
        assert [s.name for s in q.stacks] == [project.name] and not q.errors
        assert vm_compose.running_services(vm, project) == set()
        hold = 3.0  # the freeze is held this long: nothing may start before the thaw
        before_freeze = float(vm.ok("date +%s.%N"))  # the guest's clock, as docker's StartedAt
        _post(thawed, "fsfreeze-freeze")
        try:
            time.sleep(hold)  # the duration under test, not a synchronisation
        finally:
            _post(thawed, "fsfreeze-thaw")
        # a liveness bound, not a target: under TCG on a loaded machine the thaw hook's docker start took 71 s once
        until = time.monotonic() + 180
        # the marker first: a cheap test, and the hook's recovery removes it once the stack runs (docker's CLI costs
        # ~1 s of the VM's CPU a call under TCG, taken from the start it waits for)
        while vm.ssh(f"test -e {MARKER}").returncode == 0 or vm_compose.running_services(vm, project) != {"app"}:
            assert time.monotonic() < until, vm.ok("journalctl -t vzdump-hook-thaw -t vzdump-hook-recover --no-pager "
                                                   "| tail -20")
            time.sleep(0.5)
        started = vm_compose.started_at(vm, project)["app"]
        assert started >= before_freeze + hold - 0.5, (f"started {started - before_freeze:.2f} s after the freeze, "
                                                       "before the thaw")
        assert "-F" in vm.ok("ps -o args= -C qemu-ga").split()
    finally:
        vm_compose.remove(vm, project)
