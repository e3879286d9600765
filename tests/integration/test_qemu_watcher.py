"""QEMU early resume end to end: the installed hook, run exactly as vzdump runs it (tests/infra/vzdump.py),
against a test guest (sshd in a netns, real compose projects), with QEMU's QMP socket played by the
QMP double (tests/infra/qmp_double.py, `[hook] qmp_dir`). The stand-in's point in time is where
vzdump's QMP `backup` starts the job: the callback first copies what the backup captures, then starts
the job in the double.

Times come from docker itself (the containers' State.StartedAt / FinishedAt), not from polling.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.compose import ComposeProject
from tests.infra.guest import TestGuest
from tests.infra.qmp_double import QmpDouble
from tests.infra.vzdump import (
    BackupStatus,
    Context,
    FailPoint,
    GuestSpec,
    GuestType,
    JobResult,
    JobStatus,
    Mode,
    Moment,
    run_job,
)
from tests.integration.hookenv import HookSetup, installed_hook, wait_until
from tests.integration.test_consistency import (  # noqa: F401 - make_app and scratch are fixtures
    App,
    PointInTime,
    Run,
    assert_consistent,
    make_app,
    restore,
    scratch,
)

pytestmark = pytest.mark.integration

VMID = 101
TRANSFER = 8.0  # seconds of data transfer: the stacks must be back long before backup-end
RESUME_WITHIN = 1.0  # seconds from the job start to the containers running again (snapshot, suspend)
SLACK = 0.5  # for a loaded test machine
# one failed start that the resident tries again RETRY_FIRST (1 s) later still starts the stacks at the job
# start, long before backup-end (TRANSFER): seen once in a CI run, an ssh session lost under load
# ("connection lost while running a command", then "started ... in 0.6 s" a second later)
RETRY = 1.0
BOOT = 1.5  # stop mode: seconds until the restarted guest answers SSH


@pytest.fixture
def qmp_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vzdh-qmp-", dir="/tmp"))  # a unix socket path must be short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qmp(qmp_dir: Path) -> Iterator[QmpDouble]:
    with QmpDouble(qmp_dir / f"{VMID}.qmp", leftover=True) as q:  # QEMU ran a backup job before
        yield q


@pytest.fixture
def setup(tmp_path: Path, qmp_dir: Path) -> HookSetup:
    s = HookSetup(tmp_path)
    s.hook_table = {"qmp_dir": str(qmp_dir)}
    return s


@pytest.fixture
def hook() -> str:
    return installed_hook()


def _time(value: str) -> float:
    """docker's RFC 3339 time with nanoseconds -> epoch seconds."""
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + (float("0." + frac[:9]) if frac else 0.0)


def container_times(project: ComposeProject) -> dict[str, tuple[float, float]]:
    """service -> (last start, last stop) of its container, epoch seconds."""
    return {c["Config"]["Labels"][compose.LABEL_SERVICE]: (_time(c["State"]["StartedAt"]),
                                                           _time(c["State"]["FinishedAt"]))
            for c in compose._inspect(project)}


