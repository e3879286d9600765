"""Application consistency, proven with PostgreSQL: the installed hook, run exactly as vzdump runs it
(tests/infra/vzdump.py), against a test guest (sshd in a netns) whose compose PostgreSQL 15 is under
a steady write load.

The backup is simulated by copying the bind-mounted PGDATA (``cp -a``, ownership kept) at the
stand-in's point in time: for snapshot/suspend modes that is the storage snapshot or the frozen copy,
for stop modes the archive of the stopped guest. A throw-away PostgreSQL (the host's
``/usr/lib/postgresql/15/bin/postgres`` as the data owner, uid 999) is then started on the copy and its
server log read:

- without the hook (negative control) the copy needs crash recovery ("database system was
  interrupted", "not properly shut down", "redo starts");
- with the hook it starts clean ("database system was shut down at"), holds every row whose INSERT
  was acknowledged before the stop began (indeed before the copy began), no row that was never sent,
  and the app comes back: the writer (one ``psql -c INSERT`` per row, so every row reconnects)
  acknowledges rows again after the job. Orders: lxc snapshot/suspend/stop, qemu snapshot/stop
  (compose v2), and lxc snapshot with compose v1.

Also: a vzdump failure after the point in time (backup-abort resumes), the guest cut off before
pre-stop (bounded, policy applied, nothing left down), and PostgreSQL's default SIGTERM "smart"
shutdown held up by a connected client until compose kills it (exit 137: crash-consistent, KILLED in
the task log; with on_quiesce_error = "abort" the backup fails and PostgreSQL runs again).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.compose import PG_BIN, ComposeProject
from tests.infra.guest import TestGuest
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

pytestmark = pytest.mark.integration

VMID = 101
PG_UID = 999  # owner of PGDATA in vzdh/postgres:15
CLEAN_START = "database system was shut down at"
CRASH_RECOVERY = ("database system was interrupted", "not properly shut down", "redo starts")
ORDERS = [("lxc", "snapshot"), ("lxc", "suspend"), ("lxc", "stop"), ("qemu", "snapshot"), ("qemu", "stop")]
TRANSFER = 1.0  # seconds of simulated archive transfer
CONNECT_TIMEOUT = 3  # ssh.connect_timeout of the test guest
# pre-stop on a cut-off guest pays the connect timeout once, plus process start-up
CUT_OFF_BOUND = CONNECT_TIMEOUT + 4
BOOT = 1.0  # seconds a guest takes to answer SSH again after vzdump starts it (stop mode)


# ------------------------------------------------------------------------------------- the app


class Writer(threading.Thread):
    """Inserts ids 1, 2, 3 ... into table t, one ``psql -c`` (one connection) per row, as fast as it
    goes. ``sent`` holds every id an INSERT was issued for, ``acked`` (id, monotonic time) those whose
    commit psql reported (exit 0; synchronous_commit is on)."""

    def __init__(self, socket_dir: Path) -> None:
        super().__init__(daemon=True, name="pg-writer")
        self.socket_dir = socket_dir
        self.sent: list[int] = []
        self.acked: list[tuple[int, float]] = []
        self.failures = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        env = {"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"}
        n = 0
        while not self._halt.is_set():
            n += 1
            with self._lock:
                self.sent.append(n)
            argv = [f"{PG_BIN}/psql", "-X", "-q", "-h", str(self.socket_dir), "-U", "postgres",
                    "-v", "ON_ERROR_STOP=1", "-c", f"insert into t (id) values ({n})"]
            try:
                proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
                ok = proc.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if ok:
                with self._lock:
                    self.acked.append((n, time.monotonic()))
                self._halt.wait(0.01)
            else:
                self.failures += 1
                self._halt.wait(0.05)

    def acked_until(self, t: float) -> set[int]:
        with self._lock:
            return {i for i, at in self.acked if at <= t}

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def sent_ids(self) -> set[int]:
        with self._lock:
            return set(self.sent)

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=20)


@dataclass
class App:
    """A compose project with one PostgreSQL service ``db`` and a writer thread on it."""

    project: ComposeProject
    writer: Writer
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def wait_rows(self, more_than: int, timeout: float = 30.0) -> bool:
        return wait_until(lambda: self.writer.acked_count() > more_than, timeout, step=0.1)

    def hold_session(self) -> None:
        """A client connected for good (smart shutdown waits for it)."""
        argv = [f"{PG_BIN}/psql", "-X", "-q", "-h", str(self.project.socket_dir()), "-U", "postgres",
                "-c", "select pg_sleep(600)"]
        self.clients.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True))
        assert wait_until(lambda: compose.psql(self.project, "select count(*) from pg_stat_activity "
                                                             "where query like 'select pg_sleep%'") == "1", 10, 0.1)

    def pg_ready(self) -> bool:
        proc = subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", str(self.project.socket_dir()), "-U", "postgres",
                               "-t", "1"], stdin=subprocess.DEVNULL, capture_output=True)
        return proc.returncode == 0


@pytest.fixture
def make_app(compose_project: Callable[..., ComposeProject]) -> Iterator[Callable[..., App]]:
    """``make(compose="v2", **db_overrides) -> App``: PostgreSQL up, table t created, writer running
    and already acknowledging rows. Writers and held sessions end before the project is taken down."""
    apps: list[App] = []

    def make(version: str = "v2", **overrides: Any) -> App:
        project = compose_project("pg", {"db": {"kind": "postgres", **overrides}}, compose=version)
        compose.up(project)
        compose.wait_pg_ready(project, timeout=60)
        compose.psql(project, "create table t (id bigint primary key, at timestamptz not null default now())")
        app = App(project, Writer(project.socket_dir()))
        apps.append(app)
        app.writer.start()
        assert app.wait_rows(20, timeout=20), "the writer does not get rows in"
        return app

    yield make
    for app in apps:
        app.writer.halt()
        for c in app.clients:
            if c.poll() is None:
                os.killpg(c.pid, signal.SIGKILL)
            c.wait()


# ------------------------------------------------------------------------------------- the backup


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the data owner (uid 999) can reach, for copies and throw-away servers."""
    path = Path(tempfile.mkdtemp(prefix="vzdh-cons-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class PointInTime:
    """The stand-in's on_point_in_time callback: copies PGDATA (the backup's content) and notes what
    the writer had acknowledged before the copy began."""

    def __init__(self, app: App, dest: Path) -> None:
        self.app = app
        self.dest = dest
        self.at: float | None = None
        self.acked: set[int] = set()
        self.pg_was_running: bool | None = None
        self.cp_error = ""

    def __call__(self, ctx: Context) -> None:
        self.at = time.monotonic()
        self.acked = self.app.writer.acked_until(self.at)
        self.pg_was_running = "db" in compose.running_services(self.app.project)
        # cp -a of a live PGDATA may see files vanish (that is the negative control): tolerated
        proc = subprocess.run(["cp", "-a", str(self.app.project.data_dir()), str(self.dest)],
                              capture_output=True, text=True, timeout=120)
        self.cp_error = proc.stderr.strip()[-500:] if proc.returncode else ""


@dataclass(frozen=True)
class Restored:
    """What a throw-away PostgreSQL made of a copy: its server log and the ids in t (None if it did
    not come up)."""

    log: str
    ids: set[int] | None

    @property
    def clean(self) -> bool:
        return CLEAN_START in self.log and not self.crash_recovery

    @property
    def crash_recovery(self) -> bool:
        return any(s in self.log for s in CRASH_RECOVERY)


def restore(copy: Path, work: Path, timeout: float = 60.0) -> Restored:
    """Start the host's PostgreSQL 15 as uid 999 on `copy` (unix socket only, in `work`), read t,
    shut it down, return its log."""
    sock = work / "restore-sock"
    sock.mkdir()
    sock.chmod(0o777)
    log_path = work / "restore.log"
    argv = ["setpriv", f"--reuid={PG_UID}", f"--regid={PG_UID}", "--clear-groups", f"{PG_BIN}/postgres",
            "-D", str(copy), "-c", "listen_addresses=", "-c", f"unix_socket_directories={sock}",
            "-c", "logging_collector=off", "-c", "archive_mode=off"]
    ids: set[int] | None = None
    with open(log_path, "wb") as log:
        server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while server.poll() is None and time.monotonic() < deadline:
            ready = subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", str(sock), "-U", "postgres", "-t", "1"],
                                   stdin=subprocess.DEVNULL, capture_output=True)
            if ready.returncode == 0:
                out = subprocess.run([f"{PG_BIN}/psql", "-X", "-A", "-t", "-q", "-h", str(sock), "-U", "postgres",
                                      "-c", "select id from t"], stdin=subprocess.DEVNULL, capture_output=True,
                                     text=True, timeout=30)
                if out.returncode == 0:
                    ids = {int(x) for x in out.stdout.split()}
                break
            time.sleep(0.05)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    return Restored(log_path.read_text(errors="replace"), ids)


@dataclass
class Run:
    result: JobResult
    pit: PointInTime
    stop_began: float | None

    @property
    def log(self) -> str:
        return self.result.task_log()

    def record(self, phase: str) -> Any:
        return next(r for r in self.result.records if r.phase == phase and r.vmid == VMID)

    def phases(self) -> list[str]:
        return self.result.phases(VMID)


def play(hook: str, setup: HookSetup, guest: TestGuest, app: App, spec: GuestSpec, dest: Path,
         on_phase: Callable[[str, Context], None] | None = None, timeout: float = 120) -> Run:
    """One vzdump job for `spec`; PGDATA copied to `dest` at the point in time. Stop modes: the
    guest's sshd goes down at vzdump's shutdown and answers again BOOT seconds after vzdump starts it."""
    pit = PointInTime(app, dest)
    began: list[float] = []
    timers: list[threading.Timer] = []

    def phase_cb(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.BEFORE_PHASE:
            began.append(ctx.time)
        if on_phase is not None:
            on_phase(phase, ctx)

    def shutdown(ctx: Context) -> None:
        guest.stop_sshd()

    def boot(ctx: Context) -> None:
        t = threading.Timer(BOOT, guest.start_sshd)
        timers.append(t)
        t.start()

    try:
        result = run_job(hook, [spec], extra_env=setup.env, transfer_seconds=TRANSFER, timeout=timeout,
                         on_point_in_time=pit, on_phase=phase_cb, on_guest_shutdown=shutdown,
                         on_guest_start=boot)
    finally:
        for t in timers:
            t.join()
    return Run(result, pit, began[0] if began else None)


@pytest.fixture
def setup(tmp_path: Path) -> HookSetup:
    return HookSetup(tmp_path)


@pytest.fixture
def hook() -> str:
    return installed_hook()


def _guest_table(**extra: Any) -> dict[str, Any]:
    return {"ssh": {"connect_timeout": CONNECT_TIMEOUT}, "stop_timeout": 20, "resume_wait": 30, **extra}


def assert_consistent(run: Run, restored: Restored, app: App) -> None:
    """The copy starts clean and holds every acknowledged row; the app came back after the job."""
    log = run.log
    pit = run.pit
    assert pit.at is not None, log
    assert pit.pg_was_running is False, f"postgres ran at the point in time\n{log}"
    assert restored.clean, f"the copy needed crash recovery:\n{restored.log}\n{log}"
    assert restored.ids is not None, restored.log
    assert run.stop_began is not None
    before_stop = app.writer.acked_until(run.stop_began)
    assert before_stop <= pit.acked
    # every commit acknowledged before the stop began, and even up to the copy, is in the copy
    missing = pit.acked - restored.ids
    assert not missing, f"{len(missing)} acknowledged rows missing from the copy, e.g. {sorted(missing)[:5]}"
    assert restored.ids <= app.writer.sent_ids(), "rows in the copy that were never sent"
    assert len(pit.acked) > 20
    # the app comes back: the writer reconnects and commits rows after the job
    at_pit = len(restored.ids)
    assert app.wait_rows(at_pit + 10, timeout=30), (f"the writer did not come back ({app.writer.acked_count()} rows)"
                                                    f"\n{log}")
    assert int(compose.psql(app.project, "select count(*) from t")) > at_pit


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("vmtype", "mode", "how"), [
    ("lxc", "snapshot", "not in the config"),
    ("qemu", "snapshot", "enabled = false"),
], ids=["lxc-snapshot-unconfigured", "qemu-snapshot-disabled"])
def test_negative_control_without_the_hook_the_copy_needs_crash_recovery(
    vmtype: str, mode: str, how: str, setup: HookSetup, hook: str, test_guest: TestGuest,
    make_app: Callable[..., App], scratch: Path,
) -> None:
    app = make_app()
    if how == "not in the config":  # the config has the very same guest, under another vmid
        setup.write({VMID + 1: (test_guest, _guest_table(stacks=[app.project.name]))})
    else:
        setup.write({VMID: (test_guest, _guest_table(stacks=[app.project.name], enabled=False))})
    run = play(hook, setup, test_guest, app, GuestSpec(VMID, GuestType(vmtype), Mode(mode)), scratch / "copy")
    assert run.result.status is JobStatus.OK, run.log
    assert f"{VMID}: not in" in run.log, run.log
    assert run.pit.pg_was_running is True
    restored = restore(scratch / "copy", scratch)
    assert restored.crash_recovery, f"a copy of a running PostgreSQL started clean?\n{restored.log}"
    assert CLEAN_START not in restored.log
    assert app.wait_rows(len(run.pit.acked) + 10)


@pytest.mark.parametrize(("vmtype", "mode"), ORDERS, ids=[f"{t}-{m}" for t, m in ORDERS])
def test_with_the_hook_the_copy_starts_clean_and_holds_every_acknowledged_row(
    vmtype: str, mode: str, setup: HookSetup, hook: str, test_guest: TestGuest,
    make_app: Callable[..., App], scratch: Path,
) -> None:
    app = make_app()
    setup.write({VMID: (test_guest, _guest_table(stacks=[app.project.name]))})
    run = play(hook, setup, test_guest, app, GuestSpec(VMID, GuestType(vmtype), Mode(mode)), scratch / "copy")
    assert run.result.status is JobStatus.OK, run.log
    assert all(r.returncode == 0 for r in run.result.records), run.log
    assert f"pre-stop {VMID}: stopped {app.project.name}" in run.log, run.log
    restored = restore(scratch / "copy", scratch)
    assert_consistent(run, restored, app)
    assert not setup.marker_path(VMID).exists()


def test_compose_v1_copy_starts_clean(setup: HookSetup, hook: str, test_guest: TestGuest,
                                      make_app: Callable[..., App], scratch: Path) -> None:
    app = make_app("v1")
    setup.write({VMID: (test_guest, _guest_table(stacks=[app.project.name], compose_command="docker-compose"))})
    run = play(hook, setup, test_guest, app, GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT), scratch / "copy")
    assert run.result.status is JobStatus.OK, run.log
    assert "docker-compose" in run.log, run.log
    assert_consistent(run, restore(scratch / "copy", scratch), app)


