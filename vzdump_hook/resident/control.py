"""The resident seen from outside it (the phases, `status`, the tests): its info file
`resident-VMID.json` (Info), its paths, whether it lives, arming it (a detached process, spawn) and
stopping it, and the lines it left once it ended. Cheap imports only: pre-stop and the resume points
import this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from ..node.job import process_start
from ..node.state import write_json
from .client import proc_stat, socket_path

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..node.state import HostState

MODULE = "vzdump_hook.resident.process"  # run as `python3 -I -m MODULE INFO_FILE`


@dataclass
class Info:
    """`resident-VMID.json`: what the resident needs, and which process it is."""

    vmid: int
    vmtype: str
    mode: str
    job: dict[str, Any]  # JobId.to_dict()
    settings: dict[str, Any]  # HookSettings as the hook had them (overrides applied; chain, notify left out)
    guest: dict[str, Any]  # the guest's table, as recorded at pre-stop
    deadline: float  # wall clock: the marker's deadline
    watching: bool = False  # QEMU: look for the backup job's start at once (armed after post-restart)
    chain: bool = False  # [hook] chain is set: a phase must go on to run the chained scripts
    pid: int = 0
    pid_start: int = 0  # /proc start time of pid: a recycled pid is not ours


def paths(job_dir: str, vmid: int) -> tuple[str, str, str]:
    """(info file, log file, socket) of the resident of `vmid` in the job directory `job_dir`."""
    base = os.path.join(job_dir, f"resident-{vmid}")
    return base + ".json", base + ".log", socket_path(job_dir, vmid)


def save(path: str, info: Info) -> None:
    write_json(path, asdict(info))


def load(path: str) -> Info | None:
    """The info file at `path`; None when there is none or it is unreadable."""
    try:
        with open(path) as f:
            return Info(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def alive(info: Info) -> bool:
    return bool(info.pid) and running(info.pid, info.pid_start)


def running(pid: int, start: int) -> bool:
    """Process `pid` exists, is the one started at `start`, and is not a zombie (a resident is not
    the hook's child: once it ends it may stay a zombie until init reaps it)."""
    st = proc_stat(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


def arm(state: HostState, guest: GuestConfig, vmtype: str, mode: str, deadline: float,
        watching: bool = False) -> Info:
    """Start the resident of `guest` for this job, detached; one already running is kept. `deadline`:
    wall clock. Raises HookError when it cannot be started."""
    info_path, log_path, _ = paths(state.job_dir, guest.vmid)
    old = load(info_path)
    if old is not None and alive(old):
        return old
    settings = replace(state.settings, chain=(), notify=None)
    info = Info(guest.vmid, vmtype, mode, state.job.to_dict(), asdict(settings), dict(guest.table), deadline,
                watching, chain=bool(state.settings.chain))
    save(info_path, info)
    # isolated, as the launcher runs the program
    pid = spawn([sys.executable, "-I", "-m", MODULE, info_path], log_path)
    info.pid, info.pid_start = pid, process_start(pid) or 0
    save(info_path, info)
    return info


def leftover_lines(job_dir: str, vmid: int) -> list[tuple[int, str]]:
    """What a resident that has ended wrote and no phase has shown yet, once: (level, text). [] while
    it runs (its lines come with its answers) or when there is none."""
    info_path, log_path, _ = paths(job_dir, vmid)
    info = load(info_path)
    if info is not None and alive(info):
        return []
    lines: list[tuple[int, str]] = []
    with contextlib.suppress(FileNotFoundError):
        with open(log_path, errors="replace") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    level, text = json.loads(raw)
                    lines.append((int(level), str(text)))
                except (ValueError, TypeError):
                    # its stderr (a traceback?)
                    lines.append((logging.WARNING, f"resident {vmid}: {raw.rstrip()}"))
        os.unlink(log_path)
    return lines


def residents(run_dir: str) -> list[tuple[str, Info]]:
    """(job directory, info) of every live resident under `run_dir`, for `status`."""
    out: list[tuple[str, Info]] = []
    base = os.path.join(run_dir, "jobs")
    with contextlib.suppress(OSError):
        for job in sorted(os.listdir(base)):
            d = os.path.join(base, job)
            with contextlib.suppress(OSError):
                for name in sorted(os.listdir(d)):
                    if name.startswith("resident-") and name.endswith(".json"):
                        info = load(os.path.join(d, name))
                        if info is not None and alive(info):
                            out.append((d, info))
    return out


def spawn(argv: list[str], log_path: str) -> int:
    """Run `argv` as a daemon: double fork, setsid, stdin /dev/null, stdout and stderr appended to
    `log_path`, no other descriptor (vzdump reads a hook's stdout and stderr until EOF: a child that
    kept them, or a lock, would hold the backup up). Returns its pid. Raises HookError when it could
    not be started."""
    from ..errors import HookError

    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    env = dict(os.environ)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first child: only leaves the session and forks again
        code = 1
        try:
            os.close(r)
            os.setsid()
            child = os.fork()
            if child == 0:  # the daemon
                try:
                    null = os.open(os.devnull, os.O_RDONLY)
                    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    os.dup2(null, 0)
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                    os.closerange(3, 65536)
                    os.chdir("/")
                    os.execve(argv[0], argv, env)
                finally:
                    os._exit(127)
            os.write(w, str(child).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data.isdigit():
        raise HookError("the resident process could not be started")
    return int(data)


def stop(pid: int, start: int, wait: float) -> None:
    """SIGTERM a resident (a start under way is finished first), SIGKILL it after `wait` seconds."""
    import signal  # no phase stops a resident: the phases do not pay for this import

    for sig, patience in ((signal.SIGTERM, wait), (signal.SIGKILL, 5.0)):
        if not running(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        until = time.monotonic() + patience
        while running(pid, start) and time.monotonic() < until:
            time.sleep(0.02)
