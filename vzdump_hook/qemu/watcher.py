"""The early-resume watcher: a detached process per QEMU guest and backup that asks QMP `query-backup`
until QEMU's backup job - the backup's point in time - has started, then starts the stacks, exactly
once, under the per-guest lock every resume path takes. Whatever is unclear leaves the start to
`backup-end`, as without a watcher.

Its life, driven by the hook (hook.py, orchestrator.py):
- `pre-stop`, before anything stops: `note_backup_job` asks QEMU which backup job it knows. That job
  (a leftover of an earlier backup) never counts; neither does one started before that second.
  No answer (no socket, busy for NOTE_WAIT seconds, not Proxmox VE's QEMU): no watcher.
- The last hook before the job starts (snapshot: `post-restart`; suspend, stop: `pre-stop`): `arm`
  starts `python -m vzdump_hook.qemu.watcher WATCH_FILE` detached - double fork, setsid, stdin from
  /dev/null, stdout and stderr into a log file in the job's run directory. vzdump reads a hook's
  stdout and stderr until EOF: a child that kept them open would hold the backup up.
- `backup-end`, `backup-abort`, `log-end` (and `job-end`, `job-abort`): `disarm` stops it - a resume
  under way is finished first - and hands its lines to the task log.
- It also ends by itself once the stacks run again (whoever started them), when its vzdump job is
  over, at its deadline (the marker's: the stop plus max_downtime), or, at the latest, by a hard
  watchdog shortly after that.

QMP is asked at most every POLL seconds, one request per connection; a busy socket (another client:
vzdump, pvestatd) is retried after a growing pause. In stop mode the QEMU process is replaced while
the watcher waits (no socket for a while: not an error), and the VM boots once the job runs: the
watcher waits for the guest to answer (`resume_wait`) before starting the stacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..config import HookSettings
from ..errors import ConnectError, HookError
from ..job import JobId, process_start
from .qmp import BackupJob, QmpBusy, QmpError, QmpUnavailable, is_new_job, query_backup

if TYPE_CHECKING:
    from ..controller import GuestController
    from ..state import HostState

log = logging.getLogger("vzdump_hook.qemu.watcher")  # not __name__: "__main__" when run with -m
MODULE = "vzdump_hook.qemu.watcher"

POLL = 0.1  # seconds between two query-backup while waiting for the job to start
MAX_BACKOFF = 1.0  # seconds: the longest pause after a busy socket (it doubles from POLL)
QUERY_TIMEOUT = 1.0  # seconds for one QMP exchange, greeting included
NOTE_WAIT = 5.0  # pre-stop: seconds to retry a busy socket before giving up on the early resume
RESUME_TRIES = 3  # a resume that fails right after the job start (the guest agent still frozen) is retried
RETRY_PAUSE = 1.0
HARD_GRACE = 15.0  # seconds past its deadline before the watcher's own watchdog ends it


def socket_path(settings: HookSettings, vmid: int) -> str:
    return os.path.join(settings.qmp_dir, f"{vmid}.qmp")


@dataclass
class Watch:
    """The watch file (`qemu-VMID.json` in the job's run directory): what pre-stop saw, what the
    watcher needs, and which process it is."""

    vmid: int
    mode: str
    qmp: str
    before: dict[str, Any]  # BackupJob.to_dict() of the job QEMU reported before the stop
    not_before: int  # a job started before this second is not this backup's
    job: dict[str, Any]  # JobId.to_dict()
    settings: dict[str, Any]  # HookSettings, as the hook had them (environment overrides applied)
    deadline: float = 0.0  # wall clock: the watcher gives up (set when armed)
    pid: int = 0
    pid_start: int = 0  # /proc start time of pid: a recycled pid is not ours

    @property
    def before_job(self) -> BackupJob:
        return BackupJob.from_return(self.before)

    def job_id(self) -> JobId:
        j = self.job
        return JobId(str(j["node"]), str(j["boot"]), int(j["pid"]), int(j["start"]))


def _paths(state: HostState, vmid: int) -> tuple[str, str]:
    """(watch file, log file) of `vmid` in this job."""
    base = os.path.join(state.job_dir, f"qemu-{vmid}")
    return base + ".json", base + ".log"


def _save(path: str, w: Watch) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(w), f)
    os.replace(tmp, path)


def load(path: str) -> Watch | None:
    """The watch file at `path`, None when there is none. Raises HookError when it is unreadable."""
    try:
        with open(path) as f:
            return Watch(**json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise HookError(f"watch file {path} unreadable: {e}") from None


def ask(path: str, until: float) -> BackupJob:
    """query-backup, retrying a busy socket with growing pauses until `until` (monotonic)."""
    pause = POLL
    while True:
        try:
            return query_backup(path, max(0.05, min(QUERY_TIMEOUT, until - time.monotonic())))
        except QmpBusy:
            if time.monotonic() + pause >= until:
                raise
            time.sleep(pause)
            pause = min(2 * pause, MAX_BACKOFF)


# -- the hook's side -----------------------------------------------------------------------------


def note_backup_job(state: HostState, vmid: int, mode: str, deadline: float) -> BackupJob:
    """pre-stop, before anything stops: the backup job QEMU knows now, kept for the watcher.
    Raises QmpError (then there is no early resume for this backup)."""
    path, _ = _paths(state, vmid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    qmp = socket_path(state.settings, vmid)
    noted = time.time()
    job = ask(qmp, min(deadline, time.monotonic() + NOTE_WAIT))
    _save(path, Watch(vmid, mode, qmp, job.to_dict(), int(noted), state.job.to_dict(), asdict(state.settings)))
    return job


def arm(state: HostState, vmid: int, deadline: float) -> Watch | None:
    """Start the watcher of `vmid` detached, to give up at `deadline` (wall clock). None when pre-stop
    noted no backup job (no early resume); a watcher already running is kept. Raises HookError when
    it cannot be started."""
    path, log_path = _paths(state, vmid)
    w = load(path)
    if w is None:
        return None
    if w.pid and running(w.pid, w.pid_start):
        return w
    w.deadline = deadline
    _save(path, w)
    pid = spawn([sys.executable, "-m", MODULE, path], log_path)
    w.pid, w.pid_start = pid, process_start(pid) or 0
    _save(path, w)
    return w


def disarm(state: HostState, vmid: int, wait: float) -> list[str]:
    """Stop the watcher of `vmid` (a resume under way is finished first; after `wait` seconds it is
    killed) and return what it wrote, once. [] when none was armed."""
    path, log_path = _paths(state, vmid)
    try:
        w = load(path)
    except HookError as e:
        return [f"vzdump-hook: WARNING: {e}"]
    if w is None:
        return []
    if w.pid:
        stop(w.pid, w.pid_start, wait)
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        with open(log_path, errors="replace") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        os.unlink(log_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return lines


def spawn(argv: list[str], log_path: str) -> int:
    """Run `argv` as a daemon: double fork, setsid, stdin /dev/null, stdout and stderr appended to
    `log_path`, no other descriptor (a hook's stdout/stderr pipe or lock kept open would hold vzdump
    or a lock). Returns its pid. Raises HookError when it could not be started."""
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
        raise HookError("the watcher process could not be started")
    return int(data)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of `pid` from /proc, None when there is no such process. (A watcher
    is not the hook's child: once it ends it may stay a zombie until init reaps it.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def running(pid: int, start: int) -> bool:
    """Process `pid` exists, is the one started at `start`, and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


def stop(pid: int, start: int, wait: float) -> None:
    """SIGTERM the watcher, wait up to `wait` seconds for it to end, then SIGKILL it."""
    for sig, patience in ((signal.SIGTERM, wait), (signal.SIGKILL, 5.0)):
        if not running(pid, start):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        until = time.monotonic() + patience
        while running(pid, start) and time.monotonic() < until:
            time.sleep(0.02)


# -- the watcher process -------------------------------------------------------------------------


class _Stopped(BaseException):
    """SIGTERM outside a resume: end now. (BaseException: no `except Exception` swallows it.)"""


class _Over(Exception):
    """Nothing left to do: the stacks run again, the job is over, or the deadline passed."""


class Watcher:
    def __init__(self, w: Watch) -> None:
        self.w = w
        self.job = w.job_id()
        self.settings = HookSettings(**w.settings)
        self.until = time.monotonic() + max(0.0, w.deadline - time.time())
        self.critical = False  # a resume is under way: SIGTERM lets it finish
        self.stop_requested = False
        self.busy = 0

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        if not self.critical:
            raise _Stopped

    def left(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def run(self) -> int:
        """Watch, and resume once the job has started. SIGTERM (main thread only) ends it."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.on_term)
        try:
            self._run()
        except (_Stopped, _Over):
            pass
        except HookError as e:
            log.warning("watcher %d: %s: the stacks start at backup-end", self.w.vmid, e)
        except Exception as e:  # the watcher is an optimisation: backup-end still resumes
            log.warning("watcher %d: %s: %s: the stacks start at backup-end", self.w.vmid, type(e).__name__, e)
        return 0

    def _run(self) -> None:
        from .. import config as configuration
        from ..controller import GuestController
        from ..hook import PhaseRunner
        from ..phases import Mode
        from ..state import HostState

        state = HostState(self.settings, self.job)
        rec = state.load(self.w.vmid)
        if rec is None or not rec.status.pending:
            return
        guest = configuration.validate_guest(self.w.vmid, rec.guest_table)
        runner = PhaseRunner(None, self.settings, self.job)
        runner.deadline = self.until
        stop_mode = self.w.mode == Mode.STOP.value
        ctl = GuestController(guest, self.job)
        try:
            if not stop_mode:  # the guest runs on: connect now, not after the job start
                with contextlib.suppress(HookError):
                    ctl.t.connect(min(self.left(), 10.0))
            job = self._wait_for_job(state)
            if job is None:
                return
            log.info(
                "watcher %d: QEMU backup job %s at %s, seen at %s%s: starting the stacks",
                self.w.vmid, job.uuid, time.strftime("%H:%M:%S", time.localtime(job.start_time)), time.strftime("%H:%M:%S"),
                f" (QMP busy {self.busy}x, backed off)" if self.busy else "",
            )
            if stop_mode:  # the VM boots while the job transfers
                try:
                    ctl.wait_ready(guest.resume_wait, self.until)
                except ConnectError as e:
                    log.warning("watcher %d: the guest did not answer after the restart: %s: the stacks start at backup-end", self.w.vmid, e)
                    return
            self._resume(runner, ctl, state)
        finally:
            ctl.close()

    def _check(self, state: HostState) -> None:
        rec = state.load(self.w.vmid)
        if rec is None or not rec.status.pending:
            raise _Over  # another phase or process started them
        if self.job.is_over():
            log.info("watcher %d: its vzdump job is over: the next job-start (or the guest) starts the stacks", self.w.vmid)
            raise _Over
        if self.left() <= 0:
            log.info("watcher %d: no QEMU backup job start seen by its deadline: the stacks start at backup-end", self.w.vmid)
            raise _Over

    def _wait_for_job(self, state: HostState) -> BackupJob | None:
        """The job this backup started, once QMP reports it; None when that is not clear."""
        before, path = self.w.before_job, self.w.qmp
        pause = POLL
        while True:
            self._check(state)
            try:
                job = query_backup(path, max(0.05, min(QUERY_TIMEOUT, self.left())))
            except QmpBusy:
                self.busy += 1
                time.sleep(pause)
                pause = min(2 * pause, MAX_BACKOFF)
                continue
            except QmpUnavailable:  # stop mode: QEMU is being replaced
                time.sleep(POLL)
                continue
            except QmpError as e:
                log.warning("watcher %d: %s: the stacks start at backup-end", self.w.vmid, e)
                return None
            pause = POLL
            if is_new_job(job, before, self.w.not_before):
                return job
            if job.uuid and job.uuid != before.uuid and job.status == "error":
                log.info("watcher %d: QEMU backup job %s failed (%s): the stacks start when vzdump ends this backup", self.w.vmid, job.uuid, job.errmsg or "?")
                return None
            time.sleep(POLL)

    def _resume(self, runner: Any, ctl: GuestController, state: HostState) -> None:
        for attempt in range(RESUME_TRIES):
            self.critical = True
            try:
                done = runner.resume_with(ctl, "watcher", wait=False)
            finally:
                self.critical = False
            if done or self.stop_requested:
                return
            if attempt + 1 < RESUME_TRIES:
                time.sleep(min(RETRY_PAUSE, self.left()))
                self._check(state)


def main(argv: list[str] | None = None) -> int:
    """`python -m vzdump_hook.qemu.watcher WATCH_FILE`: run the watcher (armed by the hook)."""
    args = sys.argv[1:] if argv is None else argv
    from ..hook import setup_logging

    setup_logging(debug=bool(os.environ.get("VZDUMP_HOOK_DEBUG")))
    if len(args) != 1:
        print("usage: python -m vzdump_hook.qemu.watcher WATCH_FILE (armed by vzdump-hook)", file=sys.stderr)
        return 2
    try:
        w = load(args[0])
    except HookError as e:
        log.warning("watcher: %s", e)
        return 2
    if w is None:
        return 0
    watcher = Watcher(w)
    hard = threading.Timer(watcher.left() + HARD_GRACE, os._exit, args=(0,))  # whatever hangs, it ends
    hard.daemon = True
    hard.start()
    return watcher.run()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # never wait for a thread stuck on a dead guest