# lxc snapshot (one volume): no pre-restart/post-restart after a failure, backup-abort must resume.
# qemu stop: vzdump continues the VM it started paused, runs pre-restart/post-restart in its
# clean-up, then backup-abort.
FAILED_ORDERS = {
    "lxc-snapshot": (GuestType.LXC, Mode.SNAPSHOT, ["backup-start", "pre-stop", "backup-abort", "log-end"],
                     "backup-abort"),
    "qemu-stop": (GuestType.QEMU, Mode.STOP,
                  ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
                  "post-restart"),
}


@pytest.mark.parametrize("order", sorted(FAILED_ORDERS))
def test_failure_after_the_point_in_time_backup_abort_brings_postgres_back(
    order: str, setup: HookSetup, hook: str, test_guest: TestGuest, make_app: Callable[..., App], scratch: Path,
) -> None:
    vmtype, mode, phases, resumed_by = FAILED_ORDERS[order]
    app = make_app()
    setup.write({VMID: (test_guest, _guest_table(stacks=[app.project.name]))})
    ready_after: dict[str, bool] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if ctx.moment is Moment.AFTER_PHASE and ctx.vmid == VMID:
            ready_after[phase] = "db" in compose.running_services(app.project)

    spec = GuestSpec(VMID, vmtype, mode, fail_at=FailPoint.AFTER_POINT_IN_TIME)
    run = play(hook, setup, test_guest, app, spec, scratch / "copy", on_phase=on_phase)
    assert run.result.guest(VMID).status is BackupStatus.FAILED, run.log
    assert run.phases() == phases, run.log
    assert "backup-end" not in ready_after
    assert ready_after["pre-stop"] is False and ready_after[resumed_by] is True, (ready_after, run.log)
    assert all(r.returncode == 0 for r in run.result.records), run.log
    assert not setup.marker_path(VMID).exists()
    # the (failed) backup's content was consistent all the same; the app is back
    assert_consistent(run, restore(scratch / "copy", scratch), app)


