"""The installed `vzdump-hook`, run exactly as vzdump runs it (tests/infra/vzdump.py: emptied
environment plus vzdump's variables, one process per phase, vzdump's order and exit-code rules),
against a real guest: OpenSSH sshd in its own network namespace, a real Docker engine, real compose
projects (v1 and v2). At every phase boundary the test looks at which stacks run."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.vzdump import Context, FailPoint, GuestSpec, GuestType, JobStatus, Mode, Moment, run_job
from tests.integration.hookenv import HookSetup, installed_hook, running, wait_until

pytestmark = pytest.mark.integration

VMID = 101
# Where the stacks must be running again, per docs/design.md (derived here independently of the package):
# LXC: post-restart (pre-restart may still see the CT frozen); LXC stop: post-restart, after the CT is
# started; QEMU: backup-end (the backup job, the point in time, starts after post-restart).
RESUME_AT = {
    ("lxc", "snapshot"): "pre-restart",  # the CT is thawed by snapshot_create (pve-guest-common)
    ("lxc", "suspend"): "post-restart",
    ("lxc", "stop"): "post-restart",
    ("qemu", "snapshot"): "backup-end",
    ("qemu", "suspend"): "backup-end",
    ("qemu", "stop"): "backup-end",
}
COMBOS = sorted(RESUME_AT)


@pytest.fixture
def setup(tmp_path: Path) -> HookSetup:
    return HookSetup(tmp_path)


@pytest.fixture
def hook() -> str:
    return installed_hook()


class Watch:
    """Records, after each phase and at the point in time, which projects run and whether the marker exists."""

    def __init__(self, setup: HookSetup, projects: list[compose.ComposeProject]) -> None:
        self.setup = setup
        self.projects = projects
        self.after: list[tuple[str, dict[str, bool], bool]] = []
        self.at_pit: tuple[dict[str, bool], bool] | None = None

    def snapshot(self) -> tuple[dict[str, bool], bool]:
        return running(self.projects), self.setup.marker_path(VMID).exists()

    def on_phase(self, phase: str, ctx: Context) -> None:
        if ctx.moment is Moment.AFTER_PHASE:
            up, marker = self.snapshot()
            self.after.append((phase, up, marker))

    def on_point_in_time(self, ctx: Context) -> None:
        self.at_pit = self.snapshot()

    def up_after(self, phase: str) -> dict[str, bool]:
        return next(up for p, up, _ in self.after if p == phase)


def _running_projects() -> set[str]:
    import subprocess

    out = subprocess.run(["docker", "ps", "--filter", "label=com.docker.compose.project",
                          "--format", '{{.Label "com.docker.compose.project"}}'],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _stacks(compose_project: Any, version: str = "v2") -> list[compose.ComposeProject]:
    db = compose_project("db", {"app": "sleeper"}, compose=version)
    web = compose_project("web", {"app": "sleeper", "worker": "sleeper"}, compose=version)
    other = compose_project("other", {"app": "sleeper"}, compose=version)
    for p in (db, web, other):
        compose.up(p)
    return [db, web, other]


@pytest.mark.parametrize("vmtype,mode", COMBOS, ids=[f"{t}-{m}" for t, m in COMBOS])
def test_phase_order_stops_before_and_resumes_after_the_point_in_time(
    vmtype: str, mode: str, setup: HookSetup, hook: str, test_guest: Any, compose_project: Any
) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name], "stop_timeout": 5, "resume_wait": 30})})
    watch = Watch(setup, [db, web, other])

    def shutdown(ctx: Context) -> None:
        test_guest.stop_sshd()

    def start(ctx: Context) -> None:  # the guest boots: sshd answers after a while
        threading.Timer(1.5, test_guest.start_sshd).start()

    result = run_job(
        hook,
        [GuestSpec(VMID, GuestType(vmtype), Mode(mode), hostname="demo")],
        extra_env=setup.env,
        on_phase=watch.on_phase,
        on_point_in_time=watch.on_point_in_time,
        on_guest_shutdown=shutdown,
        on_guest_start=start,
        timeout=120,
    )
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert all(r.returncode == 0 for r in result.records), log
    # at the point in time: exactly the configured stacks are down, the marker is in the guest
    assert watch.at_pit == ({db.name: False, web.name: False, other.name: True}, True), log
    # down from pre-stop until the resume phase, up from there on
    phases = [p for p, _, _ in watch.after]
    resume_at = RESUME_AT[(vmtype, mode)]
    for phase, up, marker in watch.after:
        if phase.startswith("job-") or phase == "backup-start":
            assert all(up.values()), (phase, log)
            continue
        i, r = phases.index(phase), phases.index(resume_at)
        if i < r:
            assert up == {db.name: False, web.name: False, other.name: True} and marker, (phase, up, log)
        else:
            assert all(up.values()) and not marker, (phase, up, log)
    assert f"pre-stop {VMID}: stopped {db.name}, {web.name}" in log
    assert f"{resume_at} {VMID}: started {web.name}, {db.name}" in log  # reverse order
    # the job-end summary row: guest, stacks, seconds down, result
    assert re.search(rf"^INFO: vzdump-hook: {VMID} +{db.name},{web.name} +\d+\.\d +ok$", log, re.M), log


def test_snapshot_fallback_to_suspend_resumes_at_post_restart(setup: HookSetup, hook: str, test_guest: Any,
                                                              compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    watch = Watch(setup, [db])
    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT, snapshot_supported=False)],
                     extra_env=setup.env, on_phase=watch.on_phase, on_point_in_time=watch.on_point_in_time)
    assert result.status is JobStatus.OK
    assert all(r.argv[2] == "suspend" for r in result.records if len(r.argv) > 2)
    assert watch.at_pit == ({db.name: False}, True)
    assert watch.up_after("pre-restart") == {db.name: False}
    assert watch.up_after("post-restart") == {db.name: True}


@pytest.mark.engine_alone  # "auto": every compose project on the engine
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_compose_v1_and_v2_auto_selection(version: str, setup: HookSetup, hook: str, test_guest: Any,
                                          compose_project: Any) -> None:
    db, web, other = _stacks(compose_project, version)
    cmd = "docker-compose" if version == "v1" else "docker compose"
    # the test guest shares this machine's Docker engine: projects of other test runs (not of this one's other
    # tests: they wait for this one to end, engine_alone) are not ours
    ours = {db.name, web.name}
    foreign = sorted(_running_projects() - ours)
    setup.write({VMID: (test_guest, {"stacks": "auto", "exclude": foreign, "compose_command": cmd})})
    watch = Watch(setup, [db, web, other])
    result = run_job(hook, [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)], extra_env=setup.env,
                     on_phase=watch.on_phase, on_point_in_time=watch.on_point_in_time)
    assert result.status is JobStatus.OK, result.task_log()
    up, marker = watch.at_pit or ({}, False)
    assert marker and up[db.name] is False and up[web.name] is False and up[other.name] is True
    assert all(running([db, web, other]).values())


def test_guest_not_running_nothing_is_stopped(setup: HookSetup, hook: str, test_guest: Any,
                                              compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    test_guest.stop_sshd()  # the guest is off
    result = run_job(hook, [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT, running=False)], extra_env=setup.env,
                     timeout=60)
    assert result.status is JobStatus.OK
    assert [r.phase for r in result.records if r.vmid == VMID] == ["backup-start", "backup-end", "log-end"]
    assert all(r.returncode == 0 for r in result.records)
    assert all(running([db, web, other]).values())


def test_unconfigured_guest_one_line_nothing_else(setup: HookSetup, hook: str, test_guest: Any,
                                                  compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    result = run_job(hook, [GuestSpec(555, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env)
    lines = [ln.text for ln in result.log if ln.vmid == 555 and ln.phase is not None and "vzdump-hook" in ln.text]
    assert len(lines) == 1 and "555: not in" in lines[0], lines
    assert all(running([db, web, other]).values())
    assert not setup.marker_path(VMID).exists()


def test_failure_after_point_in_time_backup_abort_resumes(setup: HookSetup, hook: str, test_guest: Any,
                                                          compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name]})})
    watch = Watch(setup, [db, web])
    result = run_job(hook, [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT, fail_at=FailPoint.AFTER_POINT_IN_TIME)],
                     extra_env=setup.env, on_phase=watch.on_phase, on_point_in_time=watch.on_point_in_time)
    assert result.status is JobStatus.ERRORS
    assert "backup-end" not in [p for p, _, _ in watch.after]
    assert watch.up_after("backup-abort") == {db.name: True, web.name: True}
    assert not setup.marker_path(VMID).exists()
    job_end = [r for r in result.records if r.phase == "job-end"]
    assert job_end and job_end[0].returncode == 0


def test_stubborn_stack_killed_continue_policy_warns_crash_consistent(setup: HookSetup, hook: str, test_guest: Any,
                                                                      compose_project: Any) -> None:
    db = compose_project("db", {"app": "stubborn"})
    compose.up(db)
    setup.write({VMID: (test_guest, {"stacks": [db.name], "stop_timeout": 1})})
    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert "KILLED" in log and "crash-consistent" in log
    assert compose.running_services(db) == {"app"}


def test_stubborn_stack_abort_policy_fails_backup_and_restarts(setup: HookSetup, hook: str, test_guest: Any,
                                                               compose_project: Any) -> None:
    db = compose_project("db", {"app": "stubborn"})
    web = compose_project("web", {"app": "sleeper"})
    compose.up(db)
    compose.up(web)
    setup.write({VMID: (test_guest, {"stacks": [web.name, db.name], "stop_timeout": 1, "on_quiesce_error": "abort"})})
    watch = Watch(setup, [db, web])
    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     on_phase=watch.on_phase)
    pre_stop = next(r for r in result.records if r.phase == "pre-stop")
    assert pre_stop.returncode == 1
    assert result.guest(VMID).status.value == "failed"
    assert watch.up_after("pre-stop") == {db.name: True, web.name: True}  # started again before failing
    assert not setup.marker_path(VMID).exists()


def test_guest_cut_off_before_quiesce_is_bounded_and_leaves_nothing_down(setup: HookSetup, hook: str, test_guest: Any,
                                                                         compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.BEFORE_PHASE:
            test_guest.cut_off()
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            test_guest.restore()

    result = run_job(hook, [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)], extra_env=setup.env, on_phase=on_phase,
                     timeout=60)
    pre_stop = next(r for r in result.records if r.phase == "pre-stop")
    log = result.task_log()
    assert pre_stop.returncode == 0 and pre_stop.duration < 9, log  # one connect_timeout (5 s) + start-up
    assert "crash-consistent" in log and "timed out" in log
    assert result.status is JobStatus.OK
    assert all(running([db, web, other]).values())


def test_guest_cut_off_abort_policy_fails_backup_start(setup: HookSetup, hook: str, test_guest: Any,
                                                       compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name], "on_quiesce_error": "abort"})})
    test_guest.cut_off()
    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env, timeout=60)
    start = next(r for r in result.records if r.phase == "backup-start")
    assert start.returncode == 1 and start.duration < 12
    assert [r.phase for r in result.records if r.vmid == VMID] == ["backup-start", "backup-abort", "log-end"]
    assert all(running([db, web, other]).values())


def test_sshd_that_never_answers_is_bounded(setup: HookSetup, hook: str, test_guest: Any, compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    test_guest.freeze()
    try:
        result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env, timeout=60)
    finally:
        test_guest.thaw()
    start = next(r for r in result.records if r.phase == "backup-start")
    assert start.returncode == 0 and start.duration < 12
    assert "banner" in result.task_log().lower()
    assert all(running([db, web, other]).values())


def test_compose_stop_that_outlives_the_phase_deadline_is_bounded(setup: HookSetup, hook: str, test_guest: Any,
                                                                  compose_project: Any) -> None:
    db = compose_project("db", {"app": "stubborn"})
    compose.up(db)
    setup.hook_table = {"phase_timeout": 6}
    setup.write({VMID: (test_guest, {"stacks": [db.name], "stop_timeout": 60})})
    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env, timeout=90)
    pre_stop = next(r for r in result.records if r.phase == "pre-stop")
    log = result.task_log()
    assert pre_stop.duration < 6 + 16, log  # the deadline, plus the watchdog's grace at worst
    assert result.status is JobStatus.OK, log
    assert wait_until(lambda: compose.running_services(db) == {"app"}, 70), log


@pytest.mark.parametrize("resident", [False, True], ids=["phases-alone", "resident"])
def test_resume_fails_then_job_end_fails_and_recover_fixes(resident: bool, setup: HookSetup, hook: str, test_guest: Any,
                                                           compose_project: Any) -> None:
    """The guest drops out from backup-end on. Without a resident `recover` fixes it once it answers;
    with one, the resident does, within 10 s of the guest answering again, with no admin command."""
    db, web, other = _stacks(compose_project)
    setup.hook_table = {"resident": resident}
    setup.write({VMID: (test_guest, {"stacks": [db.name], "resume_wait": 2})})

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "backup-end" and ctx.moment is Moment.BEFORE_PHASE:
            test_guest.stop_sshd()  # the guest is unreachable for the rest of the job

    result = run_job(hook, [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)], extra_env=setup.env, on_phase=on_phase,
                     timeout=120)
    log = result.task_log()
    assert next(r for r in result.records if r.phase == "backup-end").returncode == 0
    job_end = next(r for r in result.records if r.phase == "job-end")
    assert job_end.returncode == 1 and "STILL DOWN" in log, log
    assert result.status is JobStatus.FAILED
    assert compose.running_services(db) == set()
    assert setup.marker_path(VMID).exists()  # nothing dropped
    if resident:
        assert f"job-end {VMID}: its resident keeps trying to start the stacks until " in log, log
        test_guest.start_sshd()
        answered = time.monotonic()
        assert wait_until(lambda: compose.running_services(db) == {"app"} and not setup.marker_path(VMID).exists(), 20)
        assert time.monotonic() - answered <= 10
        assert wait_until(lambda: not _residents(setup), 5), "the resident ends once the stacks run"
        return
    # the node side: `recover` once the guest answers. The job's vzdump worker ended with the job:
    # the marker's job is provably over, no --force needed
    test_guest.start_sshd()
    import subprocess

    rec = subprocess.run([hook, "recover", str(VMID)], env=setup.env | {"PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=60)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert "(its job is over): started" in rec.stdout and db.name in rec.stdout, rec.stdout
    assert compose.running_services(db) == {"app"}
    assert not setup.marker_path(VMID).exists()


def _dead_worker_job(hook: str, setup: HookSetup, *phases: str) -> str:
    """Run guest phases of a job whose vzdump worker then dies: the phases are children of a
    short-lived `sh` (the worker), with vzdump's emptied environment. Returns their output."""
    import shlex
    import subprocess

    env = {**setup.env, "VMTYPE": "qemu", "HOSTNAME": "demo", "STOREID": "local"}
    assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    script = "; ".join(f"env -i {assign} {shlex.quote(hook)} {p} snapshot {VMID}" for p in phases)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60).stdout


