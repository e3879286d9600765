"""Nothing stays down when the node never comes back: the installed hook runs as vzdump runs it until
pre-stop, then its vzdump worker dies (the node is gone); the guest brings its stacks back by itself
with examples/guest/vzdump-hook-recover, run in the guest's context (TestGuest.run) against a real
Docker engine and real compose projects.

"The guest has booted since the marker was written" is made real with a time namespace: the recovery
program runs with CLOCK_BOOTTIME (/proc/uptime) a few seconds old, the marker file untouched."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.guest import TestGuest
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, run_job, run_phase
from tests.integration.hookenv import HookSetup, installed_hook, running, wait_until

pytestmark = pytest.mark.integration

VMID = 101
REPO = Path(__file__).resolve().parents[2]
RECOVER = REPO / "examples" / "guest" / "vzdump-hook-recover"
NODE_UNIT = REPO / "examples" / "node" / "vzdump-hook-boot-recover.service"
SHELLS = {"dash": ["dash"], "busybox": ["busybox", "sh"]}

# Runs job-init, job-start, backup-start and pre-stop as vzdump does (this process is the vzdump
# worker: the hook's parent), then this process dies, as it would with the node.
_NODE_DIES_AFTER_PRE_STOP = r"""
import json, os, sys
from tests.infra.vzdump import GuestSpec, run_phase
hook, vmid, vmtype, mode, env = json.loads(sys.argv[1])
guest = GuestSpec(vmid, vmtype, mode)
out = []
for phase in ("job-init", "job-start", "backup-start", "pre-stop"):
    r = run_phase(hook, phase, None if phase.startswith("job-") else guest, extra_env=env, timeout=120)
    out.append([phase, r.returncode, r.lines])
# the node dies: its residents (vzdump_hook/resident/process.py) with it, before the worker is gone
from vzdump_hook.resident import control as resident
for _, info in resident.residents(env["VZDUMP_HOOK_RUN_DIR"]):
    os.kill(info.pid, 9)