def watcher_processes(tag: str) -> list[int]:
    """Processes running the resident (which watches QEMU) with `tag` (this test's run directory) in their argv."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if "vzdump_hook.resident.process" in argv and tag in argv and state not in ("Z", "X"):
            found.append(int(pid))
    return found


@dataclass
class Job:
    """One played job: the result, the phase start times (wall clock), the job start in QEMU."""

    result: JobResult
    phase_at: dict[str, float] = field(default_factory=dict)  # wall clock before each phase of VMID
    job_started: float | None = None  # wall clock of the QMP job start
    pit_state: dict[str, bool] = field(default_factory=dict)  # project -> its services ran at the job start

    @property
    def log(self) -> str:
        return self.result.task_log()

    def record(self, phase: str) -> Any:
        return next(r for r in self.result.records if r.phase == phase and r.vmid == VMID)


def play(hook: str, setup: HookSetup, guest: TestGuest, qmp: QmpDouble, projects: list[ComposeProject], spec: GuestSpec,
         at_job_start: Callable[[Context], None] | None = None, start_job: bool = True,
         transfer: float = TRANSFER, access: bool = False) -> Job:
    """A vzdump job for `spec`. At the point in time: note which projects run, run `at_job_start`
    (a copy of the data), then start the job in the QMP double. Stop mode: vzdump's shutdown stops
    the guest's sshd and QEMU (the socket goes), the paused restart brings a new QEMU (socket back,
    no job), the guest answers SSH again BOOT seconds after the job start."""
    job = Job(result=None)  # type: ignore[arg-type]
    timers: list[threading.Timer] = []

    def on_phase(phase: str, ctx: Context) -> None:
        if ctx.moment is Moment.BEFORE_PHASE and ctx.vmid == VMID:
            job.phase_at.setdefault(phase, time.time())

    def on_pit(ctx: Context) -> None:
        job.pit_state = {p.name: compose.running_services(p) == set(p.services) for p in projects}
        if spec.mode is Mode.STOP:
            qmp.restore()  # vzdump started the VM paused: a new QEMU process
        if at_job_start is not None:
            at_job_start(ctx)
        if start_job:
            qmp.start_access() if access else qmp.start_job()  # access: an external provider's (PVE 8.4+)
            job.job_started = qmp.job_started_wall

    def shutdown(ctx: Context) -> None:
        guest.stop_sshd()
        qmp.remove()

    def boot(ctx: Context) -> None:
        t = threading.Timer(BOOT, guest.start_sshd)
        timers.append(t)
        t.start()

    try:
        job.result = run_job(hook, [spec], extra_env=setup.env, transfer_seconds=transfer, timeout=120,
                             on_phase=on_phase, on_point_in_time=on_pit, on_guest_shutdown=shutdown,
                             on_guest_start=boot)
    finally:
        for t in timers:
            t.join()
    return job


def _table(**extra: Any) -> dict[str, Any]:
    return {"ssh": {"connect_timeout": 3}, "stop_timeout": 10, "resume_wait": 30, **extra}


def _stacks(compose_project: Callable[..., ComposeProject]) -> tuple[ComposeProject, ComposeProject]:
    db = compose_project("db", {"app": "sleeper"})
    other = compose_project("other", {"app": "sleeper"})
    for p in (db, other):
        compose.up(p)
    return db, other


def _assert_no_watcher_left(setup: HookSetup) -> None:
    assert wait_until(lambda: not watcher_processes(str(setup.tmp)), 5), watcher_processes(str(setup.tmp))
    leftovers = [p.name for p in (setup.tmp / "run").rglob("qemu-*")]
    assert not leftovers, leftovers


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", [Mode.SNAPSHOT, Mode.SUSPEND, Mode.STOP], ids=lambda m: f"qemu-{m}")
def test_stacks_start_right_after_the_job_start_not_at_backup_end(
    mode: Mode, setup: HookSetup, hook: str, test_guest: TestGuest, qmp: QmpDouble,
    compose_project: Callable[..., ComposeProject],
) -> None:
    db, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, _table(stacks=[db.name]))})
    job = play(hook, setup, test_guest, qmp, [db, other], GuestSpec(VMID, GuestType.QEMU, mode))
    log = job.log
    assert job.result.status is JobStatus.OK, log
    assert all(r.returncode == 0 for r in job.result.records), log
    # at the job start the stack is down (the leftover job in QMP did not count), the other one untouched
    assert job.pit_state == {db.name: False, other.name: True}, log
    assert job.job_started is not None
    started, stopped = container_times(db)["app"]
    assert stopped < job.job_started < started, log
    took = started - job.job_started
    limit = (BOOT if mode is Mode.STOP else 0.0) + RESUME_WITHIN + SLACK + (RETRY if "trying again" in log else 0.0)
    assert took < limit, f"running again {took:.2f} s after the job start (limit {limit:.1f} s)\n{log}"
    assert started < job.phase_at["backup-end"] - TRANSFER / 2, log  # long before backup-end
    assert f"resident {VMID}: started {db.name} in " in log and f"backup-end {VMID}: started" not in log, log
    armed_at = "post-restart" if mode is Mode.SNAPSHOT else "pre-stop"
    assert f"{armed_at} {VMID}: watching {qmp.path}" in log, log
    # arming did not hold vzdump up: the phase ended at once (the watcher keeps no stdout/stderr open)
    assert job.record(armed_at).duration < 3, (job.record(armed_at).duration, log)
    # the watcher asked QMP one short connection at a time
    qmp.settle()
    assert qmp.watcher_clients() and all(c.duration < 0.5 for c in qmp.watcher_clients())
    assert not setup.marker_path(VMID).exists()
    assert compose.running_services(db) == {"app"}
    job_end = next(r for r in job.result.records if r.phase == "job-end")
    assert any(ln.rstrip().endswith("ok") and f"{VMID} " in ln for ln in job_end.lines), log
    _assert_no_watcher_left(setup)


def test_an_external_providers_access_counts_as_the_job_start(setup: HookSetup, hook: str, test_guest: TestGuest,
                                                              qmp: QmpDouble,
                                                              compose_project: Callable[..., ComposeProject]) -> None:
    """A storage with a backup provider plugin: qemu-server sets up the backup with `backup-access-setup`,
    and query-backup answers `active` with an empty uuid and no QEMU job. The stacks start right after
    it, not at backup-end (they stayed down for the whole transfer before)."""
    db, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, _table(stacks=[db.name]))})
    job = play(hook, setup, test_guest, qmp, [db, other], GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT), access=True)
    log = job.log
    assert job.result.status is JobStatus.OK, log
    assert job.pit_state == {db.name: False, other.name: True}, log
    assert job.job_started is not None
    started, stopped = container_times(db)["app"]
    assert stopped < job.job_started < started, log
    assert started < job.phase_at["backup-end"] - TRANSFER / 2, log  # long before backup-end
    assert f"resident {VMID}: started {db.name} in " in log and f"backup-end {VMID}: started" not in log, log
    _assert_no_watcher_left(setup)


def test_postgres_copy_taken_at_the_job_start_restores_clean(
    setup: HookSetup, hook: str, test_guest: TestGuest, qmp: QmpDouble, make_app: Callable[..., App], scratch: Path,  # noqa: F811
) -> None:
    app = make_app()
    setup.write({VMID: (test_guest, _table(stacks=[app.project.name], stop_timeout=20))})
    pit = PointInTime(app, scratch / "copy")  # the backup's content: PGDATA as it is at the job start
    job = play(hook, setup, test_guest, qmp, [app.project], GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT),
               at_job_start=pit)
    log = job.log
    assert job.result.status is JobStatus.OK, log
    assert f"resident {VMID}: started {app.project.name}" in log, log
    started, _ = container_times(app.project)["db"]
    retried = RETRY if "trying again" in log else 0.0
    assert job.job_started is not None and 0 < started - job.job_started < RESUME_WITHIN + SLACK + retried, log
    stop_began = job.record("pre-stop").start  # monotonic, as the writer's acknowledgements
    assert_consistent(Run(job.result, pit, stop_began), restore(scratch / "copy", scratch), app)
    _assert_no_watcher_left(setup)


def test_no_new_job_no_early_start(setup: HookSetup, hook: str, test_guest: TestGuest, qmp: QmpDouble,
                                   compose_project: Callable[..., ComposeProject]) -> None:
    """QMP keeps reporting the job of an earlier backup (the leftover): that never counts, the stacks
    start at backup-end."""
    db, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, _table(stacks=[db.name]))})
    job = play(hook, setup, test_guest, qmp, [db], GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT), start_job=False,
               transfer=2.0)
    log = job.log
    assert job.result.status is JobStatus.OK, log
    started, _ = container_times(db)["app"]
    assert started > job.phase_at["backup-end"], log
    assert f"backup-end {VMID}: started {db.name}" in log and f"resident {VMID}: started" not in log, log
    _assert_no_watcher_left(setup)


def test_busy_socket_backoff_then_detection(setup: HookSetup, hook: str, test_guest: TestGuest, qmp: QmpDouble,
                                            compose_project: Callable[..., ComposeProject]) -> None:
    db, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, _table(stacks=[db.name]))})
    hold = 2.0
    released: list[float] = []

    def busy(ctx: Context) -> None:  # another client sits on the monitor across the job start
        qmp.hold(hold)
        released.append(time.time() + hold)

    job = play(hook, setup, test_guest, qmp, [db], GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT), at_job_start=busy)
    log = job.log
    assert job.result.status is JobStatus.OK, log
    started, _ = container_times(db)["app"]
    retried = RETRY if "trying again" in log else 0.0
    assert released[0] - 0.2 < started < released[0] + RESUME_WITHIN + SLACK + retried, (started - released[0], log)
    assert "QMP busy" in log and "backed off" in log, log
    qmp.settle()
    assert all(c.duration < 0.5 for c in qmp.watcher_clients())
    _assert_no_watcher_left(setup)


def test_no_qmp_socket_falls_back_to_backup_end(setup: HookSetup, hook: str, test_guest: TestGuest, qmp: QmpDouble,
                                                compose_project: Callable[..., ComposeProject]) -> None:
    db, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, _table(stacks=[db.name]))})
    qmp.remove()
    job = play(hook, setup, test_guest, qmp, [db], GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT), start_job=False,
               transfer=2.0)
    log = job.log
    assert job.result.status is JobStatus.OK, log
    assert f"pre-stop {VMID}: early resume off (QMP {qmp.path}: No such file or directory)" in log, log
    warnings = [line for line in log.splitlines()
                if "WARN" in line and "guest side: recovery NOT INSTALLED" not in line]
    assert "watching" not in log and warnings == [], log
    assert container_times(db)["app"][0] > job.phase_at["backup-end"], log
    assert f"backup-end {VMID}: started {db.name}" in log, log
    _assert_no_watcher_left(setup)


@pytest.mark.parametrize("fail_at", [FailPoint.BEFORE_POINT_IN_TIME, FailPoint.TRANSFER])
def test_failed_backup_ends_the_watcher_and_nothing_stays_down(
    fail_at: FailPoint, setup: HookSetup, hook: str, test_guest: TestGuest, qmp: QmpDouble,
    compose_project: Callable[..., ComposeProject],
) -> None:
    """vzdump fails before the job starts (backup-abort resumes and stops the watcher), or during the
    transfer (the watcher has resumed; backup-abort finds it done)."""
    db, other = _stacks(compose_project)
    setup.write({VMID: (test_guest, _table(stacks=[db.name]))})
    job = play(hook, setup, test_guest, qmp, [db], GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT, fail_at=fail_at),
               transfer=2.0)
    log = job.log
    assert job.result.guest(VMID).status is BackupStatus.FAILED, log
    assert all(r.returncode == 0 for r in job.result.records), log
    started = [ln for ln in log.splitlines() if f"{VMID}: started {db.name}" in ln]
    assert len(started) == 1, log  # exactly once
    if fail_at is FailPoint.BEFORE_POINT_IN_TIME:  # no job: the watcher never starts anything
        assert f"backup-abort {VMID}: started" in started[0], log
    assert compose.running_services(db) == {"app"}
    assert not setup.marker_path(VMID).exists()
    _assert_no_watcher_left(setup)
