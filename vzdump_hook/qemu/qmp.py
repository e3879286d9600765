"""A minimal QMP client: one request per connection - connect, read the greeting, `qmp_capabilities`,
the command, disconnect - all within one timeout.

QEMU serves one client at a time on a QMP socket, and vzdump (the backup job itself) and pvestatd
need it: a client that holds it delays them. A second client's connect succeeds (the listen backlog)
but its greeting comes only once the first has left; a greeting that does not come in time means
"busy" (QmpBusy), and the caller backs off. Asynchronous events may come before any reply and are
skipped; replies are matched by the `id` sent with each command.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..errors import HookError

MAX_MESSAGE = 1024 * 1024  # bytes: one QMP message (a reply or event) never comes near this


class QmpError(HookError):
    """QMP could not be asked, or answered with something unusable."""


class QmpUnavailable(QmpError):
    """No socket, or nothing listens on it (QEMU not running, or restarting)."""


class QmpBusy(QmpError):
    """Another client holds the monitor: no greeting (or no reply) in time. Retry later."""


class QmpProtocolError(QmpError):
    """Not QMP, or a reply that cannot be understood."""


class QmpCommandError(QmpError):
    """QEMU answered the command with an error (e.g. CommandNotFound: not Proxmox VE's QEMU)."""

    def __init__(self, command: str, error: Any) -> None:
        cls = error.get("class", "?") if isinstance(error, dict) else "?"
        desc = error.get("desc", "") if isinstance(error, dict) else str(error)
        self.error_class = str(cls)
        super().__init__(f"QMP {command}: {cls}: {str(desc)[:200]}")


class _Connection:
    def __init__(self, path: str, deadline: float) -> None:
        self.path = path
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""
        self.greeted = False

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError()
        return left

    def connect(self) -> None:
        try:
            self.sock.settimeout(self.left())
            self.sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise QmpUnavailable(f"QMP {self.path}: {e.strerror or e}") from None
        except PermissionError as e:
            raise QmpUnavailable(f"QMP {self.path}: {e.strerror}") from None
        except (BlockingIOError, TimeoutError):  # EAGAIN: the listen backlog is full
            raise QmpBusy(f"QMP {self.path}: busy (connect not accepted in time)") from None
        except OSError as e:
            if e.errno == errno.EAGAIN:
                raise QmpBusy(f"QMP {self.path}: busy") from None
            raise QmpUnavailable(f"QMP {self.path}: {e.strerror or e}") from None

    def send(self, message: dict[str, Any]) -> None:
        self.sock.settimeout(self.left())
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self) -> dict[str, Any]:
        """The next message (a JSON object on a line of its own)."""
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_MESSAGE:
                raise QmpProtocolError(f"QMP {self.path}: message over {MAX_MESSAGE} bytes")
            self.sock.settimeout(self.left())
            chunk = self.sock.recv(65536)
            if not chunk:
                what = "before the greeting" if not self.greeted else "before the reply"
                raise QmpUnavailable(f"QMP {self.path}: connection closed {what}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line.strip(b"\r"))
        except ValueError:
            raise QmpProtocolError(f"QMP {self.path}: not JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise QmpProtocolError(f"QMP {self.path}: not a JSON object: {line[:80]!r}")
        return msg

    def execute(self, command: str, ident: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        self.send(msg)
        while True:
            reply = self.receive()
            if "event" in reply:
                continue  # asynchronous events may come at any time
            if reply.get("id") != ident:
                if "error" in reply and "id" not in reply:  # e.g. a parse error: QEMU cannot echo an id
                    raise QmpCommandError(command, reply["error"])
                continue
            if "error" in reply:
                raise QmpCommandError(command, reply["error"])
            if "return" not in reply:
                raise QmpProtocolError(f"QMP {self.path}: {command}: reply without return: {str(reply)[:120]}")
            return reply["return"]


def execute(path: str, command: str, timeout: float = 2.0, arguments: dict[str, Any] | None = None) -> Any:
    """Run one QMP command on the socket at `path` and return its `return` value; the connection is
    closed before this returns. Raises QmpUnavailable, QmpBusy, QmpProtocolError, QmpCommandError."""
    conn = _Connection(path, time.monotonic() + timeout)
    try:
        conn.connect()
        try:
            greeting = conn.receive()
        except TimeoutError:
            raise QmpBusy(f"QMP {path}: busy (no greeting within {timeout:g} s: "
                          "another client holds the monitor)") from None
        if "QMP" not in greeting:
            raise QmpProtocolError(f"QMP {path}: no QMP greeting: {str(greeting)[:120]}")
        conn.greeted = True
        conn.execute("qmp_capabilities", "caps")
        return conn.execute(command, "vzdump-hook", arguments)
    except TimeoutError:
        raise QmpBusy(f"QMP {path}: busy (no reply within {timeout:g} s)") from None
    except (BrokenPipeError, ConnectionResetError) as e:
        raise QmpUnavailable(f"QMP {path}: {e.strerror}") from None
    finally:
        conn.sock.close()


@dataclass(frozen=True)
class BackupJob:
    """What `query-backup` reports (Proxmox VE's QEMU): the last backup job this QEMU process ran or
    runs; all None when it has run none."""

    uuid: str | None = None
    status: str | None = None  # "active", "done", "error"
    start_time: int | None = None  # seconds since the epoch (QEMU's time(NULL), this host's clock)
    end_time: int | None = None
    total: int | None = None
    transferred: int | None = None
    errmsg: str | None = None

    @property
    def started(self) -> bool:
        """The job runs or has run to completion (a QEMU backup job, or an external provider's access)."""
        return self.status in ("active", "done") and self.start_time is not None

    @property
    def access(self) -> bool:
        """An external backup provider's access (PVE 8.4+: qemu-server's `backup-access-setup`, after
        the freeze): pve-qemu sets the backup's start time and status but no uuid, and starts no QEMU
        job; the snapshot the provider reads is taken by that command."""
        return not self.uuid and self.start_time is not None

    def describe(self) -> str:
        if self.start_time is None:
            return "none"
        when = time.strftime("%H:%M:%S", time.localtime(self.start_time))
        what = "backup access" if self.access else (self.uuid or "")[:8]
        return f"{what} ({self.status or '?'}, started {when})"

    def to_dict(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "status": self.status, "start-time": self.start_time, "end-time": self.end_time}

    @classmethod
    def from_return(cls, value: Any) -> BackupJob:
        """From the `return` of query-backup (or to_dict()). Raises QmpProtocolError when it is not
        shaped like one."""
        if not isinstance(value, dict):
            raise QmpProtocolError(f"query-backup: not an object: {str(value)[:120]}")

        def get(key: str, kind: type) -> Any:
            v = value.get(key)
            if v is None:
                return None
            if not isinstance(v, kind) or isinstance(v, bool):
                raise QmpProtocolError(f"query-backup: {key} is {type(v).__name__}, not {kind.__name__}")
            return v

        return cls(
            uuid=get("uuid", str) or None,
            status=get("status", str),
            start_time=get("start-time", int),
            end_time=get("end-time", int),
            total=get("total", int),
            transferred=get("transferred", int),
            errmsg=get("errmsg", str),
        )


def query_backup(path: str, timeout: float = 2.0) -> BackupJob:
    """QEMU's backup job as `query-backup` reports it. Raises QmpError (see execute)."""
    return BackupJob.from_return(execute(path, "query-backup", timeout))


def is_new_job(job: BackupJob, before: BackupJob, not_before: int) -> bool:
    """Whether `job` is the one this backup started: running or done, not the job QEMU reported
    before the stacks were stopped (`before`, a leftover of an earlier backup), and started no
    earlier than that second (`not_before`). A job is told apart by its uuid; an external provider's
    access has none, and is told apart by its start time."""
    if not job.started or job.start_time is None or job.start_time < not_before:
        return False
    if job.access:
        return not (before.access and before.start_time == job.start_time)
    return job.uuid != before.uuid
