"""qemu/watcher.py: the early-resume watcher.

- The hook's side in-process (run_phase per phase, a FakeGuest behind open_transport, the QMP double on
  a real socket): what pre-stop notes, where the watcher is armed, that the ending phases stop it and
  print its lines; `spawn` is replaced by a stand-in process so that no real watcher runs.
- The watcher's loop in a thread against the double: resumes once, only for the new job, backs off a
  busy socket, waits out a replaced QEMU (stop mode), falls back when anything is unclear.
- The real detached process: it does not keep the caller's stdout/stderr, survives the caller, and is
  gone after disarm or its deadline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from pytest_mock import MockerFixture

from tests.infra.qmp_double import QmpDouble
from vzdump_hook.job import JobId, process_start
from vzdump_hook.phases import GuestType, Mode
from vzdump_hook.qemu import watcher as watchmod
from vzdump_hook.qemu.qmp import BackupJob
from vzdump_hook.qemu.watcher import Watch, Watcher
from vzdump_hook.state import Status

from .test_hook import ALL_UP, APP_DOWN, Hook

QEMU, LXC = GuestType.QEMU, GuestType.LXC
WATCHER_PY = [sys.executable, "-m", "vzdump_hook.qemu.watcher"]


class Setup:
    """A Hook (test_hook.py) whose QMP directory holds the double's socket for guest 101."""

    def __init__(self, hook: Hook, double: QmpDouble, spawn: MagicMock) -> None:
        self.hook = hook
        self.double = double
        self.spawn = spawn
        self.threads: list[threading.Thread] = []

    @property
    def g(self):  # type: ignore[no-untyped-def]
        return self.hook.g

    def run(self, mode: Mode, *phases: str, vmtype: GuestType = QEMU) -> None:
        for p in phases:
            assert self.hook(p, mode, 101, vmtype) == 0, p

    def paths(self) -> tuple[Path, Path]:
        w, log = watchmod._paths(self.hook.state(), 101)
        return Path(w), Path(log)

    def watch(self) -> Watch:
        w = watchmod.load(str(self.paths()[0]))
        assert w is not None
        return w

    def start_watcher(self, deadline: float = 20.0) -> threading.Thread:
        """The watcher of the current watch file, in a thread (as the spawned process would run it)."""
        w = self.watch()
        w.deadline = time.time() + deadline
        t = threading.Thread(target=Watcher(w).run, daemon=True)
        t.start()
        self.threads.append(t)
        return t


@pytest.fixture
def qemu(tmp_path: Path, mocker: MockerFixture, caplog: pytest.LogCaptureFixture) -> Iterator[Setup]:
    caplog.set_level(logging.INFO, logger="vzdump_hook")
    hook = Hook(tmp_path, mocker)
    qmp_dir = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))  # a socket path must be short
    hook.qmp_dir = qmp_dir
    hook.configure()
    sleepers: list[subprocess.Popen[bytes]] = []

    def fake_spawn(argv: list[str], log_path: str) -> int:
        """A stand-in process in place of the watcher (disarm may signal it)."""
        p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
        sleepers.append(p)
        return p.pid

    spawn = mocker.patch("vzdump_hook.qemu.watcher.spawn", side_effect=fake_spawn)
    with QmpDouble(qmp_dir / "101.qmp", leftover=True) as double:
        s = Setup(hook, double, spawn)
        yield s
        for t in s.threads:
            t.join(30)
    for p in sleepers:
        p.kill()
        p.wait()
    shutil.rmtree(qmp_dir, ignore_errors=True)


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [m for m in caplog.messages if text in m]


# -- the hook's side ------------------------------------------------------------------------------


