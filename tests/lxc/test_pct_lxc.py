"""The pct transport against a real LXC container (tests/infra/lxc_ct.py), through the `pct` stand-in that
runs ``lxc-attach`` as ``pct exec`` does; and what the cgroup freezer of vzdump's suspend mode does to a
command sent into the container: it blocks until the thaw, and a command given up on while frozen never
runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.infra.lxc_ct import LxcContainer
from tests.lxc.conftest import VMID, CtCompose, Pct, in_flight
from vzdump_hook import config as configuration
from vzdump_hook.errors import ConnectError, GuestFrozen
from vzdump_hook.transports.base import Transport
from vzdump_hook.transports.local import NODE_ENV
from vzdump_hook.transports.pct import GUEST_PATH, PctTransport

pytestmark = pytest.mark.integration


def transport(pct: Pct, vmid: int = VMID) -> Transport:
    return PctTransport.for_guest(configuration.validate_guest(vmid, {"transport": "pct", "pct": {"path": pct.path}}))


def wait_for(pred: object, timeout: float, what: str) -> None:
    """Poll pred() (a callable) until true; AssertionError naming `what` after timeout seconds."""
    until = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < until, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_commands_run_in_the_container_with_status_stdout_stderr_and_stdin(ct: LxcContainer, pct: Pct) -> None:
    with transport(pct) as t:
        t.connect(10)
        r = t.run(["sh", "-c", 'printf "%s|" "$(uname -n)" "$1"; cat; echo to-stderr >&2; exit 7', "sh", "a b;$(id)"],
                  timeout=30, stdin=b"from stdin")
        assert (r.exit_status, r.stdout, r.stderr) == (7, "ct9151|a b;$(id)|from stdin", "to-stderr\n")
        # in every namespace of the CT's init (not the host's), and systemd is its PID 1
        names = ("pid", "mnt", "net", "uts", "ipc", "cgroup")
        inside = t.run(["readlink", *(f"/proc/self/ns/{n}" for n in names)], timeout=30).stdout.split()
        init = ct.init_pid()
        assert inside == [os.readlink(f"/proc/{init}/ns/{n}") for n in names]
        assert not set(inside) & {os.readlink(f"/proc/self/ns/{n}") for n in names}
        assert t.run(["cat", "/proc/1/comm"], timeout=30).stdout == "systemd\n"
        env = t.run(["env"], timeout=30).stdout.splitlines()
    # what pct got from the hook, and what reached the command: pct's PATH, the transport's guest PATH
    assert sorted(env) == sorted([f"PATH={GUEST_PATH}", "container=lxc"])
    calls = pct.calls()
    # (PWD: set by the sh that the `pct` executable is)
    assert len(calls) == 5 and all({k: v for k, v in c["env"].items() if k != "PWD"} == NODE_ENV for c in calls)  # type: ignore[attr-defined]
    assert calls[1]["argv"][:5] == ["exec", str(VMID), "--", "/usr/bin/env", f"PATH={GUEST_PATH}"]  # type: ignore[index]
    assert [c["status"] for c in calls] == [0, 7, 0, 0, 0]


def test_a_file_the_transport_writes_under_var_lib_is_in_the_containers_root(ct: LxcContainer, pct: Pct) -> None:
    path = "/var/lib/vzdump-hook/probe.json"
    data = b'{"probe": 1}\n' + bytes(range(256))
    try:
        with transport(pct) as t:
            t.write_file(path, data, timeout=30)
            on_host = ct.file(path)
            assert on_host.read_bytes() == data and oct(on_host.stat().st_mode & 0o777) == "0o600"
            assert t.read_file(path, limit=1000, timeout=30) == data
            t.remove_file(path, timeout=30)
        assert not on_host.exists()
        assert not Path(path).exists()  # the host's own /var/lib has none of it
    finally:
        ct.file(path).unlink(missing_ok=True)


def test_a_stopped_container_and_an_unknown_one_are_connect_errors(ct: LxcContainer, pct: Pct) -> None:
    with transport(pct, 9999) as t, pytest.raises(ConnectError) as unknown:
        t.connect(10)
    assert "Configuration file 'nodes/testnode/lxc/9999.conf' does not exist" in str(unknown.value)
    ct.stop()
    assert ct.state() == "STOPPED"
    with transport(pct) as t, pytest.raises(ConnectError) as stopped:
        t.connect(10)
    # lxc-attach's own words for a CT that does not run (LXC 5.0; the namespace stand-in says LXC 4's
    # "Failed to get init pid")
    assert "Connection refused - Failed to get attach context" in str(stopped.value), stopped.value
    ct.start()
    with transport(pct) as t:
        t.connect(30)


def test_a_command_sent_into_a_frozen_container_blocks_until_it_is_thawed(ct: LxcContainer, pct: Pct) -> None:
    out = "/var/lib/vzdh/ran-at"
    ct.file(out).unlink(missing_ok=True)
    before = ct.procs()
    ct.freeze()
    assert ct.state() == "FROZEN"
    proc = subprocess.Popen([pct.path, "exec", str(VMID), "--", "sh", "-c", f"date +%s.%N > {out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={})
    try:
        # lxc-attach has put its child into the CT's cgroup, where the freezer holds it
        wait_for(lambda: ct.procs() - before, 20, "lxc-attach's process joins the CT's cgroup")
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # did not complete within 3 s while frozen
        assert not ct.file(out).exists() and ct.state() == "FROZEN"
        thawed_at = time.time()
        ct.unfreeze()
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ran_at = float(ct.file(out).read_text())
    assert ran_at >= thawed_at  # the command itself ran only after the thaw
    (call,) = pct.calls()
    assert call["status"] == 0 and float(call["time"]) < thawed_at < float(call["end"])  # type: ignore[arg-type]
    assert in_flight(pct.calls(), thawed_at - 1, thawed_at) == [call]


def test_the_transport_sends_nothing_into_a_frozen_container(ct: LxcContainer, pct: Pct) -> None:
    """A command would block there until the thaw (above), and a timed-out lxc-attach leaves its process
    in the frozen cgroup: the pct transport reads the CT's freezer state and refuses at once."""
    out = "/var/lib/vzdh/late"
    ct.file(out).unlink(missing_ok=True)
    ct.freeze()
    with transport(pct) as t:
        start = time.monotonic()
        with pytest.raises(GuestFrozen, match="frozen"):
            t.run(["touch", out], timeout=30)
        with pytest.raises(GuestFrozen):
            t.connect(30)
        assert time.monotonic() - start < 1.0  # no wait for the thaw
        assert pct.calls() == []  # pct never ran
        ct.unfreeze()
        assert t.run(["true"], timeout=30).ok  # thawed: it answers again
    assert not ct.file(out).exists()
    (answered,) = pct.calls()
    assert answered["status"] == 0


def test_docker_runs_in_the_container_and_its_containers_freeze_with_it(ct: LxcContainer,
                                                                        ct_compose: CtCompose) -> None:
    p = ct_compose.make("nest", {"app": "sleeper"})
    assert ct_compose.running(p) == {"app"}
    (info,) = ct_compose.containers(p)
    # the CT's engine is its own: the host's engine does not know the container
    host = subprocess.run(["docker", "inspect", str(info["Id"])], capture_output=True, timeout=60)
    assert host.returncode != 0
    # its cgroup is below the CT's (cgroupfs driver, in the CT's cgroup namespace), with its processes
    (cgroup,) = [d for d in ct.freezer().rglob(str(info["Id"])) if d.is_dir()]
    pids = {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
    assert pids and pids <= ct.procs()
    assert any(b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids)
    ct.freeze()
    try:
        assert (cgroup / "freezer.state").read_text().strip() == "FROZEN"
        assert (cgroup / "freezer.parent_freezing").read_text().strip() == "1"
    finally:
        ct.unfreeze()
    assert (cgroup / "freezer.state").read_text().strip() == "THAWED"
