"""The ledger of outstanding markers with the installed hook run as vzdump runs it (the stand-in) against
the real test guest, which answers for several VMIDs, each with its own marker path."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.vzdump import GuestSpec, GuestType, Mode, run_job, run_phase
from tests.integration.hookenv import HookSetup, installed_hook
from vzdump_hook.node.job import node_name

pytestmark = pytest.mark.integration
VMIDS = range(101, 107)
APP = 104  # the guest whose backup the node "crashes" in


def admin(setup: HookSetup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([installed_hook(), *args], env=setup.env | {"PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


def vzdump_env(setup: HookSetup, vmtype: str = "lxc") -> dict[str, str]:
    return {"STOREID": "local", "DUMPDIR": "/var/lib/vz/dump", "VMTYPE": vmtype, "LOGFILE": "/dev/null"} | setup.env


def crash_after_pre_stop(setup: HookSetup, vmid: int) -> subprocess.CompletedProcess[str]:
    """backup-start and pre-stop of `vmid` in a job whose worker (a shell) then goes away, as a
    node that crashed before the resume leaves it."""
    script = '"$0" backup-start snapshot "$1" && "$0" pre-stop snapshot "$1"; exit 0'
    return subprocess.run(["/bin/sh", "-c", script, installed_hook(), str(vmid)], env=vzdump_env(setup),
                          capture_output=True, text=True, timeout=120)


def ledger_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.json") if not p.name.startswith("known-")) if d.is_dir() else []


@pytest.fixture
def many(tmp_path: Path, test_guest: Any,
         compose_project: Any) -> tuple[HookSetup, compose.ComposeProject, compose.ComposeProject]:
    """Six guests on the one test guest; 101 and 104 each run a stack. This is a PVE node (a
    directory playing /etc/pve): the guests live here and run (QEMU pid files of a live process)."""
    web = compose_project("web", {"app": "sleeper"})
    app = compose_project("app", {"app": "sleeper"})
    for p in (web, app):
        compose.up(p)
    pve, qmp = tmp_path / "pve", tmp_path / "qmp"
    for v in VMIDS:
        conf = pve / "nodes" / node_name() / "qemu-server" / f"{v}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("")
        qmp.mkdir(exist_ok=True)
        (qmp / f"{v}.pid").write_text(f"{os.getpid()}\n")
    setup = HookSetup(tmp_path)
    # a node crash takes the residents down with the worker: the ledger is what is left
    setup.hook_table = {"pve_dir": str(pve), "qmp_dir": str(qmp), "resident": False}
    stacks = {101: [web.name], APP: [app.name]}
    setup.write({v: (test_guest, {"marker_path": str(tmp_path / "markers" / f"{v}.json"),
                                  "stacks": stacks.get(v, ["none"]), "compose_command": "docker compose",
                                  "stop_timeout": 10, "ssh": {"connect_timeout": 3}}) for v in VMIDS})
    return setup, web, app


def ledger_dir(setup: HookSetup) -> Path:
    return setup.tmp / "pve" / "priv" / "vzdump-hook" / "ledger"


def job_start_line(log: str) -> str:
    return [line for line in log.splitlines() if "job-start:" in line][-1]


def test_a_crashed_jobs_marker_is_found_through_the_ledger_alone(many: Any) -> None:
    setup, web, app = many
    first = run_phase(installed_hook(), "job-start", extra_env=setup.env)
    assert first.returncode == 0
    assert "6 guest(s) checked for leftover markers" in "\n".join(first.lines)  # upgrade: every guest once
    again = run_phase(installed_hook(), "job-start", extra_env=setup.env)
    assert "none asked" in job_start_line("\n".join(again.lines)), again.lines

    crash = crash_after_pre_stop(setup, APP)
    assert f"pre-stop {APP}: stopped {app.name}" in crash.stdout, crash.stdout + crash.stderr
    assert compose.running_services(app) == set() and setup.marker_path(APP).exists()
    (entry,) = ledger_files(ledger_dir(setup))  # on the cluster file system
    assert entry.startswith(f"{APP}.")
    assert json.loads((ledger_dir(setup) / entry).read_text())["kind"] == "quiesce"

    result = run_job(installed_hook(), [GuestSpec(101, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env)
    log = result.task_log()
    assert result.ok, log
    assert f"job-start {APP}: marker of job" in log and f"(its job is over): started {app.name}" in log, log
    assert "1 guest(s) checked for leftover markers" in job_start_line(log), log
    assert compose.running_services(app) == {"app"} and compose.running_services(web) == {"app"}
    assert not setup.marker_path(APP).exists() and ledger_files(ledger_dir(setup)) == []


def test_unreachable_and_stopped_guests_keep_their_entries(many: Any, test_guest: Any) -> None:
    setup, web, app = many
    assert run_phase(installed_hook(), "job-start", extra_env=setup.env).returncode == 0
    crash_after_pre_stop(setup, APP)
    crash_after_pre_stop(setup, 101)
    assert len(ledger_files(ledger_dir(setup))) == 2
    (setup.tmp / "qmp" / f"{APP}.pid").unlink()  # PVE says 104 is not running
    test_guest.cut_off()
    try:
        rec = run_phase(installed_hook(), "job-start", extra_env=setup.env)
    finally:
        test_guest.restore()
    log = "\n".join(rec.lines)
    assert rec.returncode == 0
    assert (f"job-start {APP}: not running (PVE), not asked: a marker in it waits for the guest-side recovery at boot"
            in log), log
    assert "job-start 101: not reachable" in log and "1 guest(s) checked" in job_start_line(log), log
    assert len(ledger_files(ledger_dir(setup))) == 2  # both still to be asked
    # reachable again, 104 running again: both resumed, ledger empty
    (setup.tmp / "qmp" / f"{APP}.pid").write_text(f"{os.getpid()}\n")
    rec = run_phase(installed_hook(), "job-start", extra_env=setup.env)
    assert "2 guest(s) checked" in job_start_line("\n".join(rec.lines)), rec.lines
    assert compose.running_services(app) == {"app"} and compose.running_services(web) == {"app"}
    assert ledger_files(ledger_dir(setup)) == []


def test_status_shows_the_ledger_and_flags_disagreement(many: Any) -> None:
    setup, web, app = many
    assert run_phase(installed_hook(), "job-start", extra_env=setup.env).returncode == 0
    r = admin(setup, "status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ledger {ledger_dir(setup)}: no outstanding marker" in r.stdout
    assert "101: no marker; ledger: no entry\n" in r.stdout
    crash_after_pre_stop(setup, APP)
    # a marker the ledger does not know of (not written by this hook: copied in, a restore, ...)
    setup.marker_path(102).write_bytes(setup.marker_path(APP).read_bytes().replace(f'"vmid": {APP},'.encode(),
                                                                                   b'"vmid": 102,'))
    # an entry without a marker: the guest recovered itself
    setup.marker_path(APP).rename(setup.tmp / "away.json")
    r = admin(setup, "status")
    lines = {line.split(":", 1)[0]: line for line in r.stdout.splitlines()}
    assert r.returncode == 1, r.stdout  # 102's marker is of a job that is over
    assert ("MARKER of job" in lines["102"]
            and "ledger: no entry: DISAGREES, job-start would not ask this guest" in lines["102"]), r.stdout
    assert (lines[str(APP)].startswith(f"{APP}: no marker; ledger: quiesce by job")
            and "DISAGREES, no marker" in lines[str(APP)]), r.stdout
    n = admin(setup, "status", "--no-connect")
    assert (f"{APP}: ledger: quiesce by job" in n.stdout
            and not any(line.startswith("102:") for line in n.stdout.splitlines())), n.stdout


def run_on_terminal(setup: HookSetup, *args: str) -> str:
    """Run an admin command with its stdout on a pseudo-terminal; everything it wrote there."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([installed_hook(), *args], env=setup.env | {"PATH": "/usr/bin:/bin"}, stdout=follower,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    os.close(leader)
    return out.decode()


@pytest.mark.parametrize("command", ["check", "status"])
def test_progress_is_shown_on_a_terminal_only(many: Any, command: str) -> None:
    setup, _, _ = many
    shown = run_on_terminal(setup, command)
    assert "\rcontacting 6 guests: 6/6 answered" in shown, shown
    assert "\rcontacting 6 guests: 1/6 answered" in shown, shown
    piped = admin(setup, command)
    assert "contacting" not in piped.stdout and "\r" not in piped.stdout, piped.stdout