def test_guest_cut_off_before_pre_stop_continue_gives_a_crash_consistent_copy(
    setup: HookSetup, hook: str, test_guest: TestGuest, make_app: Callable[..., App], scratch: Path,
) -> None:
    app = make_app()
    setup.write({VMID: (test_guest, _guest_table(stacks=[app.project.name]))})

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.BEFORE_PHASE:
            test_guest.cut_off()
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            test_guest.restore()

    run = play(hook, setup, test_guest, app, GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT), scratch / "copy",
               on_phase=on_phase)
    log = run.log
    pre_stop = run.record("pre-stop")
    assert pre_stop.returncode == 0 and pre_stop.duration < CUT_OFF_BOUND, log
    assert run.result.status is JobStatus.OK, log
    assert any("vzdump-hook: WARNING:" in ln and "crash-consistent" in ln for ln in log.splitlines()), log
    assert run.pit.pg_was_running is True
    restored = restore(scratch / "copy", scratch)
    assert restored.crash_recovery, restored.log
    # nothing left down, nothing left behind
    assert app.pg_ready()
    assert app.wait_rows(len(run.pit.acked) + 10)
    assert not setup.marker_path(VMID).exists()


def test_guest_cut_off_pre_stop_pays_one_connect_timeout_and_says_unreachable(
    setup: HookSetup, hook: str, test_guest: TestGuest, compose_project: Callable[..., ComposeProject],
) -> None:
    stack = compose_project("s", {"app": "sleeper"})
    compose.up(stack)
    setup.write({VMID: (test_guest, _guest_table(stacks=[stack.name]))})

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.BEFORE_PHASE:
            test_guest.cut_off()
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            test_guest.restore()

    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env, on_phase=on_phase,
                     timeout=60)
    pre_stop = next(r for r in result.records if r.phase == "pre-stop")
    text = "\n".join(pre_stop.lines)
    assert compose.running_services(stack) == {"app"}
    assert "marker unusable" not in text, text
    assert pre_stop.duration < CONNECT_TIMEOUT + 2, f"pre-stop took {pre_stop.duration:.1f} s:\n{text}"