def test_snapshot_notes_the_job_at_pre_stop_and_arms_at_post_restart(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    leftover = qemu.double.job
    assert leftover is not None
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    w = qemu.watch()
    assert w.before["uuid"] == leftover["uuid"] and w.before["status"] == "done"
    assert w.not_before <= time.time() and w.qmp == qemu.double.path and w.mode == "snapshot"
    assert qemu.double.watcher_clients(), "pre-stop asked QMP"
    assert not qemu.spawn.called
    qemu.run(Mode.SNAPSHOT, "pre-restart")
    assert not qemu.spawn.called
    qemu.run(Mode.SNAPSHOT, "post-restart")
    (argv, log_path), _ = qemu.spawn.call_args
    watch_file, log_file = qemu.paths()
    assert argv == [*WATCHER_PY, str(watch_file)] and log_path == str(log_file)
    w = qemu.watch()
    rec = qemu.hook.state().load(101)
    assert rec is not None and rec.stop_started is not None
    assert w.pid > 0 and w.deadline == pytest.approx(rec.stop_started + 600)
    assert messages(caplog, "post-restart 101: watching ") and leftover["uuid"][:8] in messages(caplog, "watching")[0]
    assert qemu.g.running_stacks() == APP_DOWN  # arming starts nothing
    qemu.run(Mode.SNAPSHOT, "backup-end")
    assert not watchmod.running(w.pid, w.pid_start)  # disarmed: the process is stopped
    assert not watch_file.exists()
    assert qemu.g.running_stacks() == ALL_UP and "backup-end 101: started db, web" in " ".join(caplog.messages)


@pytest.mark.parametrize("mode", [Mode.SUSPEND, Mode.STOP])
def test_suspend_and_stop_arm_at_pre_stop_after_the_stop(qemu: Setup, mode: Mode) -> None:
    seen: list[list[str]] = []

    def spawn(argv: list[str], log_path: str) -> int:
        seen.append(qemu.g.running_stacks())
        return 0  # no process

    qemu.spawn.side_effect = spawn
    qemu.run(mode, "backup-start", "pre-stop")
    assert seen == [APP_DOWN]  # armed once, after the stacks stopped
    qemu.run(mode, "backup-end", "pre-restart", "post-restart", "log-end")
    assert qemu.spawn.call_count == 1
    assert qemu.g.running_stacks() == ALL_UP


def test_early_resume_off_in_the_config(qemu: Setup) -> None:
    qemu.hook.configure("early_resume = false")
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end", "log-end")
    assert qemu.double.clients == [] and not qemu.spawn.called
    assert qemu.g.running_stacks() == ALL_UP


def test_lxc_guests_never_ask_qmp(qemu: Setup) -> None:
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end", "log-end", vmtype=LXC)
    assert qemu.double.clients == [] and not qemu.spawn.called


def test_no_socket_means_no_watcher_and_backup_end_resumes(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    qemu.double.remove()
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    assert not qemu.spawn.called and not qemu.paths()[0].exists()
    off = messages(caplog, "early resume off")
    assert len(off) == 1 and off[0].startswith("pre-stop 101: early resume off (QMP ") and "No such file" in off[0]
    assert qemu.g.running_stacks() == APP_DOWN
    qemu.run(Mode.SNAPSHOT, "backup-end")
    assert qemu.g.running_stacks() == ALL_UP
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_qemu_without_query_backup_means_no_watcher(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    qemu.double.pve = False
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    assert not qemu.spawn.called
    assert any("CommandNotFound" in m for m in messages(caplog, "early resume off"))


def test_socket_busy_for_too_long_at_pre_stop(qemu: Setup, mocker: MockerFixture, caplog: pytest.LogCaptureFixture) -> None:
    mocker.patch.object(watchmod, "NOTE_WAIT", 0.5)
    qemu.double.hold(2)
    t0 = time.monotonic()
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    assert time.monotonic() - t0 < 3
    assert any("busy" in m for m in messages(caplog, "early resume off"))
    qemu.run(Mode.SNAPSHOT, "pre-restart", "post-restart")
    assert not qemu.spawn.called


def test_busy_socket_at_pre_stop_is_retried(qemu: Setup) -> None:
    qemu.double.hold(0.6)
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop")
    assert qemu.watch().before["status"] == "done"


def test_nothing_stopped_arms_nothing(qemu: Setup) -> None:
    qemu.hook.configure('stacks = ["absent"]')
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    assert not qemu.spawn.called


def test_spawn_failure_is_a_warning_and_backup_end_resumes(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    from vzdump_hook.errors import HookError

    qemu.spawn.side_effect = HookError("the watcher process could not be started")
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    assert any(r.levelno == logging.WARNING and "post-restart 101: early resume off" in r.getMessage() for r in caplog.records)
    qemu.run(Mode.SNAPSHOT, "backup-end")
    assert qemu.g.running_stacks() == ALL_UP


def test_the_ending_phase_prints_the_watchers_lines_once(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    _, log_file = qemu.paths()
    log_file.write_text("vzdump-hook: watcher 101: QEMU backup job u at 12:00:00\n"
                        "vzdump-hook: WARNING: watcher 101: something odd\n"
                        "Traceback (most recent call last):\n")
    caplog.clear()
    qemu.run(Mode.SNAPSHOT, "backup-end")
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert records[:3] == [(logging.INFO, "watcher 101: QEMU backup job u at 12:00:00"),
                           (logging.WARNING, "watcher 101: something odd"),
                           (logging.WARNING, "watcher 101: Traceback (most recent call last):")]
    caplog.clear()
    qemu.run(Mode.SNAPSHOT, "log-end")
    assert not messages(caplog, "watcher")
    assert not log_file.exists()


@pytest.mark.parametrize("ending", ["backup-abort", "log-end", "job-end", "job-abort"])
def test_every_ending_phase_stops_the_watcher(qemu: Setup, ending: str) -> None:
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart")
    w = qemu.watch()
    assert watchmod.running(w.pid, w.pid_start)
    if ending.startswith("job-"):
        qemu.hook(ending)
    else:
        qemu.run(Mode.SNAPSHOT, ending)
    assert not watchmod.running(w.pid, w.pid_start)
    assert qemu.g.running_stacks() == ALL_UP


def test_arming_twice_keeps_the_running_watcher(qemu: Setup) -> None:
    qemu.run(Mode.SNAPSHOT, "backup-start", "pre-stop", "pre-restart", "post-restart", "post-restart")
    assert qemu.spawn.call_count == 1


# -- the watcher's loop ---------------------------------------------------------------------------


def armed(qemu: Setup, mode: Mode = Mode.SNAPSHOT) -> None:
    if mode is Mode.SNAPSHOT:
        qemu.run(mode, "backup-start", "pre-stop", "pre-restart", "post-restart")
    else:
        qemu.run(mode, "backup-start", "pre-stop")
    assert qemu.spawn.called


def wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_resumes_right_after_the_job_starts_and_only_then(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(qemu)
    t = qemu.start_watcher()
    time.sleep(0.6)
    assert qemu.g.running_stacks() == APP_DOWN  # the leftover job does not count
    asked = len(qemu.double.watcher_clients())
    assert asked >= 3  # it keeps asking, one connection each
    uuid = qemu.double.start_job()
    started = time.monotonic()
    assert wait_for(lambda: qemu.g.running_stacks() == ALL_UP, 5)
    assert time.monotonic() - started < 1.0
    t.join(5)
    assert not t.is_alive()
    rec = qemu.hook.state().load(101)
    assert rec is not None and rec.status is Status.RESUMED and rec.downtime is not None
    assert any(m.startswith(f"watcher 101: QEMU backup job {uuid} at ") for m in caplog.messages)
    assert any(m.startswith("watcher 101: started db, web in ") and ", down " in m for m in caplog.messages)
    qemu.double.settle()
    assert all(c.duration < 0.5 for c in qemu.double.watcher_clients())  # never held the socket
    # backup-end finds it done: nothing started twice
    qemu.run(Mode.SNAPSHOT, "backup-end", "log-end")
    assert qemu.g.starts() == ["db", "web"]


def test_the_leftover_job_never_counts(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(qemu)
    t = qemu.start_watcher(deadline=1.0)
    t.join(10)
    assert not t.is_alive()
    assert qemu.g.running_stacks() == APP_DOWN
    assert messages(caplog, "watcher 101: no QEMU backup job start seen by its deadline")
    qemu.run(Mode.SNAPSHOT, "backup-end")
    assert qemu.g.running_stacks() == ALL_UP


def test_a_job_started_before_the_stop_never_counts(qemu: Setup) -> None:
    qemu.double.job = None
    armed(qemu)
    uuid = qemu.double.start_job()
    assert qemu.double.job is not None
    qemu.double.job["start-time"] = qemu.watch().not_before - 1  # QEMU says: before the stacks stopped
    t = qemu.start_watcher(deadline=0.8)
    t.join(10)
    assert qemu.g.running_stacks() == APP_DOWN, uuid


def test_busy_socket_backs_off_then_detects(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(qemu)
    qemu.double.hold(1.5)
    held_until = time.monotonic() + 1.5
    qemu.double.start_job()
    t = qemu.start_watcher()
    assert wait_for(lambda: qemu.g.running_stacks() == ALL_UP, 10)
    assert time.monotonic() >= held_until - 0.1
    t.join(5)
    line = next(m for m in caplog.messages if m.startswith("watcher 101: QEMU backup job"))
    assert "QMP busy" in line and "backed off" in line
    tries = [c for c in qemu.double.clients if not c.holder and c.start < held_until]
    assert len(tries) <= 8, "backs off rather than hammering the socket"


def test_stop_mode_qemu_replaced_then_the_guest_boots(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    qemu.hook.configure("resume_wait = 10")
    armed(qemu, Mode.STOP)
    qemu.double.remove()  # vzdump shuts the VM down: QEMU exits
    qemu.g.unreachable = True
    t = qemu.start_watcher()
    time.sleep(0.5)
    qemu.double.restore()  # started paused: a new QEMU process, no job yet
    time.sleep(0.3)
    qemu.double.start_job()  # the point in time; then the VM boots
    time.sleep(1.0)
    assert qemu.g.running_stacks() == APP_DOWN
    qemu.g.unreachable = False
    assert wait_for(lambda: qemu.g.running_stacks() == ALL_UP, 10)
    t.join(5)
    assert messages(caplog, "watcher 101: started db, web")


def test_stop_mode_guest_that_does_not_come_back(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    qemu.hook.configure("resume_wait = 1")
    armed(qemu, Mode.STOP)
    qemu.g.unreachable = True
    qemu.double.start_job()
    t = qemu.start_watcher()
    t.join(15)
    assert not t.is_alive()
    assert any(r.levelno == logging.WARNING and "did not answer after the restart" in r.getMessage() for r in caplog.records)
    rec = qemu.hook.state().load(101)
    assert rec is not None and rec.status is Status.QUIESCED  # left to backup-end
    qemu.g.unreachable = False
    qemu.run(Mode.STOP, "backup-end")
    assert qemu.g.running_stacks() == ALL_UP


def test_a_failed_job_is_left_to_vzdump(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(qemu)
    t = qemu.start_watcher()
    qemu.double.fail_job()
    qemu.double.job["uuid"] = "failed-one"  # type: ignore[index]
    t.join(5)
    assert not t.is_alive() and qemu.g.running_stacks() == APP_DOWN
    assert messages(caplog, "watcher 101: QEMU backup job failed-one failed (backup write failed")
    qemu.run(Mode.SNAPSHOT, "backup-abort")
    assert qemu.g.running_stacks() == ALL_UP


def test_qmp_that_stops_making_sense_is_left_to_backup_end(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(qemu)
    qemu.double.pve = False
    t = qemu.start_watcher()
    t.join(5)
    assert not t.is_alive() and qemu.g.running_stacks() == APP_DOWN
    assert any(r.levelno == logging.WARNING and "CommandNotFound" in r.getMessage() and "backup-end" in r.getMessage() for r in caplog.records)


def test_racing_backup_end_starts_the_stacks_once(qemu: Setup) -> None:
    armed(qemu)

    def slow(verb: str, detail: str) -> None:
        if verb == "compose-start":
            time.sleep(0.3)

    qemu.g.on_call = slow
    qemu.double.start_job()
    t = qemu.start_watcher()
    assert wait_for(lambda: "compose-start" in [v for v, _ in qemu.g.calls], 5)
    qemu.run(Mode.SNAPSHOT, "backup-end")  # waits for the watcher's resume (the lock), then sees it done
    t.join(5)
    assert qemu.g.starts() == ["db", "web"]
    assert qemu.g.running_stacks() == ALL_UP


def test_resumed_elsewhere_ends_the_watcher(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(qemu)
    qemu.hook.state()  # same job
    t = qemu.start_watcher()
    time.sleep(0.3)
    rec = qemu.hook.state().load(101)
    assert rec is not None
    rec.status = Status.RESUMED
    qemu.hook.state().save(rec)
    t.join(5)
    assert not t.is_alive() and qemu.g.starts() == []
    assert not messages(caplog, "watcher 101")


def test_vzdump_job_over_ends_the_watcher(qemu: Setup, caplog: pytest.LogCaptureFixture) -> None:
    armed(qemu)
    w = qemu.watch()
    w.job = {**w.job, "boot": "before-a-reboot"}
    w.deadline = time.time() + 20
    t = threading.Thread(target=Watcher(w).run)
    t.start()
    t.join(5)
    assert not t.is_alive() and qemu.g.running_stacks() == APP_DOWN
    assert messages(caplog, "watcher 101: its vzdump job is over")


def test_a_failed_first_resume_is_retried(qemu: Setup, mocker: MockerFixture, caplog: pytest.LogCaptureFixture) -> None:
    """The guest agent refuses commands while the file systems are still frozen (vzdump thaws right
    after the job start): the watcher tries again shortly after."""
    mocker.patch.object(watchmod, "RETRY_PAUSE", 0.2)
    armed(qemu)
    frozen = {"left": 1}

    def refuse(verb: str, detail: str) -> None:
        if verb == "read" and frozen["left"]:  # the resume's first command: the marker
            frozen["left"] -= 1
            from vzdump_hook.errors import TransportError

            raise TransportError("guest-exec: the agent is in frozen state")

    qemu.g.on_call = refuse
    qemu.double.start_job()
    t = qemu.start_watcher()
    t.join(10)
    assert qemu.g.running_stacks() == ALL_UP
    assert messages(caplog, "watcher 101: resume failed") and messages(caplog, "watcher 101: started db, web")


def test_sigterm_waits_for_a_resume_under_way_else_ends_at_once(qemu: Setup) -> None:
    armed(qemu)
    w = Watcher(qemu.watch())
    w.critical = True
    w.on_term(signal.SIGTERM, None)
    assert w.stop_requested
    w.critical = False
    with pytest.raises(BaseException) as e:
        w.on_term(signal.SIGTERM, None)
    assert type(e.value).__name__ == "_Stopped"


def test_orphaned_watch_file_and_unreadable_ones(qemu: Setup) -> None:
    state = qemu.hook.state()
    assert watchmod.arm(state, 101, time.time() + 10) is None  # nothing noted: no watcher
    path, _ = watchmod._paths(state, 101)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_text("{not json")
    lines = watchmod.disarm(state, 101, wait=1)
    assert len(lines) == 1 and "unreadable" in lines[0]


# -- the detached process -------------------------------------------------------------------------

SPAWNER = """
import sys, time
from vzdump_hook.qemu.watcher import spawn
pid = spawn([sys.executable, "-c", "import os, time; print('daemon', os.getpid(), os.getsid(0), flush=True); time.sleep(60)"], sys.argv[1])
print(pid, flush=True)
"""


def _gone(pid: int) -> bool:
    st = watchmod._stat(pid)
    return st is None or st[0] in ("Z", "X")


def test_spawn_detaches_from_the_callers_output_and_session(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
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
        assert start is not None and watchmod.running(pid, start)
        watchmod.stop(pid, start, wait=2)
        assert _gone(pid)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_real_watcher_process_ends_at_disarm_and_at_its_deadline(tmp_path: Path) -> None:
    """`python -m vzdump_hook.qemu.watcher`, armed by arm(): polls until disarmed, prints its lines;
    another one ends by itself at its deadline."""
    from vzdump_hook.config import HookSettings
    from vzdump_hook.state import GuestRecord, HostState

    qmp_dir = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
    try:
        settings = HookSettings(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"), qmp_dir=str(qmp_dir))
        state = HostState(settings, JobId.current())
        table = {"ssh": {"host": "192.0.2.1", "connect_timeout": 0.5}}  # nobody there: the guest is never reached
        state.save(GuestRecord(101, "qemu", "snapshot", table, status=Status.QUIESCED, stop_started=time.time()))
        with QmpDouble(qmp_dir / "101.qmp", leftover=True) as double:
            watchmod.note_backup_job(state, 101, "snapshot", time.monotonic() + 5)
            w = watchmod.arm(state, 101, time.time() + 60)
            assert w is not None and watchmod.running(w.pid, w.pid_start)
            assert wait_for(lambda: len(double.watcher_clients()) >= 3, 10), "it polls QMP"
            t0 = time.monotonic()
            lines = watchmod.disarm(state, 101, wait=5)
            assert time.monotonic() - t0 < 2 and not watchmod.running(w.pid, w.pid_start)
            assert lines == []  # nothing to say: it was stopped while waiting
            # the second one: its deadline comes first
            watchmod.note_backup_job(state, 101, "snapshot", time.monotonic() + 5)
            w2 = watchmod.arm(state, 101, time.time() + 1.5)
            assert w2 is not None
            assert wait_for(lambda: not watchmod.running(w2.pid, w2.pid_start), 15)
            lines = watchmod.disarm(state, 101, wait=1)
            assert any("no QEMU backup job start seen by its deadline" in ln for ln in lines), lines
    finally:
        shutil.rmtree(qmp_dir, ignore_errors=True)


def test_watch_file_round_trip(tmp_path: Path) -> None:
    w = Watch(101, "stop", "/x/101.qmp", BackupJob("u", "done", 1).to_dict(), 5, JobId("n", "b", 1, 2).to_dict(), {"run_dir": "/r"})
    p = tmp_path / "w.json"
    p.write_text(json.dumps(w.__dict__))
    back = watchmod.load(str(p))
    assert back == w and back.before_job == BackupJob("u", "done", 1) and back.job_id() == JobId("n", "b", 1, 2)
