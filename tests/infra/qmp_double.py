"""A QMP server double on a real unix socket: QEMU's monitor as the early-resume watcher sees it.

Wire protocol as QEMU speaks it (docs/interop/qmp-spec): on accept the server sends its greeting
``{"QMP": {"version": {...}, "capabilities": ["oob"]}}``; until the client sends
``qmp_capabilities`` every other command is answered with a ``CommandNotFound`` error; replies carry
the ``id`` of their command; every message is one JSON object followed by ``\\r\\n``; asynchronous
events (``{"event": ..., "data": ..., "timestamp": ...}``) may come before any reply
(``event_before_reply``).

One client at a time, like QEMU's chardev socket server: the next connection waits in the listen
backlog - its ``connect`` succeeds, its greeting comes only once the current client has left; with
the backlog full a non-blocking connect fails with EAGAIN. :meth:`QmpDouble.hold` makes another
client (vzdump, pvestatd) hold the socket for a while.

``query-backup`` answers like Proxmox VE's QEMU (pve-backup.c ``qmp_query_backup``): ``{}`` while
this QEMU process has run no backup job, else ``status`` (``active``, ``done``, ``error``), ``uuid``,
``start-time`` (``time(NULL)``), ``end-time`` once ended, ``backup-file``, ``total``,
``transferred``, ``zero-bytes``, ``reused``, ``dirty``, ``finishing``, ``errmsg`` on error.
``pve=False`` is a QEMU without Proxmox VE's patches: ``query-backup`` is ``CommandNotFound``.

Test controls: :meth:`start_job` (the backup's point in time), :meth:`finish_job`,
:meth:`fail_job`, ``leftover=True`` (a finished job of an earlier backup, before the test begins),
:meth:`remove` (QEMU stopped: the socket is gone) and :meth:`restore` (a new QEMU process: a new
socket, no job), and :attr:`clients`: every connection with its times and commands, so a test can
check that nobody held the socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Client", "QmpDouble"]

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, "package": "pve-qemu-kvm_9.0.0-1"},
                    "capabilities": ["oob"]}}
IDLE_LIMIT = 30.0  # a client silent for this long is dropped (QEMU would wait forever; a test must not)


@dataclass
class Client:
    """One connection the double served."""

    start: float  # monotonic, when it was accepted (greeting sent)
    end: float | None = None
    commands: list[str] = field(default_factory=list)
    holder: bool = False  # made by hold(): another client that sits on the socket

    @property
    def duration(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start


def _now_ts() -> dict[str, int]:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1_000_000)}


class QmpDouble:
    """A QMP socket at ``path`` (created now; ``close()`` removes it)."""

    def __init__(self, path: str | os.PathLike[str], *, leftover: bool = False, event_before_reply: bool = True,
                 pve: bool = True, total: int = 32 * 1024**3) -> None:
        self.path = os.fspath(path)
        self.event_before_reply = event_before_reply
        self.pve = pve
        self.total = total
        self.clients: list[Client] = []
        self.job: dict[str, Any] | None = None
        self.job_started_at: float | None = None  # monotonic time of start_job()
        self.job_started_wall: float | None = None  # and its wall-clock time (start-time has whole seconds)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None  # the client being served
        self._thread: threading.Thread | None = None
        self._holders: list[threading.Thread] = []
        self._closing = threading.Event()
        if leftover:
            start = int(time.time()) - 86400
            self.job = self._new_job(start, "done")
            self.job["end-time"] = start + 600
            self.job["transferred"] = total
        self.restore(keep_job=True)

    # ------------------------------------------------------------------ the backup job

    def _new_job(self, start: int, status: str) -> dict[str, Any]:
        return {"uuid": str(uuidlib.uuid4()), "status": status, "start-time": start,
                "backup-file": "/var/lib/vz/dump/vzdump-qemu-101.vma.zst", "transferred": 0}

    def start_job(self) -> str:
        """QEMU starts a backup job now (vzdump's QMP ``backup``); returns its uuid."""
        with self._lock:
            self.job_started_wall = time.time()
            self.job = self._new_job(int(self.job_started_wall), "active")
            self.job_started_at = time.monotonic()
            return str(self.job["uuid"])

    def start_access(self) -> None:
        """An external backup provider's access is set up now (qemu-server's ``backup-access-setup``,
        PVE 8.4+): pve-qemu's initialize_backup_state_stat(NULL, NULL, total, false) sets the start
        time and an empty uuid, no backup file, and starts no QEMU job; query-backup says ``active``.
        (Read from pve-qemu's patch series for Proxmox VE, the patch "PVE backup: implement backup access setup and
        teardown API for external providers", Fiona Ebner, 2025-04-03: qmp_backup_access_setup and
        qmp_query_backup.)"""
        with self._lock:
            self.job_started_wall = time.time()
            self.job = {"uuid": "", "status": "active", "start-time": int(self.job_started_wall), "transferred": 0}
            self.job_started_at = time.monotonic()

    def finish_job(self) -> None:
        with self._lock:
            assert self.job is not None
            self.job.update({"status": "done", "end-time": int(time.time()), "transferred": self.total})

    def fail_job(self, message: str = "backup write failed: No space left on device") -> None:
        with self._lock:
            if self.job is None:
                self.job = self._new_job(int(time.time()), "error")
            self.job.update({"status": "error", "end-time": int(time.time()), "errmsg": message})

    def _query_backup(self) -> dict[str, Any]:
        with self._lock:
            j = dict(self.job) if self.job is not None else None
        if j is None:
            return {}
        out: dict[str, Any] = {
            "status": j["status"], "uuid": j["uuid"], "start-time": j["start-time"],
            "total": self.total, "transferred": j["transferred"], "zero-bytes": 0, "reused": 0,
            "dirty": self.total, "finishing": False,
        }
        if "backup-file" in j:  # none for a provider's access
            out["backup-file"] = j["backup-file"]
        if "end-time" in j:
            out["end-time"] = j["end-time"]
        if "errmsg" in j:
            out["errmsg"] = j["errmsg"]
        return out

    # ------------------------------------------------------------------ the socket

    @property
    def exists(self) -> bool:
        return self._listener is not None

    def remove(self) -> None:
        """QEMU is gone: nothing listens, the socket file is removed."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        conn = self._conn
        if conn is not None:  # QEMU's exit ends the session of its client too
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=IDLE_LIMIT + 5)
            self._thread = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def restore(self, keep_job: bool = False) -> None:
        """A (new) QEMU process listens on the socket; unless ``keep_job`` it has run no backup job."""
        self.remove()
        if not keep_job:
            with self._lock:
                self.job = None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(1)
        listener.settimeout(0.1)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True, name="qmp-double")
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self.remove()
        for t in self._holders:
            t.join(timeout=IDLE_LIMIT + 5)

    def __enter__(self) -> QmpDouble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by remove()
            with conn:
                self._conn = conn
                try:
                    self._session(conn)
                finally:
                    self._conn = None

    def _session(self, conn: socket.socket) -> None:
        client = Client(time.monotonic())
        with self._lock:
            self.clients.append(client)
        conn.settimeout(IDLE_LIMIT)
        negotiated = False
        buf = b""

        def send(msg: dict[str, Any]) -> None:
            conn.sendall(json.dumps(msg).encode() + b"\r\n")

        try:
            send(GREETING)
            while True:
                while b"\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    send({"error": {"class": "GenericError", "desc": "JSON parse error, invalid literal"}})
                    continue
                cmd = str(msg.get("execute", ""))
                client.commands.append(cmd)
                reply: dict[str, Any]
                if cmd == "qmp_capabilities":
                    negotiated = True
                    reply = {"return": {}}
                elif not negotiated:
                    reply = {"error": {"class": "CommandNotFound",
                                       "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
                elif cmd == "query-backup" and self.pve:
                    reply = {"return": self._query_backup()}
                elif cmd == "query-status":
                    reply = {"return": {"status": "running", "singlestep": False, "running": True}}
                else:
                    reply = {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
                if "id" in msg:
                    reply["id"] = msg["id"]
                if self.event_before_reply and negotiated and cmd != "qmp_capabilities":
                    send({"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "drive-scsi0"},
                          "timestamp": _now_ts()})
                send(reply)
        except OSError:
            return  # the client went away (a watcher that gave up waiting for the greeting)
        finally:
            client.end = time.monotonic()

    # ------------------------------------------------------------------ another client

    def hold(self, seconds: float) -> None:
        """Another client (vzdump, pvestatd) connects, negotiates and sits on the socket for ``seconds``.
        Returns once it holds it (its greeting came)."""
        held = threading.Event()

        def run() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(IDLE_LIMIT)
                s.connect(self.path)
                f = s.makefile("rb")
                f.readline()  # the greeting: the server is ours now
                with self._lock:
                    self.clients[-1].holder = True
                held.set()
                with contextlib.suppress(OSError):  # remove() ends this session too
                    s.sendall(b'{"execute": "qmp_capabilities"}\r\n')
                    f.readline()
                    self._closing.wait(seconds)

        t = threading.Thread(target=run, daemon=True, name="qmp-holder")
        self._holders.append(t)
        t.start()
        if not held.wait(IDLE_LIMIT):
            raise RuntimeError("hold: the QMP double never greeted the holder")

    # ------------------------------------------------------------------ what happened

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until the session being served (if any) has ended."""
        until = time.monotonic() + timeout
        while time.monotonic() < until and any(c.end is None for c in self.clients):
            time.sleep(0.01)

    def watcher_clients(self) -> list[Client]:
        """Every client that asked query-backup (not a holder)."""
        with self._lock:
            return [c for c in self.clients if not c.holder and "query-backup" in c.commands]