@pytest.mark.parametrize("cut_at", ["backup-start", "pre-stop"])
def test_guest_cut_off_abort_policy_fails_the_backup_bounded(
    cut_at: str, setup: HookSetup, hook: str, test_guest: TestGuest, make_app: Callable[..., App], scratch: Path,
) -> None:
    app = make_app()
    setup.write({VMID: (test_guest, _guest_table(stacks=[app.project.name], on_quiesce_error="abort"))})

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == cut_at and ctx.moment is Moment.BEFORE_PHASE:
            test_guest.cut_off()
        if phase == cut_at and ctx.moment is Moment.AFTER_PHASE:
            test_guest.restore()

    t0 = time.monotonic()
    run = play(hook, setup, test_guest, app, GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT), scratch / "copy",
               on_phase=on_phase)
    log = run.log
    failed = run.record(cut_at)
    assert failed.returncode == 1 and failed.duration < CUT_OFF_BOUND, log
    assert run.result.guest(VMID).status is BackupStatus.FAILED, log
    done = ["backup-start"] if cut_at == "backup-start" else ["backup-start", "pre-stop"]
    assert run.phases() == done + ["backup-abort", "log-end"], log
    assert run.pit.at is None  # no backup was made
    assert time.monotonic() - t0 < 30
    assert app.pg_ready() and app.wait_rows(app.writer.acked_count() + 10)
    assert not setup.marker_path(VMID).exists()