def _residents(setup: HookSetup) -> list[int]:
    """pids of the live residents of this test's run directory."""
    from vzdump_hook.resident import control as resident

    return [info.pid for _, info in resident.residents(setup.env["VZDUMP_HOOK_RUN_DIR"])]


def test_stale_marker_from_a_dead_job_is_resumed_at_job_start(setup: HookSetup, hook: str, test_guest: Any,
                                                              compose_project: Any) -> None:
    """Without a resident (`[hook] resident = false`): the next job's job-start resumes. (With one,
    the resident does it within seconds: tests/integration/test_resident.py.)"""
    db, web, other = _stacks(compose_project)
    setup.hook_table = {"resident": False}
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    out = _dead_worker_job(hook, setup, "backup-start", "pre-stop")
    assert compose.running_services(db) == set() and setup.marker_path(VMID).exists(), out
    second = run_job(hook, [], extra_env=setup.env)
    log = second.task_log()
    assert "its job is over" in log and db.name in log, log
    assert compose.running_services(db) == {"app"}
    assert not setup.marker_path(VMID).exists()


def test_marker_of_a_running_job_is_left_alone_by_the_sweep(setup: HookSetup, hook: str, test_guest: Any,
                                                            compose_project: Any) -> None:
    """Two jobs at once can only happen in a cluster sharing a config; here the other job's worker
    is this test process (alive), so its marker must not be touched by another job's sweep."""
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    from tests.infra.vzdump import run_phase

    spec = GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)
    start = run_phase(hook, "backup-start", spec, extra_env=setup.env)
    stop = run_phase(hook, "pre-stop", spec, extra_env=setup.env)
    assert (start.returncode, stop.returncode) == (0, 0)
    assert compose.running_services(db) == set(), start.lines + stop.lines
    # another job (another worker: a short-lived sh) starts while this one runs
    import shlex
    import subprocess

    assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in setup.env.items())
    out = subprocess.run(["sh", "-c", f"env -i {assign} {shlex.quote(hook)} job-start"], capture_output=True, text=True,
                         timeout=60).stdout
    assert "left alone" in out, out
    assert compose.running_services(db) == set() and setup.marker_path(VMID).exists()
    # this job goes on and resumes at backup-end
    assert run_phase(hook, "backup-end", spec, extra_env=setup.env).returncode == 0
    assert compose.running_services(db) == {"app"}


