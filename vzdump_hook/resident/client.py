"""What a phase does before anything else is imported: tell the guest's resident (resident/process.py) which
phase vzdump is at, so that a start at a resume point goes out a few milliseconds after vzdump runs
the hook. Only the standard library's cheapest modules: every phase of every guest pays for this
import, and a phase the resident answers as done ends right here (cli.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

DEFAULT_RUN_DIR = "/run/vzdump-hook"  # HookSettings.run_dir's default (config.py)
RUN_DIR_ENV = "VZDUMP_HOOK_RUN_DIR"
LAUNCHER_ENV = "VZDUMP_HOOK_LAUNCHER"  # set by the sh launcher: the pid of its parent, the vzdump worker
# vzdump/rules.py TOLD_TO_RESIDENT as strings: this module imports nothing of the package (a test ties the two)
TOLD_PHASES = frozenset({"pre-restart", "post-restart", "backup-end", "backup-abort", "log-end"})
ANSWER_WAIT = 5.0  # a phase waits this long for the resident's answer, then resumes itself
_LEVELS = {30: "WARNING", 40: "ERROR", 50: "CRITICAL"}  # logging's names, without importing logging

EARLY: dict[int, dict[str, Any] | None] = {}  # vmid -> the resident's answer to tell_early, for phase/runner.py


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of `pid`, None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot, or None when no such process exists."""
    st = proc_stat(pid)
    return None if st is None else st[1]


def worker_pid() -> int:
    """The vzdump worker of this phase: the parent, or the launcher's parent ($VZDUMP_HOOK_LAUNCHER)."""
    launcher = os.environ.get(LAUNCHER_ENV, "")
    return int(launcher) if launcher.isdigit() and int(launcher) > 1 else os.getppid()


def job_key(pid: int, start: int) -> str:
    """The name of a job's directory under RUN_DIR/jobs (JobId.key)."""
    return f"{pid}-{start}"


def socket_path(job_dir: str, vmid: int) -> str:
    return os.path.join(job_dir, f"resident-{vmid}.sock")


class Address:
    """A unix socket path as an address: one longer than the kernel's 108 bytes goes through the
    directory's descriptor (/proc/self/fd/N/NAME). A context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> str:
        if len(self.path.encode()) < 100:
            return self.path
        self.fd = os.open(os.path.dirname(self.path), os.O_PATH | os.O_DIRECTORY)
        return f"/proc/self/fd/{self.fd}/{os.path.basename(self.path)}"

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def tell(job_dir: str, vmid: int, phase: str, wait: float = ANSWER_WAIT) -> dict[str, Any] | None:
    """Tell the resident of `vmid` that vzdump is at `phase` ("": only ask how it is). Its answer
    ({"state", "resumed", "final", "lines", "stacks"}), or None when none answered within `wait` s."""
    sock_path = socket_path(job_dir, vmid)
    if not os.path.exists(sock_path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(wait)
    try:
        with Address(sock_path) as addr:
            s.connect(addr)
        s.sendall(json.dumps({"phase": phase}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < 1 << 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        answer = json.loads(data)
        return answer if isinstance(answer, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        s.close()


def tell_early(args: list[str], env: Mapping[str, str]) -> bool:
    """cli.py, before the rest of the hook is imported: a guest phase after pre-stop is told to the
    resident at once (it decides whether that is a resume point). True when the resident answered
    that the phase has nothing left to do: its lines are printed and the phase may end. Uses the run
    directory of the environment or the default; a config that moves it is asked later, by phase/runner.py."""
    if len(args) < 3 or args[0] not in TOLD_PHASES or not args[2].isdigit():
        return False
    vmid = int(args[2])
    pid = worker_pid()
    job_dir = os.path.join(env.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR, "jobs", job_key(pid, process_start(pid) or 0))
    if not os.path.exists(socket_path(job_dir, vmid)):
        return False
    answer = EARLY[vmid] = tell(job_dir, vmid, args[0])
    if answer is None or answer.get("final") is not True:
        return False
    for level, text in answer.get("lines", ()):
        shown = f"{_LEVELS[int(level)]}: " if int(level) in _LEVELS else ""
        print(f"vzdump-hook: {shown}{text}")
    sys.stdout.flush()
    return True
