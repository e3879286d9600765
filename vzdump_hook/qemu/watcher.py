"""QEMU's backup job as a resume trigger: the backup's point in time for a QEMU guest is the start of
QEMU's backup job, which has no hook of its own. The resident (vzdump_hook/resident/process.py) asks QMP
`query-backup` until that job has started, then starts the stacks. Whatever is unclear leaves the start
to `backup-end`, as without early resume.

- `pre-stop`, before anything stops: `note_backup_job` asks QEMU which backup job it knows and keeps
  it in the watch file (`qemu-VMID.json` in the job's run directory). That job (a leftover of an
  earlier backup) never counts; neither does one started before that second. No answer (no socket,
  busy for NOTE_WAIT seconds, not Proxmox VE's QEMU): no early resume.
- The last hook before the job starts (snapshot: `post-restart`; suspend, stop: `pre-stop`, after the
  stop) arms the watch in the resident; from then on `JobWatch.poll` is called about every POLL
  seconds, one request per connection; a busy socket (another client: vzdump, pvestatd) is retried
  after a growing pause. In stop mode the QEMU process is replaced meanwhile (no socket for a while:
  not an error), and the VM boots once the job runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..config import HookSettings
from ..errors import HookError
from .qmp import BackupJob, QmpBusy, QmpError, QmpUnavailable, is_new_job, query_backup

if TYPE_CHECKING:
    from ..node.state import HostState

POLL = 0.1  # seconds between two query-backup while waiting for the job to start
MAX_BACKOFF = 1.0  # seconds: the longest pause after a busy socket (it doubles from POLL)
QUERY_TIMEOUT = 1.0  # seconds for one QMP exchange, greeting included
NOTE_WAIT = 5.0  # pre-stop: seconds to retry a busy socket before giving up on the early resume


def socket_path(settings: HookSettings, vmid: int) -> str:
    return os.path.join(settings.qmp_dir, f"{vmid}.qmp")


@dataclass
class Watch:
    """The watch file (`qemu-VMID.json` in the job's run directory): what pre-stop saw."""

    vmid: int
    mode: str
    qmp: str
    before: dict[str, Any]  # BackupJob.to_dict() of the job QEMU reported before the stop
    not_before: int  # a job started before this second is not this backup's

    @property
    def before_job(self) -> BackupJob:
        return BackupJob.from_return(self.before)


def watching(w: Watch) -> str:
    """The task log's words for an armed watch (after "PHASE VMID: ")."""
    return (f"watching {w.qmp}: the stacks start once QEMU's backup job has started (job before: "
            f"{w.before_job.describe()}), at backup-end at the latest")


def _paths(state: HostState, vmid: int) -> str:
    """The watch file of `vmid` in this job."""
    return os.path.join(state.job_dir, f"qemu-{vmid}.json")


def _save(path: str, w: Watch) -> None:
    from ..node.state import write_json

    write_json(path, asdict(w))


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
    path = _paths(state, vmid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    qmp = socket_path(state.settings, vmid)
    noted = time.time()
    job = ask(qmp, min(deadline, time.monotonic() + NOTE_WAIT))
    _save(path, Watch(vmid, mode, qmp, job.to_dict(), int(noted)))
    return job


class GiveUp(Exception):
    """QMP no longer tells when the job starts: the stacks start when vzdump ends this backup."""


class JobWatch:
    """The start of this backup's QEMU job, asked for one `query-backup` per poll()."""

    def __init__(self, w: Watch) -> None:
        self.w = w
        self.busy = 0  # how often the socket was busy (for the log line)
        self._pause = POLL
        self._next = 0.0  # monotonic: no question before this

    def poll(self, timeout: float) -> BackupJob | None:
        """The job this backup started, once QMP reports it; None while it has not started (or
        while backing off a busy socket). Raises GiveUp when that can no longer be told."""
        now = time.monotonic()
        if now < self._next:
            return None
        try:
            job = query_backup(self.w.qmp, max(0.05, min(QUERY_TIMEOUT, timeout)))
        except QmpBusy:
            self.busy += 1
            self._next = now + self._pause
            self._pause = min(2 * self._pause, MAX_BACKOFF)
            return None
        except QmpUnavailable:  # stop mode: QEMU is being replaced
            return None
        except QmpError as e:
            raise GiveUp(str(e)) from None
        self._pause = POLL
        before = self.w.before_job
        if is_new_job(job, before, self.w.not_before):
            return job
        if job.uuid and job.uuid != before.uuid and job.status == "error":
            raise GiveUp(f"QEMU backup job {job.uuid} failed ({job.errmsg or '?'})")
        return None


def forget(state: HostState, vmid: int) -> None:
    """Remove the watch file of `vmid` in this job (the guest's backup is over)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_paths(state, vmid))