@pytest.mark.parametrize(("policy", "version"), [("continue", "v2"), ("abort", "v2"), ("continue", "v1")])
def test_sigterm_smart_shutdown_held_by_a_client_is_killed_and_reported(
    policy: str, version: str, setup: HookSetup, hook: str, test_guest: TestGuest,
    make_app: Callable[..., App], scratch: Path,
) -> None:
    """PostgreSQL's default stop signal (SIGTERM: smart shutdown) waits for connected clients; compose
    kills it after stop_timeout (exit 137). The hook must say the backup is crash-consistent."""
    app = make_app(version, stop_signal="SIGTERM")
    app.hold_session()
    cmd = "docker-compose" if version == "v1" else "docker compose"
    setup.write({VMID: (test_guest, _guest_table(stacks=[app.project.name], stop_timeout=2, on_quiesce_error=policy,
                                                 compose_command=cmd))})
    state_after: dict[str, tuple[bool, int]] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            state_after[phase] = ("db" in compose.running_services(app.project),
                                  compose.container_exit_codes(app.project)["db"])

    run = play(hook, setup, test_guest, app, GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT), scratch / "copy",
               on_phase=on_phase)
    log = run.log
    assert "KILLED" in log and "crash-consistent" in log, log
    assert "database system is shut down" not in compose.logs(app.project, "db"), "postgres was not killed"
    if policy == "continue":
        assert run.result.status is JobStatus.OK, log
        assert run.record("pre-stop").returncode == 0
        assert state_after["pre-stop"] == (False, 137), state_after
        assert any("job-end" not in ln and "crash-consistent" in ln and "WARNING" in ln for ln in log.splitlines()), log
        restored = restore(scratch / "copy", scratch)
        assert restored.crash_recovery, restored.log  # what the task log says is true
    else:
        assert run.record("pre-stop").returncode == 1, log
        assert run.result.guest(VMID).status is BackupStatus.FAILED, log
        assert run.pit.at is None
        assert state_after["pre-stop"][0] is True, state_after  # started again before failing
    assert wait_until(app.pg_ready, 30), log
    assert app.wait_rows(app.writer.acked_count() + 10)
    assert not setup.marker_path(VMID).exists()