def test_time_in_task_log_lines(setup: HookSetup, hook: str, test_guest: Any, compose_project: Any) -> None:
    db, web, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name]})})
    t0 = time.monotonic()
    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env)
    assert time.monotonic() - t0 < 60
    lines = result.task_log().splitlines()
    assert all(line.startswith(("INFO: ", "WARN: ", "ERROR: ")) for line in lines)
    hook_lines = [ln for ln in lines if "vzdump-hook:" in ln]
    assert any("stopped" in ln and " in " in ln and ln.rstrip().endswith(" s") for ln in hook_lines), hook_lines
    table = [ln for ln in hook_lines if "down s" in ln]
    assert table, hook_lines


def test_one_job_several_guests_summary(setup: HookSetup, hook: str, guest_factory: Any, compose_project: Any) -> None:
    g1, g2 = guest_factory(), guest_factory()
    a = compose_project("a", {"app": "sleeper"})
    b = compose_project("b", {"app": "stubborn"})
    for p in (a, b):
        compose.up(p)
    setup.write({101: (g1, {"stacks": [a.name]}), 102: (g2, {"stacks": [b.name], "stop_timeout": 1})})
    guests = [GuestSpec(101, GuestType.LXC, Mode.SNAPSHOT), GuestSpec(102, GuestType.QEMU, Mode.SNAPSHOT),
              GuestSpec(103, GuestType.QEMU, Mode.STOP)]
    result = run_job(hook, guests, extra_env=setup.env)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    job_end = next(r for r in result.records if r.phase == "job-end")
    text = "\n".join(job_end.lines)
    assert "guest" in text and "down s" in text
    row101 = next(ln for ln in text.splitlines() if "101 " in ln and a.name in ln)
    row102 = next(ln for ln in text.splitlines() if "102 " in ln and b.name in ln)
    assert row101.rstrip().endswith("ok")
    assert "crash-consistent" in row102
    assert not any(re.match(r"\s*103\b", ln) for ln in text.splitlines()), text  # not configured: not in the table
    assert compose.running_services(a) == {"app"} and compose.running_services(b) == {"app"}
