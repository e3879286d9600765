"""The resident: one detached process per guest and vzdump job, from right before the stop until the
stacks run again. It holds a session to the guest open and owns the resume.

Armed by `pre-stop` before anything stops (phase/runner.py), it starts the stacks, exactly once (under the
per-guest lock every resume path takes, resume.py), at the first of:
- a phase hook tells it a phase over its unix socket, and that phase is a resume point
  (rules.plan); cli.py tells it before anything else is imported, so the start is sent a few
  milliseconds after vzdump runs the hook;
- QEMU's backup job has started (early_resume; qemu/watcher.py), once the last hook before the job
  has passed (snapshot: told `post-restart`; suspend, stop: the stop is done);
- the vzdump worker of its job is gone: the job is over, provably, and no phase will come;
- a job phase (`job-end`, `job-abort`) tells it: the job's last attempt.
A start that fails (guest unreachable, sshd restarting) is retried with a growing pause. It ends once
the stacks run again (whoever started them), or at the marker's deadline, when the guest-side
recovery takes over; its own watchdog ends it shortly after that whatever hangs.

It is never the only path: a phase that finds no resident, or gets no answer within ANSWER_WAIT,
resumes the stacks itself as it would without one. A resident SIGKILLed, or whose run directory was
wiped (it keeps its record in memory and listens again), costs speed, never a start.

Its files, in the job's run directory: `resident-VMID.json` (what it needs, its pid),
`resident-VMID.sock`, and `resident-VMID.log` (its task log lines that no phase has shown yet, as
JSON [level, text] lines; anything else there is its stderr).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..node.job import JobId, process_start
from ..node.state import write_json
from .client import EARLY, TOLD_PHASES, Address, proc_stat, socket_path, tell

__all__ = ["EARLY", "TOLD_PHASES", "Info", "arm", "leftover_lines", "paths", "residents", "tell"]

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..guest.session import GuestSession
    from ..node.state import GuestRecord, HostState

log = logging.getLogger("vzdump_hook.resident.process")  # not __name__: "__main__" when run with -m
MODULE = "vzdump_hook.resident.process"

POLL = 0.1  # seconds between two looks at the job, the record and QMP
CONNECT_WAIT = 10.0  # the resident's first connect to the guest (while the hook stops the stacks)
RETRY_FIRST, RETRY_MAX = 1.0, 5.0  # seconds between two starts after a failed one (doubling)
HARD_GRACE = 15.0  # seconds past its deadline before its watchdog ends it
MAX_REQUEST = 4096


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


def _save(path: str, info: Info) -> None:
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


# -- the hook's side -----------------------------------------------------------------------------


def arm(state: HostState, guest: GuestConfig, vmtype: str, mode: str, deadline: float, watching: bool = False) -> Info:
    """Start the resident of `guest` for this job, detached; one already running is kept. `deadline`:
    wall clock. Raises HookError when it cannot be started."""
    info_path, log_path, _ = paths(state.job_dir, guest.vmid)
    old = load(info_path)
    if old is not None and alive(old):
        return old
    settings = replace(state.settings, chain=(), notify=None)
    info = Info(guest.vmid, vmtype, mode, state.job.to_dict(), asdict(settings), dict(guest.table), deadline, watching,
                chain=bool(state.settings.chain))
    _save(info_path, info)
    pid = spawn([sys.executable, "-I", "-m", MODULE, info_path], log_path)  # isolated, as the launcher runs the program
    info.pid, info.pid_start = pid, process_start(pid) or 0
    _save(info_path, info)
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
                    lines.append((logging.WARNING, f"resident {vmid}: {raw.rstrip()}"))  # its stderr (a traceback?)
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


def running(pid: int, start: int) -> bool:
    """Process `pid` exists, is the one started at `start`, and is not a zombie (a resident is not
    the hook's child: once it ends it may stay a zombie until init reaps it)."""
    st = proc_stat(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


def stop(pid: int, start: int, wait: float) -> None:
    """SIGTERM a resident (a start under way is finished first), SIGKILL it after `wait` seconds."""
    for sig, patience in ((signal.SIGTERM, wait), (signal.SIGKILL, 5.0)):
        if not running(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        until = time.monotonic() + patience
        while running(pid, start) and time.monotonic() < until:
            time.sleep(0.02)


# -- the resident process ------------------------------------------------------------------------


class _Stopped(BaseException):
    """SIGTERM outside a start: end now. (BaseException: no `except Exception` swallows it.)"""


class _Keep(logging.Handler):
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


class Resident:
    def __init__(self, info: Info, info_path: str) -> None:
        from ..config import HookSettings
        from ..guest.resume import Resumer
        from ..node.state import HostState

        self.info = info
        self.info_path = info_path
        self.job = JobId.from_dict(info.job)
        values: dict[str, Any] = {k: tuple(v) if k == "chain" else v for k, v in info.settings.items()}
        self.settings = HookSettings(**values)
        self.state = HostState(self.settings, self.job)
        self.until = time.monotonic() + max(0.0, info.deadline - time.time())
        self.resumer = Resumer(self.settings, self.job, self.state, self.until)
        self.sock_path = paths(self.state.job_dir, info.vmid)[2]
        self.kept = _Keep()
        self.status = "waiting"  # waiting, watching, starting, retrying, done
        self.remembered: GuestRecord | None = None  # the record as last read (run_dir may be wiped)
        self.retry_at: float | None = None
        self.pause = RETRY_FIRST
        self.critical = False  # a start is under way: SIGTERM lets it finish
        self.stop_requested = False
        self.srv: socket.socket | None = None
        self.srv_inode = 0
        self.watch: Any = None  # qemu.watcher.JobWatch once armed
        self.watch_tried = False  # armed once at most: after GiveUp, a phase starts the stacks
        self.ctl: GuestSession | None = None
        self.readiness: threading.Thread | None = None

    @property
    def vmid(self) -> int:
        return self.info.vmid

    def left(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        if not self.critical:
            raise _Stopped

    def run(self) -> int:
        """Serve phases and watch until the stacks run again or the deadline has passed."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.on_term)
        logging.getLogger("vzdump_hook").addHandler(self.kept)
        try:
            self._run()
        except _Stopped:
            pass
        except Exception as e:  # the resident is a fast path: the phases still resume
            log.warning("resident %d: %s: %s: the phases start the stacks", self.vmid, type(e).__name__, e)
        finally:
            self._close()
        return 0

    def _run(self) -> None:
        from .. import config as configuration
        from ..guest.session import GuestSession

        guest = configuration.validate_guest(self.vmid, self.info.guest)
        self.ctl = GuestSession(guest, self.job)
        self._listen()
        if self.info.watching:
            self._arm_watch()
        if self.info.mode != "stop":  # the guest runs on: the session is open when the start is due
            try:
                self.ctl.t.connect(min(self.left(), CONNECT_WAIT))
            except Exception as e:
                log.debug("resident %d: no session yet: %s", self.vmid, e)
        while True:
            self._serve(POLL)
            if self._tick():
                return

    # -- the socket ------------------------------------------------------------------------------

    def _listen(self) -> None:
        """Listen on the socket path (again: run_dir may have been wiped)."""
        if self.srv is not None:
            self.srv.close()
        os.makedirs(os.path.dirname(self.sock_path), mode=0o700, exist_ok=True)
        if not os.path.exists(self.info_path):  # before the socket: whoever finds the socket finds this too
            _save(self.info_path, self.info)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with Address(self.sock_path) as addr:
            srv.bind(addr)
        srv.listen(8)
        self.srv, self.srv_inode = srv, os.stat(self.sock_path).st_ino

    def _serve(self, timeout: float) -> None:
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
                final = self._on_phase(phase) if isinstance(phase, str) and phase else False
                rec = self.remembered
                lines = self.kept.take()
                answer = {"state": self.status, "resumed": self.status == "done", "lines": lines, "final": final,
                          "stacks": [s.name for s in rec.stacks] if rec is not None else []}
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    self.kept.lines[:0] = lines  # nobody read them: the next answer, or the log file, has them
                    raise
            except (OSError, ValueError) as e:
                log.debug("resident %d: request dropped: %s", self.vmid, e)

    def _on_phase(self, name: str) -> bool:
        """Act on a phase a hook told. True when that phase has nothing left to do for this guest
        (the stacks run again, or they stay down by plan and the watch, if any, is armed): the hook
        then ends at once, with the [hook] settings recorded at pre-stop (no chained scripts)."""
        from ..node.state import Status
        from ..vzdump import rules
        from ..vzdump.phases import GuestType, Mode, parse_phase
        from ..vzdump.rules import Step

        phase = parse_phase(name)
        rec = self._record()
        if phase is None or rec is None:
            return False
        # backup-end/abort tell the guest's controllers that the job is over (phase/runner.py): the phase goes on
        closing = phase in rules.CONTROLLER_ENDS and bool(rec.unclosed_controllers)
        if not rec.status.pending:
            return rec.status is Status.RESUMED and not phase.is_job_phase and not self.info.chain and not closing
        vmtype, mode = GuestType(self.info.vmtype), Mode(self.info.mode)
        if phase.is_job_phase:  # job-end, job-abort: the job's last attempt
            self._start(phase.value, wait=True)
            return False
        plan = rules.plan(phase, vmtype, mode, rec, self._early())
        done = False
        if plan.step is Step.ARM_WATCHER:
            self._arm_watch()
            if self.watch is not None:
                from ..qemu import watcher

                log.info("%s %d: %s", phase.value, self.vmid, watcher.watching(self.watch.w))
                done = True
        elif plan.step is Step.RESUME:
            done = self._start(phase.value, wait=plan.wait_for_guest)
        elif plan.step is Step.NONE:
            if plan.note:
                log.info("%s %d: %s", phase.value, self.vmid, plan.note)
            done = True
        return done and not self.info.chain and not closing

    # -- what it watches -------------------------------------------------------------------------

    def _record(self) -> GuestRecord | None:
        """This job's record of the guest; the one last seen when the file is gone (run_dir wiped)."""
        rec = self.state.load(self.vmid)
        if rec is not None:
            self.remembered = rec
        return rec if rec is not None else self.remembered

    def _tick(self) -> bool:
        """One look at everything; True when the resident has nothing left to do."""
        try:
            if os.stat(self.sock_path).st_ino != self.srv_inode:
                self._listen()
        except FileNotFoundError:
            log.info("resident %d: its socket is gone (run directory wiped?): listening again", self.vmid)
            self._listen()
        rec = self._record()
        if self.readiness is not None and self.readiness.is_alive():
            return False  # await_ready: the downtime ends when the stacks are ready
        if rec is None or not rec.status.pending:
            if self.status != "done" and rec is not None:
                log.debug("resident %d: the stacks were started by another path", self.vmid)
            return True
        if self.job.is_over():
            log.info("resident %d: its vzdump job is over (the worker is gone): starting the stacks", self.vmid)
            return self._start("resident", wait=True)
        if self.left() <= 0:
            log.warning("resident %d: the marker's deadline has passed with the stacks still down: "
                        "the guest's recovery program starts them, or the next job-start", self.vmid)
            return True
        if not self.watch_tried and self.info.vmtype == "qemu" and self.info.mode != "snapshot" and self._early() and rec.status.value != "quiescing":
            self._arm_watch()  # suspend, stop: the last hook before QEMU's backup job was pre-stop, now done
        if self.watch is not None and self._watch_tick():
            return True
        if self.retry_at is not None and time.monotonic() >= self.retry_at:
            return self._start("resident", wait=True)
        return False

    def _early(self) -> bool:
        return bool(self.ctl and self.ctl.guest.early_resume)

    def _arm_watch(self) -> None:
        from ..qemu import watcher

        if self.watch_tried or not self._early():
            return
        self.watch_tried = True
        try:
            w = watcher.load(watcher._paths(self.state, self.vmid))
        except Exception as e:
            log.warning("resident %d: %s: the stacks start at backup-end", self.vmid, e)
            return
        if w is not None:
            self.watch = watcher.JobWatch(w)
            self.status = "watching"

    def _watch_tick(self) -> bool:
        from ..qemu import watcher

        try:
            job = self.watch.poll(self.left())
        except watcher.GiveUp as e:
            log.info("resident %d: %s: the stacks start when vzdump ends this backup", self.vmid, e)
            self.watch, self.status = None, "waiting"
            return False
        if job is None:
            return False
        busy = f" (QMP busy {self.watch.busy}x, backed off)" if self.watch.busy else ""
        log.info("resident %d: QEMU backup job %s at %s, seen at %s%s: starting the stacks", self.vmid, job.uuid,
                 time.strftime("%H:%M:%S", time.localtime(job.start_time)), time.strftime("%H:%M:%S"), busy)
        self.watch = None
        return self._start("resident", wait=self.info.mode == "stop")  # stop mode: the VM boots while the job runs

    # -- the start -------------------------------------------------------------------------------

    def _start(self, where: str, wait: bool) -> bool:
        """Start the stacks (resume.py); on failure, retry later. True when they run again."""
        assert self.ctl is not None
        self.status = "starting"
        self.critical = True
        try:
            done = self.resumer.resume_with(self.ctl, where, wait, remembered=self.remembered, ready=False)
        finally:
            self.critical = False
        if done:
            self.status, self.retry_at = "done", None
            # waiting for the stacks' `ready` must not hold up the phases that ask meanwhile
            ctl = self.ctl
            self.readiness = threading.Thread(target=self.resumer.await_ready, args=(ctl, "resident"), daemon=True)
            self.readiness.start()
        else:
            self.ctl.t.close()  # a fresh session next time: the old one may be what failed
            self.status = "retrying"
            self.retry_at = time.monotonic() + min(self.pause, self.left())
            log.info("resident %d: trying again in %.0f s (until the marker's deadline, %s)", self.vmid, self.pause,
                     time.strftime("%H:%M:%S", time.localtime(self.info.deadline)))
            self.pause = min(2 * self.pause, RETRY_MAX)
        if self.stop_requested:
            raise _Stopped
        return done

    def _close(self) -> None:
        if self.info.vmtype == "qemu" and self.status == "done":
            from ..qemu import watcher

            watcher.forget(self.state, self.vmid)  # the stacks run: no job start to wait for
        if self.ctl is not None:
            with contextlib.suppress(Exception):
                self.ctl.close()
        if self.srv is not None:
            self.srv.close()
            with contextlib.suppress(OSError):
                if os.stat(self.sock_path).st_ino == self.srv_inode:
                    os.unlink(self.sock_path)
        lines = self.kept.take()
        if lines:  # stdout is the log file: lines no phase has taken
            for level, text in lines:
                print(json.dumps([level, text]))
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """`python -m vzdump_hook.resident.process INFO_FILE`: run a resident (armed by vzdump-hook)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vzdump_hook.resident.process INFO_FILE (armed by vzdump-hook)", file=sys.stderr)
        return 2
    info = load(args[0])
    if info is None:
        return 0
    if os.environ.get("VZDUMP_HOOK_DEBUG"):
        logging.getLogger("vzdump_hook").setLevel(logging.DEBUG)
    else:
        logging.getLogger("vzdump_hook").setLevel(logging.INFO)
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("vzdump_hook").propagate = False
    resident = Resident(info, args[0])
    hard = threading.Timer(resident.left() + HARD_GRACE, os._exit, args=(0,))  # whatever hangs, it ends
    hard.daemon = True
    hard.start()
    return resident.run()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # never wait for a thread stuck on a dead guest
