"""The resident's unix socket, `resident-VMID.sock` in the job's run directory: one request at a time,
a phase a hook tells (or "": only asking how it is), and its answer with the resident's log lines that no
phase has shown yet (Kept). resident/client.py is the other end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import sys
from collections.abc import Callable
from typing import Any

from .client import Address
from .control import Info, save

log = logging.getLogger("vzdump_hook.resident.process")  # the resident's lines, whichever module logs them

MAX_REQUEST = 4096


class Kept(logging.Handler):
    """Keeps the resident's log lines until a phase takes them into the task log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        from ..logs import Formatter

        self.setFormatter(Formatter())
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record).removeprefix("vzdump-hook: ")
        if record.levelno >= logging.WARNING:
            text = text.removeprefix(f"{record.levelname}: ")
        self.lines.append((record.levelno, text))

    def take(self) -> list[tuple[int, str]]:
        lines, self.lines = self.lines, []
        return lines

    def write_out(self) -> None:
        """The lines no phase has taken, to stdout: the resident's log file (JSON [level, text] lines)."""
        for level, text in self.take():
            print(json.dumps([level, text]))
        sys.stdout.flush()


class Server:
    """Listens at `sock_path` (again when the run directory was wiped) and answers one request at a time."""

    def __init__(self, sock_path: str, info_path: str, info: Info) -> None:
        self.sock_path = sock_path
        self.info_path = info_path
        self.info = info
        self.srv: socket.socket | None = None
        self.srv_inode = 0

    def listen(self) -> None:
        """Listen on the socket path (again: run_dir may have been wiped)."""
        if self.srv is not None:
            self.srv.close()
        os.makedirs(os.path.dirname(self.sock_path), mode=0o700, exist_ok=True)
        if not os.path.exists(self.info_path):  # before the socket: whoever finds the socket finds this too
            save(self.info_path, self.info)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with Address(self.sock_path) as addr:
            srv.bind(addr)
        srv.listen(8)
        self.srv, self.srv_inode = srv, os.stat(self.sock_path).st_ino

    def keep_listening(self) -> None:
        """Listen again when the socket path is gone or is no longer this socket."""
        try:
            if os.stat(self.sock_path).st_ino != self.srv_inode:
                self.listen()
        except FileNotFoundError:
            log.info("resident %d: its socket is gone (run directory wiped?): listening again", self.info.vmid)
            self.listen()

    def serve(self, timeout: float, respond: Callable[[str], dict[str, Any]], kept: Kept) -> None:
        """Answer one request, if one comes within `timeout` s: `respond(phase)` ("" when none is told) is the
        answer; its "lines", taken from `kept`, go back there when it cannot be sent."""
        assert self.srv is not None
        ready, _, _ = select.select([self.srv], [], [], timeout)
        if not ready:
            return
        conn, _ = self.srv.accept()
        with conn:
            conn.settimeout(2.0)
            try:
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = conn.recv(MAX_REQUEST)
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data)
                phase = request.get("phase", "") if isinstance(request, dict) else ""
                answer = respond(phase if isinstance(phase, str) else "")
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    kept.lines[:0] = answer["lines"]  # nobody read them: the next answer, or the log file, has them
                    raise
            except (OSError, ValueError) as e:
                log.debug("resident %d: request dropped: %s", self.info.vmid, e)

    def close(self) -> None:
        """Stop listening; the socket path goes too unless another resident listens there now."""
        if self.srv is not None:
            self.srv.close()
            with contextlib.suppress(OSError):
                if os.stat(self.sock_path).st_ino == self.srv_inode:
                    os.unlink(self.sock_path)
