"""qemu/qmp.py against QMP on a real unix socket: the QMP double (tests/infra/qmp_double.py) and, for
what the double never does (wrong greeting, silence, garbage, foreign ids), a few raw servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.infra.qmp_double import QmpDouble
from vzdump_hook.qemu import qmp
from vzdump_hook.qemu.qmp import (
    BackupJob,
    QmpBusy,
    QmpCommandError,
    QmpProtocolError,
    QmpUnavailable,
    is_new_job,
    query_backup,
)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory (a unix socket path must fit in 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def double(sock_dir: Path) -> Iterator[QmpDouble]:
    with QmpDouble(sock_dir / "101.qmp") as q:
        yield q


def raw_server(path: Path, session: Callable[[socket.socket], object]) -> threading.Thread:
    """A one-connection server running `session` on the accepted socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                session(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def send(conn: socket.socket, msg: object) -> None:
    conn.sendall(json.dumps(msg).encode() + b"\r\n")


def lines(conn: socket.socket, n: int) -> list[dict[str, object]]:
    f = conn.makefile("rb")
    return [json.loads(f.readline()) for _ in range(n)]


# -- the exchange ---------------------------------------------------------------------------------


def test_no_job_yet_is_an_empty_reply(double: QmpDouble) -> None:
    job = query_backup(double.path)
    assert job == BackupJob() and not job.started and job.describe() == "none"


def test_a_running_job_as_proxmox_reports_it(double: QmpDouble) -> None:
    uuid = double.start_job()
    job = query_backup(double.path)
    assert job.uuid == uuid and job.status == "active" and job.started
    assert job.start_time is not None and abs(job.start_time - time.time()) < 2
    assert job.total == double.total and job.transferred == 0 and job.end_time is None
    double.finish_job()
    done = query_backup(double.path)
    assert done.status == "done" and done.started and done.end_time is not None


def test_one_request_per_connection_and_nothing_held(double: QmpDouble) -> None:
    for _ in range(3):
        query_backup(double.path)
    double.settle()
    clients = double.clients
    assert len(clients) == 3
    assert all(c.commands == ["qmp_capabilities", "query-backup"] for c in clients)
    assert all(c.end is not None and c.duration < 0.5 for c in clients)


def test_events_before_the_reply_are_skipped(double: QmpDouble) -> None:
    assert double.event_before_reply
    uuid = double.start_job()
    assert query_backup(double.path).uuid == uuid


def test_replies_are_matched_by_id(sock_dir: Path) -> None:
    path = sock_dir / "q.qmp"

    def session(conn: socket.socket) -> None:
        send(conn, {"QMP": {"version": {}, "capabilities": []}})
        f = conn.makefile("rb")
        caps = json.loads(f.readline())
        send(conn, {"return": {}, "id": caps["id"]})
        query = json.loads(f.readline())
        assert query["execute"] == "query-backup"
        send(conn, {"timestamp": {"seconds": 1, "microseconds": 0}, "event": "RESUME"})
        send(conn, {"return": {"uuid": "not-this-one", "status": "active", "start-time": 1}, "id": "someone-else"})
        send(conn, {"return": {"uuid": "u", "status": "done", "start-time": 5}, "id": query["id"]})

    t = raw_server(path, session)
    job = query_backup(str(path))
    t.join(5)
    assert (job.uuid, job.status, job.start_time) == ("u", "done", 5)


def test_commands_before_negotiation_are_refused_by_the_double(double: QmpDouble) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(double.path)
        f = s.makefile("rb")
        assert "QMP" in json.loads(f.readline())
        s.sendall(b'{"execute": "query-backup", "id": 1}\r\n')
        reply = json.loads(f.readline())
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 1


# -- failures -------------------------------------------------------------------------------------


def test_socket_gone(double: QmpDouble) -> None:
    double.remove()
    with pytest.raises(QmpUnavailable, match="No such file"):
        query_backup(double.path)


def test_socket_left_behind_by_a_dead_qemu_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "dead.qmp"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nothing listens
    with pytest.raises(QmpUnavailable, match="refused"):
        query_backup(str(path))


def test_busy_socket_no_greeting_in_time(double: QmpDouble) -> None:
    double.hold(1.5)
    t0 = time.monotonic()
    with pytest.raises(QmpBusy, match="another client holds the monitor"):
        query_backup(double.path, timeout=0.3)
    assert time.monotonic() - t0 < 0.6
    time.sleep(1.5)
    assert query_backup(double.path) == BackupJob()  # free again; the given-up connection did no harm


def test_full_backlog_is_busy_at_once(double: QmpDouble) -> None:
    double.hold(2)
    pending = []
    try:
        while True:  # fill the listen backlog behind the holder
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(0.2)
            try:
                s.connect(double.path)
            except OSError:
                s.close()
                break
            pending.append(s)
            assert len(pending) < 64
        t0 = time.monotonic()
        with pytest.raises(QmpBusy):
            query_backup(double.path, timeout=1.0)
        assert time.monotonic() - t0 < 0.5
    finally:
        for s in pending:
            s.close()


def test_silent_server_times_out(sock_dir: Path) -> None:
    path = sock_dir / "silent.qmp"
    release = threading.Event()
    t = raw_server(path, lambda conn: release.wait(5))
    t0 = time.monotonic()
    with pytest.raises(QmpBusy):
        query_backup(str(path), timeout=0.3)
    assert time.monotonic() - t0 < 1.0
    release.set()
    t.join(5)


def test_no_reply_after_the_greeting_times_out(sock_dir: Path) -> None:
    path = sock_dir / "mute.qmp"
    release = threading.Event()

    def session(conn: socket.socket) -> None:
        send(conn, {"QMP": {"version": {}, "capabilities": []}})
        release.wait(5)

    t = raw_server(path, session)
    with pytest.raises(QmpBusy, match="no reply"):
        query_backup(str(path), timeout=0.3)
    release.set()
    t.join(5)


@pytest.mark.parametrize(("greeting", "error"), [
    (b'{"hello": 1}\r\n', "no QMP greeting"),
    (b"SSH-2.0-OpenSSH\r\n", "not JSON"),
    (b"[1, 2]\r\n", "not a JSON object"),
    (b"", "closed the connection|connection closed before the greeting"),
])
def test_not_qmp(sock_dir: Path, greeting: bytes, error: str) -> None:
    path = sock_dir / "x.qmp"
    t = raw_server(path, lambda conn: conn.sendall(greeting))
    with pytest.raises((QmpProtocolError, QmpUnavailable), match=error):
        query_backup(str(path), timeout=1.0)
    t.join(5)


def test_oversized_message(sock_dir: Path) -> None:
    path = sock_dir / "big.qmp"
    t = raw_server(path, lambda conn: conn.sendall(b"{" + b" " * (qmp.MAX_MESSAGE + 70000)))
    with pytest.raises(QmpProtocolError, match="over"):
        query_backup(str(path), timeout=2.0)
    t.join(5)


def test_qemu_without_proxmox_patches(sock_dir: Path) -> None:
    with QmpDouble(sock_dir / "q.qmp", pve=False) as q:
        with pytest.raises(QmpCommandError, match="CommandNotFound") as e:
            query_backup(q.path)
    assert e.value.error_class == "CommandNotFound"


def test_execute_passes_arguments(double: QmpDouble) -> None:
    assert qmp.execute(double.path, "query-status")["status"] == "running"


# -- what a reply means ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[], "x", {"uuid": 5}, {"start-time": "now"}, {"total": True}])
def test_query_backup_reply_of_the_wrong_shape(value: object) -> None:
    with pytest.raises(QmpProtocolError):
        BackupJob.from_return(value)


def test_round_trip_for_the_watch_file() -> None:
    job = BackupJob("u", "done", 100, 200)
    assert BackupJob.from_return(job.to_dict()) == job


BEFORE = BackupJob("old", "done", 1000, 1600)
NOW = 2000


@pytest.mark.parametrize(("job", "new"), [
    (BackupJob("new", "active", NOW), True),
    (BackupJob("new", "done", NOW, NOW + 1), True),  # started and finished between two polls
    (BackupJob("new", "active", NOW + 30), True),
    (BEFORE, False),  # the leftover job of an earlier backup
    (BackupJob("old", "active", NOW), False),  # its uuid, whatever else
    (BackupJob("new", "active", NOW - 1), False),  # started before the stop: not this backup's
    (BackupJob("new", "error", NOW), False),  # failed: vzdump fails the backup, backup-abort resumes
    (BackupJob("new", None, NOW), False),
    (BackupJob("new", "active", None), False),
    (BackupJob(), False),  # a new QEMU process (stop mode) before the job
    # an external backup provider's access (pve-qemu's backup-access-setup): no uuid, no QEMU job
    (BackupJob(None, "active", NOW), True),
    (BackupJob(None, "done", NOW, NOW + 40), True),
    (BackupJob(None, "active", NOW - 1), False),  # set up before the stop
])
def test_is_new_job(job: BackupJob, new: bool) -> None:
    assert is_new_job(job, BEFORE, NOW) is new


def test_a_providers_access_left_from_an_earlier_backup_is_not_this_ones() -> None:
    """Two accesses have no uuid to tell them apart: the start time does (QEMU sets it at each setup)."""
    earlier = BackupJob(None, "done", NOW, NOW + 40)
    assert not is_new_job(earlier, earlier, NOW)
    assert is_new_job(BackupJob(None, "active", NOW + 60), earlier, NOW)
    assert is_new_job(BackupJob("u", "active", NOW + 60), earlier, NOW)  # a regular job after an access


def test_is_new_job_with_no_job_before() -> None:
    assert is_new_job(BackupJob("u", "active", NOW), BackupJob(), NOW)


def test_socket_path_is_from_the_settings() -> None:
    from vzdump_hook.config import HookSettings
    from vzdump_hook.qemu.watcher import socket_path

    assert socket_path(HookSettings(), 101) == "/var/run/qemu-server/101.qmp"
    assert socket_path(HookSettings(qmp_dir="/tmp/q"), 7) == os.path.join("/tmp/q", "7.qmp")