print(json.dumps(out), flush=True)
os._exit(0)
"""


@pytest.fixture
def setup(tmp_path: Path) -> HookSetup:
    return HookSetup(tmp_path)


def node_dies_after_pre_stop(setup: HookSetup, vmtype: str = "qemu", mode: str = "snapshot") -> list[Any]:
    arg = json.dumps([installed_hook(), VMID, vmtype, mode, setup.env])
    p = subprocess.run([sys.executable, "-c", _NODE_DIES_AFTER_PRE_STOP, arg], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    phases: list[Any] = json.loads(p.stdout.splitlines()[-1])
    assert [(ph, rc) for ph, rc, _ in phases] == [("job-init", 0), ("job-start", 0), ("backup-start", 0),
                                                  ("pre-stop", 0)], phases
    return phases


def write_guest_conf(guest: TestGuest, setup: HookSetup, grace: int = 0) -> Path:
    conf = guest.workdir / "guest.conf"
    conf.write_text(f"VMID={VMID}\nMARKER={setup.marker_path(VMID)}\nDEADLINE_GRACE={grace}\nWAIT_DOCKER=30\n")
    return conf


def recover_in_guest(guest: TestGuest, conf: Path, shell: str = "dash", booted_seconds_ago: float | None = None,
                     ) -> subprocess.CompletedProcess[str]:
    """The guest's recovery program, in the guest's network namespace; with booted_seconds_ago, in a
    time namespace whose boot was that long ago (as after a reboot)."""
    argv = [*SHELLS[shell], str(RECOVER), "--conf", str(conf)]
    if booted_seconds_ago is not None:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        argv = ["unshare", "--time", f"--boottime={-int(uptime - booted_seconds_ago)}", *argv]
    return guest.run(argv, timeout=180)


def stacks(compose_project: Any, version: str) -> tuple[compose.ComposeProject, ...]:
    db = compose_project("db", {"app": "sleeper", "worker": "sleeper"}, compose=version)
    web = compose_project("web", {"app": "sleeper"}, compose=version)
    other = compose_project("other", {"app": "sleeper"}, compose=version)  # running, not configured
    idle = compose_project("idle", {"app": "sleeper"}, compose=version)  # stopped before the backup
    for p in (db, web, other, idle):
        compose.up(p)
    compose.stop(idle)
    return db, web, other, idle


@pytest.mark.parametrize("shell,version", [("dash", "v2"), ("busybox", "v1")])
def test_deadline_recovery_when_the_node_never_comes_back(shell: str, version: str, setup: HookSetup,
                                                          test_guest: TestGuest, compose_project: Any) -> None:
    db, web, other, idle = stacks(compose_project, version)
    cmd = "docker compose" if version == "v2" else "docker-compose"
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name, idle.name], "max_downtime": 10,
                                     "compose_command": cmd})})
    node_dies_after_pre_stop(setup)
    marker = setup.marker_path(VMID)
    assert marker.exists()
    assert running([db, web, other, idle]) == {db.name: False, web.name: False, other.name: True, idle.name: False}
    conf = write_guest_conf(test_guest, setup)

    # before the deadline the guest leaves the node's work alone
    p = recover_in_guest(test_guest, conf, shell)
    assert p.returncode == 0 and "the node is at work, nothing to do" in p.stdout, p.stdout + p.stderr
    assert running([db, web]) == {db.name: False, web.name: False} and marker.exists()

    deadline = json.loads(marker.read_text())["deadline"]
    time.sleep(max(0.0, deadline - time.time()) + 1.1)
    p = recover_in_guest(test_guest, conf, shell)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "deadline passed" in p.stdout and f"started {web.name}, {db.name}; marker removed" in p.stdout
    assert running([db, web, other, idle]) == {db.name: True, web.name: True, other.name: True, idle.name: False}
    assert not marker.exists()

    # the node comes back later: nothing left to do, nothing fails
    r = subprocess.run([installed_hook(), "recover", "--all"], env=setup.env | {"PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no marker, nothing to do" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_boot_recovery_when_node_and_guest_died_mid_backup(shell: str, setup: HookSetup, test_guest: TestGuest,
                                                           compose_project: Any) -> None:
    db, web, other, idle = stacks(compose_project, "v2")
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name], "max_downtime": 3600})})
    node_dies_after_pre_stop(setup)
    test_guest.stop_sshd()  # the guest goes down too
    marker = setup.marker_path(VMID)
    conf = write_guest_conf(test_guest, setup, grace=60)
    # (control) in the boot the marker was written in, with its deadline an hour away: nothing
    p = recover_in_guest(test_guest, conf, shell)
    assert p.returncode == 0 and "nothing to do" in p.stdout and marker.exists()
    # the guest boots again (a reboot takes a while): the boot-time run of the recovery starts the stacks
    time.sleep(max(0.0, marker.stat().st_mtime + 3 - time.time()))
    p = recover_in_guest(test_guest, conf, shell, booted_seconds_ago=1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "written before this boot" in p.stdout
    assert running([db, web, other]) == {db.name: True, web.name: True, other.name: True}
    assert not marker.exists()


def test_restored_backup_comes_up_with_its_stacks_running(setup: HookSetup, test_guest: TestGuest,
                                                          compose_project: Any) -> None:
    db, web, other, idle = stacks(compose_project, "v2")
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name]})})
    marker = setup.marker_path(VMID)
    captured: dict[str, Any] = {}

    def point_in_time(ctx: Context) -> None:  # what the backup captures: the stopped stacks and the marker
        captured["data"] = marker.read_bytes()
        captured["mtime"] = marker.stat().st_mtime
        captured["mode"] = marker.stat().st_mode & 0o777
        captured["running"] = running([db, web, other])

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)], extra_env=setup.env,
                     on_point_in_time=point_in_time, timeout=120)
    assert result.status is JobStatus.OK, result.task_log()
    assert captured["running"] == {db.name: False, web.name: False, other.name: True}
    assert not marker.exists() and all(running([db, web, other]).values())

    # restore: the guest's disk is the one captured, stacks stopped and the marker in place, days old
    compose.stop(db)
    compose.stop(web)
    marker.write_bytes(captured["data"])
    marker.chmod(captured["mode"])
    os.utime(marker, (captured["mtime"], captured["mtime"]))
    conf = write_guest_conf(test_guest, setup)
    time.sleep(max(0.0, captured["mtime"] + 3 - time.time()))  # the restored guest boots later than the backup ran
    p = recover_in_guest(test_guest, conf, "dash", booted_seconds_ago=1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "written before this boot" in p.stdout, p.stdout
    assert running([db, web, other]) == {db.name: True, web.name: True, other.name: True}, p.stdout
    assert not marker.exists()
    assert json.loads(captured["data"])["state"] in ("stopping", "stopped")


def test_guest_recovery_and_a_late_node_do_not_fight(setup: HookSetup, test_guest: TestGuest,
                                                     compose_project: Any) -> None:
    # the node is slow, not dead: the guest starts the stacks at the deadline; the hook's later phases
    # find no marker, start what they recorded (already running) and the job ends fine
    db, web, other, idle = stacks(compose_project, "v2")
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name], "max_downtime": 10})})
    hook = installed_hook()
    g = GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)
    recs = [run_phase(hook, "job-start", None, extra_env=setup.env)]
    recs += [run_phase(hook, ph, g, extra_env=setup.env) for ph in ("backup-start", "pre-stop")]
    assert running([db, web]) == {db.name: False, web.name: False}
    conf = write_guest_conf(test_guest, setup)
    assert wait_until(lambda: (recover_in_guest(test_guest, conf).returncode == 0
                               and not setup.marker_path(VMID).exists()), 30, step=1)
    assert running([db, web]) == {db.name: True, web.name: True}
    recs += [run_phase(hook, ph, g, extra_env=setup.env)
             for ph in ("pre-restart", "post-restart", "backup-end", "log-end")]
    recs.append(run_phase(hook, "job-end", None, extra_env=setup.env))
    out = "\n".join(line for r in recs for line in r.lines)
    assert all(r.returncode == 0 for r in recs), out
    assert all(running([db, web, other]).values())
    assert f"{VMID}" in out and "STILL DOWN" not in out


def test_node_boot_unit_resumes_markers_of_a_job_that_died_with_the_node(setup: HookSetup, test_guest: TestGuest,
                                                                        compose_project: Any) -> None:
    db, web, other, idle = stacks(compose_project, "v2")
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name], "max_downtime": 3600})})
    node_dies_after_pre_stop(setup)
    assert setup.marker_path(VMID).exists() and running([db]) == {db.name: False}
    # what the node's boot unit runs (its ExecStart, with this checkout's installed hook)
    exec_start = next(line.split("=", 1)[1] for line in NODE_UNIT.read_text().splitlines()
                      if line.startswith("ExecStart="))
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/local/bin/vzdump-hook"
    r = subprocess.run([installed_hook(), *argv[1:]], env=setup.env | {"PATH": "/usr/bin:/bin"}, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{VMID}: marker of job" in r.stdout and "(its job is over): started" in r.stdout
    assert running([db, web, other]) == {db.name: True, web.name: True, other.name: True}
    assert not setup.marker_path(VMID).exists()


def test_installed_over_pct_the_container_recovers_by_itself(tmp_path: Path, compose_project: Any) -> None:
    # an LXC container reached with `pct exec` (tests/infra/pct_standin.py: its own mount namespace and
    # /var/lib): `guest install` deploys over pct (no key to restrict), the node dies after pre-stop,
    # the container boots again and its installed recovery program brings the stack back
    from tests.infra.pct_standin import NsContainer, make_pct

    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    ct = NsContainer(VMID, tmp_path / "ct")
    try:
        setup = HookSetup(tmp_path)
        setup.config.write_text(f'[guests.{VMID}]\ntransport = "pct"\n'
                                f'pct = {{ path = "{make_pct(tmp_path / "ct")}" }}\n'
                                f'stacks = ["{db.name}"]\nstop_timeout = 5\n')
        root = "/var/lib/vzdh-guest-root"  # inside the container; on the host: ct.var_lib / "vzdh-guest-root"
        env = setup.env | {"PATH": "/usr/bin:/bin", "VZDUMP_HOOK_GUEST_ROOT": root}
        r = subprocess.run([installed_hook(), "guest", "install", str(VMID)], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no SSH key" in r.stdout and "5 change(s)" in r.stdout
        installed = ct.var_lib / "vzdh-guest-root"
        assert (installed / "usr/local/sbin/vzdump-hook-recover").read_bytes() == RECOVER.read_bytes()
        r = subprocess.run([installed_hook(), "guest", "install", str(VMID)], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "0 change(s)" in r.stdout, r.stdout + r.stderr
        r = subprocess.run([installed_hook(), "check", str(VMID)], env=env, capture_output=True, text=True, timeout=120)
        assert "guest side: recovery current; no SSH key to restrict (transport pct)" in r.stdout, r.stdout + r.stderr

        node_dies_after_pre_stop(setup, "lxc", "snapshot")
        marker = ct.var_lib / "vzdump-hook" / "marker.json"
        assert marker.exists() and compose.running_services(db) == set()
        ct.stop()
        time.sleep(max(0.0, marker.stat().st_mtime + 3 - time.time()))
        ct.start()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        p = ct.run(["unshare", "--time", f"--boottime={-int(uptime - 1)}", f"{root}/usr/local/sbin/vzdump-hook-recover",
                    "--conf", f"{root}/etc/vzdump-hook/guest.conf"], timeout=120)
        out = (p.stdout + p.stderr).decode()
        assert p.returncode == 0 and "written before this boot" in out, out
        assert compose.running_services(db) == {"app"} and not marker.exists()
    finally:
        ct.close()
