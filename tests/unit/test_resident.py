"""resident.py: one detached process per guest and job, from right before the stop until the stacks
run again (with qemu/watcher.py: QEMU's backup job as its trigger).

- The hook's side in-process (run_phase per phase, a FakeGuest behind open_transport, the QMP double on
  a real socket): pre-stop notes QEMU's job and arms the resident before the stop; without one (not
  configured, could not start, gone) the phases resume as they always did; what an ended resident left
  in its log file is shown once by a later phase. `spawn` is replaced by a stand-in process.
- The resident's loop: the real `Resident` in a thread of this process (spawn starts it there, against
  the same FakeGuest), told phases over its real unix socket: resumes at a resume point, at the start
  of QEMU's new backup job, when its vzdump worker is gone; retries; ends at its deadline or once the
  stacks run again; survives a wiped run directory.
- The real detached process: `spawn` leaves the caller's output and session; `python -m
  vzdump_hook.resident.process INFO` answers, stops on SIGTERM, ends at its deadline and leaves its lines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from pytest_mock import MockerFixture

from tests.infra.qmp_double import QmpDouble
from vzdump_hook import config as configuration
from vzdump_hook.errors import HookError
from vzdump_hook.node.job import JobId, _boot_id, node_name, process_start
from vzdump_hook.node.state import GuestRecord, HostState, Status
from vzdump_hook.phase.runner import RUN_DIR_ENV
from vzdump_hook.qemu import watcher as watchmod
from vzdump_hook.resident import client as earlymod
from vzdump_hook.resident import control as residentmod
from vzdump_hook.resident import daemon as daemonmod
from vzdump_hook.resident.control import Info
from vzdump_hook.resident.daemon import Resident
from vzdump_hook.resident.server import Kept
from vzdump_hook.vzdump.phases import GuestType, Mode

from .test_phase import ALL_UP, APP_DOWN, MARKER, Hook

QEMU, LXC = GuestType.QEMU, GuestType.LXC
RESIDENT_PY = [sys.executable, "-I", "-m", "vzdump_hook.resident.process"]
MAIN = "MainThread"  # the phases run here; each resident in a thread of its own (its "process")


# The bound of a wait for an event that must come (the resident's stacks up, its end): not a claim about
# how fast; it only ends a test that would otherwise hang. 5 s was exceeded once on a loaded CI machine
# (3 workers on 2 cores, a TCG VM beside them); a wait that ends early still ends at the event.
SETTLE = 30.0


def wait_for(pred: Callable[[], object], timeout: float = 10.0) -> bool:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


class Setup:
    """A Hook (test_phase.py) with `[hook] resident = true`, whose QMP directory holds the double's
    socket for guest 101. `spawn` runs `self.spawn_with` (default: the real Resident in a thread)."""

    def __init__(self, hook: Hook, double: QmpDouble, spawn: MagicMock) -> None:
        self.hook = hook
        self.double = double
        self.spawn = spawn
        self.threads: list[threading.Thread] = []
        self.residents: list[Resident] = []
        self.sleepers: list[subprocess.Popen[bytes]] = []
        self.deadline: float | None = None  # seconds from now, in place of the marker's deadline
        self.spawn_with: Callable[[list[str], str], int] = self.in_thread

    @property
    def g(self):  # type: ignore[no-untyped-def]
        return self.hook.g

    def run(self, mode: Mode, *phases: str, vmtype: GuestType = QEMU) -> None:
        for p in phases:
            assert self.hook(p, mode, 101, vmtype) == 0, p

    def state(self) -> HostState:
        return self.hook.state()

    def files(self) -> tuple[Path, Path, Path]:
        return tuple(Path(p) for p in residentmod.paths(self.state().job_dir, 101))  # type: ignore[return-value]

    def info(self) -> Info:
        info = residentmod.load(str(self.files()[0]))
        assert info is not None
        return info

    def record(self) -> GuestRecord:
        rec = self.state().load(101)
        assert rec is not None
        return rec

    def watch(self) -> watchmod.Watch:
        w = watchmod.load(watchmod._paths(self.state(), 101))
        assert w is not None
        return w

    def stand_in(self, argv: list[str] | None = None, log_path: str = "") -> int:
        """A process in place of the resident: alive, but never listening."""
        p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
        self.sleepers.append(p)
        return p.pid

    def in_thread(self, argv: list[str], log_path: str) -> int:
        """The real Resident of argv's info file, in a thread; the pid returned is a stand-in that
        lives as long as the thread (so `alive()` tells what it would of the process)."""
        info_path = argv[-1]
        info = residentmod.load(info_path)
        assert info is not None and argv[:-1] == RESIDENT_PY
        if self.deadline is not None:
            info.deadline = time.time() + self.deadline
        r = Resident(info, info_path)
        name = f"resident-{info.vmid}-{len(self.residents)}"
        r.kept.addFilter(lambda rec: rec.threadName == name)  # a process of its own keeps only its own lines
        stand_in = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
        self.sleepers.append(stand_in)

        def run() -> None:
            try:
                r.run()
            finally:
                stand_in.kill()
                stand_in.wait()

        t = threading.Thread(target=run, name=name, daemon=True)
        self.residents.append(r)
        self.threads.append(t)
        t.start()
        return stand_in.pid

    def resident(self) -> Resident:
        assert len(self.residents) == 1, "one resident per guest and job"
        return self.residents[0]

    def thread(self) -> threading.Thread:
        assert len(self.threads) == 1
        return self.threads[0]

    def ended(self, timeout: float = 10.0) -> bool:
        self.thread().join(timeout)
        return not self.thread().is_alive()

    def ask(self) -> dict[str, object]:
        """How the resident is (the empty phase: only ask)."""
        answer = earlymod.tell(self.state().job_dir, 101, "")
        assert answer is not None
        return answer


@pytest.fixture
def s(tmp_path: Path, mocker: MockerFixture, caplog: pytest.LogCaptureFixture) -> Iterator[Setup]:
    caplog.set_level(logging.INFO, logger="vzdump_hook")
    hook = Hook(tmp_path, mocker)
    qmp_dir = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))  # a socket path must be short
    hook.qmp_dir = qmp_dir
    hook.resident = True
    hook.configure()
    setup: Setup | None = None

    def spawn(argv: list[str], log_path: str) -> int:
        assert setup is not None
        return setup.spawn_with(argv, log_path)

    mock = mocker.patch("vzdump_hook.resident.control.spawn", side_effect=spawn)  # arm() calls it there
    try:
        with QmpDouble(qmp_dir / "101.qmp", leftover=True) as double:
            setup = Setup(hook, double, mock)
            yield setup
            for r in setup.residents:
                r.until = time.monotonic()  # whatever a test left waiting ends at its next tick
            for t in setup.threads:
                t.join(15)
                assert not t.is_alive(), "a resident thread did not end"
    finally:
        earlymod.EARLY.clear()
        root = logging.getLogger("vzdump_hook")
        for h in [h for h in root.handlers if isinstance(h, Kept)]:
            root.removeHandler(h)
        if setup is not None:
            for p in setup.sleepers:
                p.kill()
                p.wait()
        shutil.rmtree(qmp_dir, ignore_errors=True)


def task_log(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """What the phases printed (the task log), not what the resident threads logged as they went."""
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.threadName == MAIN]


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """Every line with `text`, whoever logged it."""
    return [m for m in caplog.messages if text in m]


def resident_said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if (r.threadName or "").startswith("resident-") and text in r.getMessage()]


def unix_socket(path: Path) -> socket.socket:
    """A unix socket bound at `path` (bound at a short path, then moved: tmp paths may be too long)."""
    short = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(short / "s"))
    os.rename(short / "s", path)
    short.rmdir()
    return s


# -- the hook's side (a stand-in in place of the resident) -----------------------------------------


def test_pre_stop_notes_the_job_and_arms_the_resident_before_the_stop(s: Setup,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    s.hook.configure("max_downtime = 120")
    seen: list[list[str]] = []

    def spawn(argv: list[str], log_path: str) -> int:
        seen.append(s.g.running_stacks())
        w = s.watch()  # QEMU's job was noted before: the resident can watch from the first tick
        assert leftover is not None and w.before["uuid"] == leftover["uuid"]
        return s.stand_in()

    leftover = s.double.job
    assert leftover is not None
    s.spawn_with = spawn
    t0 = time.time()
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    assert seen == [ALL_UP], "armed while the stacks still run"
    (argv, log_path), _ = s.spawn.call_args
    info_file, log_file, _ = s.files()
    assert argv == [*RESIDENT_PY, str(info_file)] and log_path == str(log_file)
    info = s.info()
    rec = s.record()
    assert (info.vmid, info.vmtype, info.mode) == (101, "qemu", "snapshot")
    assert info.pid == s.sleepers[0].pid and info.pid_start == process_start(info.pid) and residentmod.alive(info)
    assert (rec.stop_started is not None and t0 <= rec.stop_started
            and info.deadline == pytest.approx(rec.stop_started + 120, abs=1))
    assert JobId.from_dict(info.job) == JobId.current() and info.settings["run_dir"] == s.hook.env[RUN_DIR_ENV]
    assert not info.watching  # snapshot: QEMU's job starts after post-restart
    w = s.watch()
    assert (w.before["status"] == "done" and w.not_before <= rec.stop_started
            and w.qmp == s.double.path and w.mode == "snapshot")
    assert s.double.watcher_clients(), "pre-stop asked QMP"
    assert s.g.running_stacks() == APP_DOWN
    s.run(Mode.SNAPSHOT, "pre-restart", "post-restart")
    assert s.spawn.call_count == 1, "the running resident is kept"
    watching = said(caplog, "post-restart 101: watching ")
    assert len(watching) == 1 and leftover["uuid"][:8] in watching[0]
    assert s.g.running_stacks() == APP_DOWN
    s.run(Mode.SNAPSHOT, "backup-end")  # the stand-in never answers: the phase resumes
    assert s.g.running_stacks() == ALL_UP and said(caplog, "backup-end 101: started db, web")


@pytest.mark.parametrize("mode", [Mode.SUSPEND, Mode.STOP])
def test_suspend_and_stop_say_watching_at_pre_stop(s: Setup, mode: Mode, caplog: pytest.LogCaptureFixture) -> None:
    s.spawn_with = s.stand_in
    s.run(mode, "backup-start", "pre-stop")
    assert s.spawn.call_count == 1 and s.g.running_stacks() == APP_DOWN
    assert len(said(caplog, "pre-stop 101: watching ")) == 1
    s.run(mode, "backup-end", "pre-restart", "post-restart", "log-end")
    assert s.spawn.call_count == 1
    assert s.g.running_stacks() == ALL_UP and s.g.starts() == ["db", "web"]


def test_resident_off_in_the_config_spawns_nothing(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s.hook.resident = False
    s.hook.configure()
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    assert not s.spawn.called and not s.files()[0].exists()
    assert not said(caplog, "watching")  # nobody watches
    assert s.g.running_stacks() == APP_DOWN
    s.run(Mode.SNAPSHOT, "backup-end")
    assert s.g.running_stacks() == ALL_UP


def test_early_resume_off_asks_no_qmp(s: Setup) -> None:
    s.hook.configure("early_resume = false")
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end", "log-end")
    assert s.double.clients == [] and s.g.running_stacks() == ALL_UP


def test_lxc_guests_never_ask_qmp(s: Setup) -> None:
    s.spawn_with = s.stand_in
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end", "log-end", vmtype=LXC)
    assert s.double.clients == []
    assert s.spawn.call_count == 1 and s.info().vmtype == "lxc"  # an LXC guest has its resident too
    assert s.g.running_stacks() == ALL_UP


def test_no_socket_means_no_early_resume_and_backup_end_resumes(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s.double.remove()
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    assert not Path(watchmod._paths(s.state(), 101)).exists()
    off = said(caplog, "early resume off")
    assert len(off) == 1 and off[0].startswith("pre-stop 101: early resume off (QMP ") and "No such file" in off[0]
    assert not said(caplog, "watching")
    assert s.ask()["state"] == "waiting" and s.g.running_stacks() == APP_DOWN
    s.run(Mode.SNAPSHOT, "backup-end")
    assert s.g.running_stacks() == ALL_UP
    assert s.ended()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_qemu_without_query_backup_means_no_early_resume(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s.double.pve = False
    s.spawn_with = s.stand_in
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    assert any("CommandNotFound" in m for m in said(caplog, "pre-stop 101: early resume off"))
    assert not said(caplog, "watching")


def test_socket_busy_for_too_long_at_pre_stop(s: Setup, mocker: MockerFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    mocker.patch.object(watchmod, "NOTE_WAIT", 0.5)
    s.spawn_with = s.stand_in
    s.double.hold(2)
    t0 = time.monotonic()
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    assert time.monotonic() - t0 < 3
    assert any("busy" in m for m in said(caplog, "early resume off"))
    s.run(Mode.SNAPSHOT, "pre-restart", "post-restart")
    assert not said(caplog, "watching")


def test_busy_socket_at_pre_stop_is_retried(s: Setup) -> None:
    s.spawn_with = s.stand_in
    s.double.hold(0.6)
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    assert s.watch().before["status"] == "done"


def test_spawn_failure_is_a_warning_and_the_phases_resume(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    def fail(argv: list[str], log_path: str) -> int:
        raise HookError("the resident process could not be started")

    s.spawn_with = fail
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    warned = [m for lv, m in task_log(caplog) if lv == logging.WARNING and m.startswith("pre-stop 101: no resident (")]
    assert len(warned) == 1 and "could not be started" in warned[0]
    assert s.g.running_stacks() == APP_DOWN
    s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
    assert s.g.running_stacks() == ALL_UP


def test_a_resident_that_is_gone_leaves_the_resume_to_the_phase(s: Setup) -> None:
    """SIGKILLed: its socket file is left, nobody listens on it."""
    s.spawn_with = s.stand_in
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    _, _, sock = s.files()
    unix_socket(sock).close()
    s.sleepers[0].kill()
    s.sleepers[0].wait()
    assert sock.exists() and earlymod.tell(s.state().job_dir, 101, "") is None
    t0 = time.monotonic()
    s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
    assert time.monotonic() - t0 < earlymod.ANSWER_WAIT, "a refused connection is not waited for"
    assert s.g.running_stacks() == ALL_UP and s.g.starts() == ["db", "web"]


def test_a_silent_resident_costs_the_phase_its_wait_then_the_phase_resumes(s: Setup) -> None:
    """Alive but stuck: the phase waits for its answer a bounded time, then resumes itself."""
    s.spawn_with = s.stand_in
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    _, _, sock = s.files()
    stuck = unix_socket(sock)
    stuck.listen(1)  # accepts into the backlog, never answers
    try:
        t0 = time.monotonic()
        s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
        took = time.monotonic() - t0
    finally:
        stuck.close()
    assert s.g.running_stacks() == ALL_UP
    assert 1.0 <= took < 15.0  # waited for an answer, then did not hang


def test_leftover_lines_are_printed_once_by_a_later_phase(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s.spawn_with = s.stand_in
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    _, log_file, _ = s.files()
    log_file.write_text(json.dumps([logging.INFO, "resident 101: QEMU backup job u at 12:00:00"]) + "\n"
                        + json.dumps([logging.WARNING, "resident 101: something odd"]) + "\n"
                        "Traceback (most recent call last):\n")
    caplog.clear()
    s.run(Mode.SNAPSHOT, "backup-end")  # the stand-in still runs: its lines come later, not now
    assert not said(caplog, "something odd") and log_file.exists()
    s.sleepers[0].kill()
    s.sleepers[0].wait()
    caplog.clear()
    s.run(Mode.SNAPSHOT, "log-end")
    assert task_log(caplog)[:3] == [(logging.INFO, "resident 101: QEMU backup job u at 12:00:00"),
                                    (logging.WARNING, "resident 101: something odd"),
                                    (logging.WARNING, "resident 101: Traceback (most recent call last):")]
    assert not log_file.exists()
    caplog.clear()
    s.hook("job-end")
    assert not said(caplog, "resident 101:")


# -- the resident's loop (the real Resident in a thread) ---------------------------------------------


def test_resumes_when_told_a_resume_point_and_the_phase_prints_its_lines_once(s: Setup,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)  # LXC snapshot: the CT is thawed at pre-restart
    r = s.resident()
    assert wait_for(lambda: s.ask()["stacks"] == ["web", "db"], SETTLE), "what it would start (for `status`)"
    assert s.ask()["state"] == "waiting" and s.g.running_stacks() == APP_DOWN
    caplog.clear()
    s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
    assert s.g.running_stacks() == ALL_UP
    started = [m for _, m in task_log(caplog) if "started db, web" in m]
    assert (len(started) == 1 and started[0].startswith("pre-restart 101: started db, web in ")
            and ", down " in started[0])
    assert resident_said(caplog, "started db, web"), "the resident started them, the phase printed its line"
    assert s.ended() and r.status == "done"
    rec = s.record()
    assert rec.status is Status.RESUMED and rec.downtime is not None
    caplog.clear()
    s.run(Mode.SNAPSHOT, "post-restart", "backup-end", "log-end", vmtype=LXC)
    s.hook("job-end")
    assert s.g.starts() == ["db", "web"]
    assert not said(caplog, "started db, web")  # nothing twice
    assert not s.files()[2].exists(), "its socket is gone with it"


@pytest.mark.parametrize(("mode", "early"),
                         [(Mode.SUSPEND, ["pre-restart"]), (Mode.STOP, ["backup-end", "pre-restart"])])
def test_ignores_a_phase_before_the_point_in_time(s: Setup, mode: Mode, early: list[str]) -> None:
    """LXC suspend: pre-restart comes while the container is still frozen; stop: backup-end and
    pre-restart come while it is still stopped."""
    s.run(mode, "backup-start", "pre-stop", *early, vmtype=LXC)
    assert s.g.running_stacks() == APP_DOWN and s.ask()["state"] == "waiting"
    assert not s.g.starts()
    s.run(mode, "post-restart", vmtype=LXC)
    assert s.g.running_stacks() == ALL_UP and s.ended()


def test_qemu_snapshot_post_restart_only_arms_the_watch(s: Setup) -> None:
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart")
    assert s.ask()["state"] == "waiting"
    s.run(Mode.SNAPSHOT, "post-restart")
    assert s.ask()["state"] == "watching"
    assert s.g.running_stacks() == APP_DOWN and not s.g.starts()


def armed(s: Setup, mode: Mode = Mode.SNAPSHOT) -> Resident:
    if mode is Mode.SNAPSHOT:
        s.run(mode, "backup-start", "pre-stop", "pre-restart", "post-restart")
    else:
        s.run(mode, "backup-start", "pre-stop")
    assert wait_for(lambda: s.ask()["state"] == "watching", SETTLE)
    return s.resident()


def polls(s: Setup) -> int:
    return len(s.double.watcher_clients())


def test_resumes_right_after_the_job_starts_and_only_then(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(s)
    n = polls(s)
    assert wait_for(lambda: polls(s) >= n + 3, SETTLE), "it keeps asking, one connection each"
    assert s.g.running_stacks() == APP_DOWN  # the leftover job does not count
    uuid = s.double.start_job()
    started = time.monotonic()
    assert wait_for(lambda: s.g.running_stacks() == ALL_UP, SETTLE)
    assert time.monotonic() - started < 1.5
    assert s.ended(SETTLE)
    rec = s.record()
    assert rec.status is Status.RESUMED and rec.downtime is not None
    assert resident_said(caplog, f"resident 101: QEMU backup job {uuid} at ")
    assert ([r.getMessage() for r in resident_said(caplog, "started db, web")][0]
            .startswith("resident 101: started db, web in "))
    s.double.settle()
    assert all(c.duration < 0.5 for c in s.double.watcher_clients())  # never held the socket
    caplog.clear()
    s.run(Mode.SNAPSHOT, "backup-end", "log-end")  # finds it done: nothing started twice
    assert s.g.starts() == ["db", "web"]


def test_a_job_started_before_the_stop_never_counts(s: Setup) -> None:
    s.double.job = None
    armed(s)
    s.double.start_job()
    assert s.double.job is not None
    s.double.job["start-time"] = s.watch().not_before - 1  # QEMU says: before the stacks stopped
    n = polls(s)
    assert wait_for(lambda: polls(s) >= n + 3, SETTLE)
    assert s.g.running_stacks() == APP_DOWN and s.ask()["state"] == "watching"
    s.run(Mode.SNAPSHOT, "backup-end")
    assert s.g.running_stacks() == ALL_UP and s.ended()


def test_busy_socket_backs_off_then_detects(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(s)
    s.double.hold(1.5)
    held_until = time.monotonic() + 1.5
    s.double.start_job()
    assert wait_for(lambda: s.g.running_stacks() == ALL_UP, 10)
    assert time.monotonic() >= held_until - 0.1
    assert s.ended(SETTLE)
    (line,) = [r.getMessage() for r in resident_said(caplog, "resident 101: QEMU backup job")]
    assert "QMP busy" in line and "backed off" in line
    tries = [c for c in s.double.clients if not c.holder and held_until - 1.5 <= c.start < held_until]
    assert len(tries) <= 8, "backs off rather than hammering the socket"


def test_stop_mode_qemu_replaced_then_the_guest_boots(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s.hook.configure("resume_wait = 10")
    armed(s, Mode.STOP)
    s.double.remove()  # vzdump shuts the VM down: QEMU exits
    s.g.unreachable = True
    assert wait_for(lambda: s.ask()["state"] == "watching", 2)  # no socket is no reason to give up
    s.double.restore()  # started paused: a new QEMU process, no job yet
    n = polls(s)
    assert wait_for(lambda: polls(s) >= n + 2, SETTLE)
    s.double.start_job()  # the point in time; then the VM boots
    refused = s.g.refused
    assert wait_for(lambda: s.g.refused > refused, SETTLE), "it waits for the guest to answer"
    assert s.g.running_stacks() == APP_DOWN
    s.g.unreachable = False
    assert wait_for(lambda: s.g.running_stacks() == ALL_UP, 10)
    assert s.ended(SETTLE)
    assert resident_said(caplog, "resident 101: started db, web")


def test_a_failed_job_is_left_to_vzdump(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(s)
    s.double.fail_job()
    s.double.job["uuid"] = "failed-one"  # type: ignore[index]
    said = "resident 101: QEMU backup job failed-one failed (backup write failed"
    assert wait_for(lambda: resident_said(caplog, said), SETTLE)
    assert s.ask()["state"] == "waiting" and s.g.running_stacks() == APP_DOWN
    caplog.clear()
    s.run(Mode.SNAPSHOT, "backup-abort")
    assert s.g.running_stacks() == ALL_UP and s.ended()
    assert len([m for _, m in task_log(caplog) if m.startswith("backup-abort 101: started db, web")]) == 1


def test_suspend_mode_gives_up_on_a_failed_job_once(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(s, Mode.SUSPEND)
    s.double.fail_job()
    s.double.job["uuid"] = "failed-one"  # type: ignore[index]
    assert wait_for(lambda: resident_said(caplog, "QEMU backup job failed-one failed"), SETTLE)
    n = polls(s)
    wait_for(lambda: polls(s) >= n + 5, 2)  # however long vzdump takes to call backup-abort
    assert len(resident_said(caplog, "QEMU backup job failed-one failed")) == 1
    assert polls(s) == n, "QMP is not asked again about a job known to have failed"


def test_qmp_that_stops_making_sense_is_left_to_backup_end(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(s)
    s.double.pve = False
    assert wait_for(lambda: [r for r in resident_said(caplog, "CommandNotFound") if "backup-end" in r.getMessage()
                             or "vzdump ends this backup" in r.getMessage()], SETTLE)
    assert s.ask()["state"] == "waiting" and s.g.running_stacks() == APP_DOWN
    s.run(Mode.SNAPSHOT, "backup-end")
    assert s.g.running_stacks() == ALL_UP and s.ended()


def test_racing_backup_end_starts_the_stacks_once(s: Setup) -> None:
    armed(s)

    def slow(verb: str, detail: str) -> None:
        if verb == "compose-start":
            time.sleep(0.3)

    s.g.on_call = slow
    s.double.start_job()
    assert wait_for(lambda: "compose-start" in [v for v, _ in s.g.calls], SETTLE)
    s.run(Mode.SNAPSHOT, "backup-end")  # told while the resident starts them, then finds them started
    assert s.ended(SETTLE)
    assert s.g.starts() == ["db", "web"]
    assert s.g.running_stacks() == ALL_UP


@pytest.mark.parametrize("ending", ["backup-abort", "log-end", "job-end", "job-abort"])
def test_every_ending_phase_is_a_resume_for_the_resident(s: Setup, ending: str) -> None:
    armed(s)
    if ending.startswith("job-"):
        s.hook(ending)
    else:
        s.run(Mode.SNAPSHOT, ending)
    assert s.g.running_stacks() == ALL_UP and s.g.starts() == ["db", "web"]
    assert s.ended() and s.resident().status == "done"


def test_resumed_elsewhere_ends_the_resident(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    r = armed(s)
    rec = s.record()
    rec.status = Status.RESUMED
    s.state().save(rec)
    assert s.ended(SETTLE)
    assert s.g.starts() == [] and r.status == "watching"
    assert not said(caplog, "started db, web")
    assert not s.files()[2].exists()


def test_nothing_stopped_ends_the_resident_at_once(s: Setup) -> None:
    for name in ("web", "db"):  # configured, but not running
        for c in s.g.projects[name].containers.values():
            c.running = False
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    assert s.spawn.call_count == 1  # armed before the stop, when nothing was known yet
    assert s.record().status is Status.NOTHING_STOPPED
    assert s.ended(SETTLE) and s.g.starts() == []


def test_vzdump_job_over_starts_the_stacks(s: Setup, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """The vzdump worker (a real process here) is gone: no phase will come, the resident starts them."""
    worker = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    s.sleepers.append(worker)
    monkeypatch.setenv("VZDUMP_HOOK_LAUNCHER", str(worker.pid))
    job = JobId.current()
    assert job.pid == worker.pid
    armed(s, Mode.STOP)  # QEMU stop: the resident would wait for the job, or for backup-end
    assert s.g.running_stacks() == APP_DOWN and s.ask()["state"] == "watching"
    worker.kill()
    worker.wait()
    assert wait_for(lambda: s.g.running_stacks() == ALL_UP, 10)
    assert s.ended(SETTLE)
    assert resident_said(caplog, "resident 101: its vzdump job is over")
    rec = HostState(s.state().settings, job).load(101)
    assert rec is not None and rec.status is Status.RESUMED


def test_a_failed_start_is_retried_with_growing_pauses_until_up(s: Setup, mocker: MockerFixture,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The guest does not answer when the job has started (sshd restarting): the resident tries
    again, each time a little later, and ends once the stacks run."""
    mocker.patch.object(daemonmod, "RETRY_FIRST", 0.3)
    armed(s)
    s.g.unreachable = True
    s.double.start_job()

    def failures() -> list[logging.LogRecord]:
        return [r for r in resident_said(caplog, "resident 101: resume failed") if r.levelno == logging.WARNING]

    assert wait_for(lambda: len(failures()) >= 3, 15)
    assert s.g.running_stacks() == APP_DOWN and s.ask()["state"] == "retrying"
    n = len(s.g.calls)
    s.g.unreachable = False
    assert wait_for(lambda: s.g.running_stacks() == ALL_UP, 15)
    assert s.ended(SETTLE)
    times = [r.created for r in failures()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps  # the pause doubles
    assert len(resident_said(caplog, "resident 101: trying again in")) == len(times)
    assert resident_said(caplog, "resident 101: started db, web")
    assert [d for v, d in s.g.calls[n:] if v == "compose-start"] == ["db", "web"]
    assert s.record().status is Status.RESUMED


def test_told_early_by_cli_before_the_phase_runs(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """cli.py tells the resident before the rest of the hook is imported; the phase then prints the
    answer it got, and does not tell again."""
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    earlymod.tell_early(["backup-start", "snapshot", "101"], s.hook.env)  # not a phase it is told
    assert 101 not in earlymod.EARLY
    earlymod.tell_early(["pre-restart", "snapshot", "101"], s.hook.env)
    assert s.g.running_stacks() == ALL_UP, "started before the phase ran"
    answer = earlymod.EARLY[101]
    assert answer is not None and answer["resumed"] is True
    caplog.clear()
    s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
    assert 101 not in earlymod.EARLY
    started = [m for _, m in task_log(caplog) if "started db, web" in m]
    assert len(started) == 1 and started[0].startswith("pre-restart 101: started db, web")
    assert s.g.starts() == ["db", "web"] and s.ended()


def test_a_phase_the_resident_did_all_of_ends_early_with_its_lines(s: Setup,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """tell_early is True (cli.py then ends the phase without importing the rest of the hook) only
    when the phase has nothing left to do: the stacks stay down by plan (lxc suspend pre-restart,
    the CT still frozen), or the resident started them (post-restart); its lines are printed."""
    s.run(Mode.SUSPEND, "backup-start", "pre-stop", vmtype=LXC)
    capsys.readouterr()
    assert earlymod.tell_early(["pre-restart", "suspend", "101"], s.hook.env) is True
    out = capsys.readouterr().out.splitlines()
    assert out == ["vzdump-hook: pre-restart 101: stacks stay down until post-restart: "
                   "the backup's point in time is still ahead"], out
    assert s.g.running_stacks() == APP_DOWN
    assert earlymod.tell_early(["post-restart", "suspend", "101"], s.hook.env) is True
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("vzdump-hook: post-restart 101: started db, web in "), out
    assert s.g.running_stacks() == ALL_UP and s.record().status is Status.RESUMED


def test_a_failed_start_is_never_ended_early(s: Setup) -> None:
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    s.g.unreachable = True
    # the phase goes on, resumes itself
    assert earlymod.tell_early(["pre-restart", "snapshot", "101"], s.hook.env) is False
    s.g.unreachable = False
    s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
    assert s.g.running_stacks() == ALL_UP and s.record().status is Status.RESUMED


def test_a_resident_gone_before_post_restart_is_replaced_by_one_that_watches(s: Setup) -> None:
    s.spawn_with = s.stand_in
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart")
    s.sleepers[0].kill()
    s.sleepers[0].wait()
    s.spawn_with = s.in_thread
    s.run(Mode.SNAPSHOT, "post-restart")
    assert s.spawn.call_count == 2 and s.info().watching
    assert wait_for(lambda: s.ask()["state"] == "watching", SETTLE)
    s.double.start_job()
    assert wait_for(lambda: s.g.running_stacks() == ALL_UP, SETTLE)
    assert s.ended(SETTLE) and s.g.starts() == ["db", "web"]


def test_lines_of_an_answer_nobody_read_are_kept_for_a_later_phase(s: Setup,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    _, _, sock = s.files()
    short = Path(tempfile.mkdtemp(prefix="link-", dir="/tmp"))
    try:
        (short / "s").symlink_to(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:  # a phase that gave up waiting
            c.connect(str(short / "s"))
            c.sendall(json.dumps({"phase": "pre-restart"}).encode() + b"\n")
    finally:
        shutil.rmtree(short)
    assert wait_for(lambda: s.g.running_stacks() == ALL_UP, SETTLE)
    assert s.ended(SETTLE)
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("[")]  # its log file
    assert [text for _, text in out if "started db, web" in text], out


def test_job_end_warns_of_a_live_resident_only_while_its_stacks_are_down(s: Setup,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    s.spawn_with = s.stand_in  # alive at job-end (e.g. still closing its session), not answering
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end")
    assert s.g.running_stacks() == ALL_UP and s.record().status is Status.RESUMED
    caplog.clear()
    assert s.hook("job-end") == 0
    assert not [m for lv, m in task_log(caplog) if lv >= logging.WARNING], task_log(caplog)


def test_ends_at_its_deadline_leaving_the_marker(s: Setup, caplog: pytest.LogCaptureFixture) -> None:
    s.deadline = 1.0
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    assert s.ended(10)
    deadline_lines = [r for r in resident_said(caplog, "resident 101: the marker's deadline has passed")
                      if r.levelno == logging.WARNING]
    assert len(deadline_lines) == 1
    assert s.g.running_stacks() == APP_DOWN and MARKER in s.g.files  # the guest's recovery takes over
    assert s.record().status is Status.QUIESCED
    s.run(Mode.SNAPSHOT, "backup-end")  # the phases still resume
    assert s.g.running_stacks() == ALL_UP


def test_run_dir_wiped_it_listens_again_and_resumes_from_what_it_remembered(s: Setup,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    r = s.resident()
    assert wait_for(lambda: r.remembered is not None and r.remembered.status is Status.QUIESCED, SETTLE)
    info_file, _, sock = s.files()
    shutil.rmtree(s.hook.env[RUN_DIR_ENV])
    assert not sock.exists() and s.state().load(101) is None
    assert wait_for(sock.exists, SETTLE), "it listens again"
    assert stat.S_ISSOCK(sock.stat().st_mode) and info_file.exists()
    assert resident_said(caplog, "resident 101: its socket is gone")
    caplog.clear()
    s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
    assert s.g.running_stacks() == ALL_UP and s.g.starts() == ["db", "web"]
    assert [m for _, m in task_log(caplog) if "started db, web" in m][0].startswith("pre-restart 101: started")
    assert s.ended(SETTLE)


def test_sigterm_waits_for_a_start_under_way_else_ends_at_once(s: Setup) -> None:
    s.spawn_with = s.stand_in
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    r = Resident(s.info(), str(s.files()[0]))
    r.critical = True
    r.on_term(signal.SIGTERM, None)
    assert r.stop_requested
    r.critical = False
    with pytest.raises(BaseException) as e:
        r.on_term(signal.SIGTERM, None)
    assert type(e.value).__name__ == "_Stopped"


def test_tell_works_with_a_socket_path_longer_than_the_kernels_limit(s: Setup) -> None:
    s.hook.env[RUN_DIR_ENV] = str(s.hook.tmp / ("a-long-run-directory-" * 6))
    s.run(Mode.SNAPSHOT, "backup-start", "pre-stop", vmtype=LXC)
    _, _, sock = s.files()
    assert len(str(sock).encode()) > 108
    assert wait_for(sock.exists, SETTLE) and stat.S_ISSOCK(sock.stat().st_mode)
    assert s.ask()["state"] == "waiting"
    s.run(Mode.SNAPSHOT, "pre-restart", vmtype=LXC)
    assert s.g.running_stacks() == ALL_UP and s.ended(SETTLE) and s.resident().status == "done"


# -- the detached process ---------------------------------------------------------------------------

SPAWNER = """
import sys
from vzdump_hook.resident.control import spawn
pid = spawn([sys.executable, "-c", "import os, time; print('daemon', os.getpid(), os.getsid(0), flush=True); time.sleep(60)"], sys.argv[1])
print(pid, flush=True)
"""  # noqa: E501


def _gone(pid: int) -> bool:
    st = earlymod.proc_stat(pid)
    return st is None or st[0] in ("Z", "X")


def test_spawn_detaches_from_the_callers_output_and_session(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    t0 = time.monotonic()
    # as vzdump runs a hook: stdout and stderr are pipes read until EOF
    proc = subprocess.run([sys.executable, "-c", SPAWNER, str(log)], capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    assert time.monotonic() - t0 < 5, "the caller's pipes reached EOF while the daemon runs"
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[-1])
    try:
        assert wait_for(lambda: "daemon" in (log.read_text() if log.exists() else ""), 10)
        _, dpid, sid = log.read_text().split()
        assert int(dpid) == pid and int(sid) != os.getsid(0) and int(sid) != pid  # own session, not its leader
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert fds[0] == "/dev/null" and fds[1] == fds[2] == str(log)
        assert set(fds) == {0, 1, 2}, fds  # no pipe, no lock, nothing else of the caller
        start = process_start(pid)
        assert start is not None and residentmod.running(pid, start)
        residentmod.stop(pid, start, wait=2)
        assert _gone(pid)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_real_resident_answers_stops_on_sigterm_and_ends_at_its_deadline(tmp_path: Path) -> None:
    """`python -m vzdump_hook.resident.process INFO`, armed by arm(): it listens; SIGTERM ends it (its socket
    removed); another one ends by itself at its deadline, and a later phase finds its lines."""
    settings = configuration.HookSettings(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"),
                                          qmp_dir=str(tmp_path / "qmp"))
    me = os.getpid()
    state = HostState(settings, JobId(node_name(), _boot_id(), me, process_start(me) or 0))  # its worker: this test
    table = {"ssh": {"host": "192.0.2.1", "connect_timeout": 0.5}, "stacks": ["web"]}  # nobody there: never reached
    guest = configuration.validate_guest(101, table)
    state.save(GuestRecord(101, "lxc", "stop", table, status=Status.QUIESCED, stop_started=time.time()))
    info_file, log_file, sock = (Path(p) for p in residentmod.paths(state.job_dir, 101))

    info = residentmod.arm(state, guest, "lxc", "stop", time.time() + 60)
    try:
        saved = residentmod.load(str(info_file))
        assert (residentmod.alive(info) and saved is not None
                and (saved.pid, saved.pid_start) == (info.pid, info.pid_start))
        assert wait_for(sock.exists, 10)
        answer = earlymod.tell(state.job_dir, 101, "")
        assert answer is not None and answer["state"] == "waiting" and answer["resumed"] is False
        assert residentmod.arm(state, guest, "lxc", "stop", time.time() + 60).pid == info.pid  # one per guest and job
        assert ([(d, i.vmid, i.pid) for d, i in residentmod.residents(settings.run_dir)]
                == [(state.job_dir, 101, info.pid)])
        t0 = time.monotonic()
        residentmod.stop(info.pid, info.pid_start, wait=5)
        assert time.monotonic() - t0 < 3 and not residentmod.alive(info)
        assert not sock.exists()
        assert residentmod.leftover_lines(state.job_dir, 101) == []  # stopped while waiting: nothing to say
    finally:
        if residentmod.alive(info):
            os.kill(info.pid, signal.SIGKILL)

    info_file.unlink()
    info2 = residentmod.arm(state, guest, "lxc", "stop", time.time() + 1.5)
    try:
        assert info2.pid != info.pid
        assert residentmod.leftover_lines(state.job_dir, 101) == []  # while it runs: its lines come with its answers
        assert wait_for(lambda: not residentmod.alive(info2), 20)
        lines = residentmod.leftover_lines(state.job_dir, 101)
        assert ([lv for lv, text in lines if "resident 101: the marker's deadline has passed" in text]
                == [logging.WARNING]), lines
        assert not log_file.exists() and residentmod.leftover_lines(state.job_dir, 101) == []
        assert state.load(101).status is Status.QUIESCED  # type: ignore[union-attr]
    finally:
        if residentmod.alive(info2):
            os.kill(info2.pid, signal.SIGKILL)


def test_info_file_round_trip_and_unreadable(tmp_path: Path) -> None:
    info = Info(101, "qemu", "stop", JobId("n", "b", 1, 2).to_dict(), {"run_dir": "/r"},
                {"ssh": {"host": "h"}}, 5.0, True, 7, 8)
    p = tmp_path / "resident-101.json"
    p.write_text(json.dumps(info.__dict__))
    assert residentmod.load(str(p)) == info
    p.write_text("{not json")
    assert residentmod.load(str(p)) is None
    assert residentmod.load(str(tmp_path / "none.json")) is None
