"""The resident (vzdump_hook/resident/process.py) against the real test guest (sshd in a network namespace,
a compose stack), with the installed hook run by the vzdump stand-in (one worker process per job).

The fault matrix: the vzdump worker SIGKILLed after every phase from pre-stop on, the resident
SIGKILLed, the hook process SIGKILLed in the middle of a phase, the run directory wiped mid-job, the
guest cut off during the resume and healed. Invariant every time: every stack that ran runs
afterwards, the stack that was stopped before the job stays stopped, each phase ends within its
bound, and no process of the hook is left once the stacks run again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.guest import TestGuest
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, Moment, WorkerKilled, run_job, run_phase
from tests.integration.hookenv import HookSetup, installed_hook, wait_until
from vzdump_hook.resident import control as resident
from vzdump_hook.vzdump.phases import backup_order

VMID = 101
PHASE_BOUND = 20 + 15  # phase_timeout below plus the watchdog's grace
COMBOS = [(t, m) for t in ("lxc", "qemu") for m in ("snapshot", "suspend", "stop")]


def _after_pre_stop(vmtype: str, mode: str) -> list[str]:
    """The guest's phases from pre-stop to backup-end, in vzdump's order (phases.backup_order)."""
    order = [p for p in backup_order(GuestType(vmtype), Mode(mode)) if not p.startswith("[")]
    return order[order.index("pre-stop") : order.index("log-end")]


KILL_CASES = [(t, m, p) for t, m in COMBOS for p in _after_pre_stop(t, m)]


class Guest:
    """The test guest with one running stack (`app`) and one configured stack stopped before the job
    (`off`: nothing may start it)."""

    def __init__(self, tmp: Path, test_guest: TestGuest, compose_project: Any, **guest: Any) -> None:
        self.app = compose_project("app", {"app": "sleeper"})
        self.off = compose_project("off", {"app": "sleeper"})
        compose.up(self.app)
        compose.up(self.off)
        compose.stop(self.off)
        self.setup = HookSetup(tmp)
        self.setup.hook_table = {"phase_timeout": 20}
        self.test_guest = test_guest
        self.setup.write({VMID: (test_guest, {"stacks": [self.app.name, self.off.name], "resume_wait": 5,
                                              "command_timeout": 5, **guest})})

    @property
    def run_dir(self) -> str:
        return self.setup.env["VZDUMP_HOOK_RUN_DIR"]

    def up(self) -> bool:
        return compose.running_services(self.app) == {"app"}

    def residents(self) -> list[resident.Info]:
        return [info for _, info in resident.residents(self.run_dir)]

    def check_invariant(self, log: str) -> None:
        assert wait_until(self.up, 15), log
        assert compose.running_services(self.off) == set(), "a stack stopped before the job was started"
        assert wait_until(lambda: not self.residents(), 5), f"residents left: {self.residents()}"
        assert not self.setup.marker_path(VMID).exists(), log


@pytest.fixture
def guest(tmp_path: Path, test_guest: TestGuest, compose_project: Any) -> Guest:
    return Guest(tmp_path, test_guest, compose_project)


def _phase_bounds(result: Any) -> None:
    for r in result.records:
        assert r.duration < PHASE_BOUND, (r.phase, r.duration)


# -- the vzdump worker dies ---------------------------------------------------------------------


@pytest.mark.parametrize(("vmtype", "mode", "after"), KILL_CASES, ids=[f"{t}-{m}-after-{p}" for t, m, p in KILL_CASES])
def test_worker_killed_after_a_phase_stacks_run_again_within_5_s(guest: Guest, vmtype: str, mode: str,
                                                                 after: str) -> None:
    killed: dict[str, float] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == after and ctx.moment is Moment.AFTER_PHASE and ctx.vmid == VMID:
            killed["at"] = time.monotonic()
            killed["down"] = not guest.up()
            raise WorkerKilled

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType(vmtype), Mode(mode))], extra_env=guest.setup.env,
                     on_phase=on_phase, timeout=60)
    log = result.task_log()
    assert result.status is JobStatus.KILLED, log
    assert "at" in killed, log
    assert wait_until(guest.up, 10), log
    if killed["down"]:  # nothing ran after the kill: no phase, no next job, no admin command
        # + the poll step
        assert time.monotonic() - killed["at"] <= 5.0 + 0.5, "stacks back later than 5 s after the worker died"
    _phase_bounds(result)
    guest.check_invariant(log)


# -- the resident dies, or its run directory goes ---------------------------------------------


@pytest.mark.parametrize(("vmtype", "mode"), COMBOS, ids=[f"{t}-{m}" for t, m in COMBOS])
def test_resident_killed_while_waiting_the_phases_resume(guest: Guest, vmtype: str, mode: str) -> None:
    seen: dict[str, Any] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            infos = guest.residents()
            seen["residents"] = len(infos)
            for info in infos:
                os.kill(info.pid, signal.SIGKILL)
            seen["gone"] = wait_until(lambda: not guest.residents(), 5)

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType(vmtype), Mode(mode))], extra_env=guest.setup.env,
                     on_phase=on_phase, timeout=60)
    log = result.task_log()
    assert seen == {"residents": 1, "gone": True}, log
    assert result.status is JobStatus.OK and all(r.returncode == 0 for r in result.records), log
    assert f"{VMID}: started {guest.app.name}" in log, log  # a phase did it
    _phase_bounds(result)
    guest.check_invariant(log)


def test_resident_killed_while_retrying_job_end_says_still_down_and_recover_fixes(guest: Guest) -> None:
    """The guest drops out before the resume point; the resident retries; it is SIGKILLed: the
    phases and job-end behave as without one (job-end fails, `recover` fixes)."""

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-restart" and ctx.moment is Moment.BEFORE_PHASE:
            guest.test_guest.stop_sshd()
        if phase == "backup-end" and ctx.moment is Moment.BEFORE_PHASE:
            for info in guest.residents():
                os.kill(info.pid, signal.SIGKILL)

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=guest.setup.env,
                     on_phase=on_phase, timeout=90)
    log = result.task_log()
    assert result.status is JobStatus.FAILED and "STILL DOWN" in log, log  # job-end exit 1
    assert "its resident keeps trying" not in log, log
    assert guest.setup.marker_path(VMID).exists() and not guest.up()
    guest.test_guest.start_sshd()
    r = subprocess.run([installed_hook(), "recover", str(VMID)], env=guest.setup.env | {"PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and guest.app.name in r.stdout, r.stdout + r.stderr
    guest.check_invariant(log)


@pytest.mark.parametrize(("vmtype", "mode"), [("lxc", "snapshot"), ("qemu", "stop")])
def test_run_dir_wiped_mid_job_the_resident_still_resumes(guest: Guest, vmtype: str, mode: str) -> None:
    up_after: dict[str, bool] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            shutil.rmtree(guest.run_dir)
        if ctx.moment is Moment.AFTER_PHASE and ctx.vmid == VMID and phase:
            up_after[phase] = guest.up()

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType(vmtype), Mode(mode))], extra_env=guest.setup.env,
                     on_phase=on_phase, timeout=60)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    first = "pre-restart" if vmtype == "lxc" else "backup-end"  # qemu without QMP: backup-end
    assert up_after[first] and not up_after["pre-stop"], (up_after, log)
    assert "listening again" in log or "socket is gone" in log, log
    guest.check_invariant(log)


MID_PHASE = [("pre-stop", True), ("pre-stop", False), ("pre-restart", False), ("pre-restart", True)]


@pytest.mark.parametrize(("phase", "with_resident"), MID_PHASE,
                         ids=[f"{p}-{'resident' if r else 'phases-alone'}" for p, r in MID_PHASE])
def test_hook_killed_in_the_middle_of_a_phase_nothing_stays_down(guest: Guest, tmp_path: Path,
                                                                 phase: str, with_resident: bool) -> None:
    """LXC snapshot; the hook process is SIGKILLed in the middle of `phase`: pre-stop once the marker
    is in the guest (the stop under way; vzdump then fails the guest's backup), pre-restart once the
    stack runs again (before the marker is removed and the record written). The resident, or the
    later phases, start what the marker lists; nothing is started twice or left down."""
    guest.setup.hook_table["resident"] = with_resident
    guest.setup.write({VMID: (guest.test_guest, {"stacks": [guest.app.name, guest.off.name], "resume_wait": 5,
                                                 "command_timeout": 5})})
    marker = guest.setup.marker_path(VMID)
    if phase == "pre-stop":
        middle = f"[ ! -e {marker} ]"
    else:
        middle = (f'[ -z "$(docker ps -q --filter label=com.docker.compose.project={guest.app.name} '
                  f'--filter status=running)" ]')
    wrapper = tmp_path / "kill-mid-phase"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = {phase} ] || exec {installed_hook()} "$@"\n'
        f'VZDUMP_HOOK_LAUNCHER=$PPID {installed_hook()} "$@" & pid=$!  # the worker stays the job\n'
        f"while kill -0 $pid 2>/dev/null && {middle}; do sleep 0.01; done\n"
        "kill -KILL $pid; exit 137\n"
    )
    wrapper.chmod(0o755)
    result = run_job(str(wrapper), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=guest.setup.env, timeout=60)
    log = result.task_log()
    killed = next(r for r in result.records if r.phase == phase)
    assert killed.returncode == 137, log
    _phase_bounds(result)
    guest.check_invariant(log)


# -- the guest drops out during the resume --------------------------------------------------------


@pytest.mark.parametrize(("vmtype", "mode"), [("lxc", "snapshot"), ("qemu", "snapshot")])
def test_guest_cut_off_during_the_resume_back_within_10_s_of_healing(guest: Guest, vmtype: str, mode: str) -> None:
    resume_at = "pre-restart" if vmtype == "lxc" else "backup-end"

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == resume_at and ctx.moment is Moment.BEFORE_PHASE:
            guest.test_guest.cut_off()  # the held session too: connects and commands time out

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType(vmtype), Mode(mode))], extra_env=guest.setup.env,
                     on_phase=on_phase, timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.FAILED and "STILL DOWN" in log, log  # job-end says so
    assert f"job-end {VMID}: its resident keeps trying" in log, log
    assert not guest.up() and guest.setup.marker_path(VMID).exists()
    assert [i.vmid for i in guest.residents()] == [VMID]
    _phase_bounds(result)
    guest.test_guest.restore()
    healed = time.monotonic()
    assert wait_until(guest.up, 20), log
    assert time.monotonic() - healed <= 10.0
    guest.check_invariant(log)


# -- what the admin sees --------------------------------------------------------------------------


def test_status_lists_the_live_resident_and_none_is_left_after_the_resume(guest: Guest) -> None:
    spec = GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)
    for phase in ("job-start", "backup-start", "pre-stop"):
        r = run_phase(installed_hook(), phase, None if phase.startswith("job") else spec, extra_env=guest.setup.env)
        assert r.returncode == 0, r.lines
    assert not guest.up()
    (info,) = guest.residents()
    st = subprocess.run([installed_hook(), "status", "--no-connect"], env=guest.setup.env | {"PATH": "/usr/bin:/bin"},
                        capture_output=True, text=True, timeout=30)
    line = next((ln for ln in st.stdout.splitlines() if ln.strip().startswith(f"resident {VMID} ")), "")
    assert (f"(pid {info.pid}, job " in line and ": waiting, stacks " in line
            and guest.app.name in line and "gives up at " in line), st.stdout
    for phase in ("pre-restart", "post-restart", "backup-end"):
        r = run_phase(installed_hook(), phase, spec, extra_env=guest.setup.env)
        assert r.returncode == 0, r.lines
    # the resident's line, shown by the phase
    assert any(f"backup-end {VMID}: started {guest.app.name}" in ln for ln in r.lines), r.lines
    guest.check_invariant("\n".join(r.lines))
