"""Host-side state: per-job guest records under /run (with a lock per guest), history in SQLite.

The records let later phases (new processes) know what this job stopped and how to reach the guest,
even if the config file changed or broke in between. The truth about what is down is the marker
in the guest; these records are the node's copy for the task log, job-end summary and `status`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from ..config import HookSettings, NotifyConfig
from ..errors import HookError
from ..guest.marker import StackRecord, record_from_dict
from ..stacks import Kind
from ..vzdump.phases import GuestType, Mode
from . import safefile
from .job import JobId


class Status(str, Enum):
    PREFLIGHT_OK = "preflight-ok"
    PREFLIGHT_FAILED = "preflight-failed"
    SKIPPED = "skipped"  # guest not running, nothing to do
    QUIESCING = "quiescing"  # marker written, stops under way (a killed hook leaves this)
    QUIESCED = "quiesced"  # stacks down, waiting for the point in time to pass
    NOTHING_STOPPED = "nothing-stopped"
    RESUMED = "resumed"
    RESUME_FAILED = "resume-failed"  # still down: retried at every later phase, fails job-end
    CONFIG_ERROR = "config-error"  # the config could not be read: backed up without quiescing

    @property
    def pending(self) -> bool:
        """Stacks of this guest may be down and must be started by this job."""
        return self in (Status.QUIESCING, Status.QUIESCED, Status.RESUME_FAILED)


@dataclass
class GuestRecord:
    vmid: int
    vmtype: GuestType
    mode: Mode
    guest_table: dict[str, Any]
    status: Status = Status.PREFLIGHT_OK
    stacks: list[StackRecord] = field(default_factory=list)  # what the hook stopped
    stop_started: float | None = None
    stop_ended: float | None = None
    resumed_at: float | None = None
    crash_consistent: bool = False
    problems: list[str] = field(default_factory=list)
    compose: list[str] = field(default_factory=list)  # detected at preflight: pre-stop need not ask again
    # controllers: what to tell them once resumed ("done" after backup-end, "failed" after backup-abort)
    ended: str = ""
    closed: list[str] = field(default_factory=list)  # controllers that confirmed the job's end (stacks/controller.py)
    marker_left: bool = False  # the resume left a marker in the guest (an invalid one, or one listing what failed)
    started_at: float | None = None  # when the start returned; with `ready`, resumed_at is when the apps answered
    ready_pending: list[str] = field(default_factory=list)  # started stacks whose `ready` is still awaited
    # stacks not ready within their ready_timeout (reported, never a failure)
    not_ready: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # names the config gives that the guest does not have
    app_down_at: float | None = None  # when every stack stopped has `ready`: its first failed check during the stop

    def __post_init__(self) -> None:
        # typed whatever it was built from: a record read back from JSON holds the values
        self.vmtype, self.mode = GuestType(self.vmtype), Mode(self.mode)

    @property
    def unclosed_controllers(self) -> list[StackRecord]:
        """The controllers this job asked to quiesce that have not confirmed the job's end yet (the
        end is abort at the resume for one that did not confirm the quiesce: stacks/conversation.py)."""
        return [s for s in self.stacks if s.kind is Kind.CONTROLLER and s.name not in self.closed]

    @property
    def downtime(self) -> float | None:
        """From the app going down (seen by the stacks' `ready` checks; else when the stop was issued)
        to the app back (ready; else started)."""
        start = self.app_down_at if self.app_down_at is not None else self.stop_started
        if start is None or self.resumed_at is None:
            return None
        return self.resumed_at - start

    def to_json(self) -> str:
        d = asdict(self)
        d["status"] = self.status.value
        d["stacks"] = [s.to_dict() for s in self.stacks]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> GuestRecord:
        d = json.loads(text)
        d["status"] = Status(d["status"])
        d["stacks"] = [record_from_dict(s) for s in d["stacks"]]
        return cls(**d)


SETTINGS_FILE = "settings.json"
# the chained scripts for the sh launcher (examples/node/vzdump-hook), which runs them itself when the
# program cannot start: the chain_timeout on the first line, then one path per line
CHAIN_FILE = "chain.list"


def remember_settings(settings: HookSettings, state_dir: str) -> None:
    """Keep the [hook] settings of the last valid config in `state_dir` (the default one, where a
    broken config cannot move it): a phase that cannot read the config still finds its run dir,
    state dir and chained scripts. Written only when they changed."""
    path = os.path.join(state_dir, SETTINGS_FILE)
    kept = asdict(settings)
    if settings.notify is not None:  # the url is the webhook's secret (a healthchecks or ntfy url): kept as its hash
        kept["notify"] = {**kept["notify"], "url": "", "url_sha256": settings.notify.key()}
    text = json.dumps(kept, sort_keys=True)
    safefile.private_dir(state_dir)  # also an older install's 0755 state dir
    # a path with a control character cannot be one line of the list: the launcher leaves it out
    chain = "".join(f"{p}\n" for p in settings.chain if p.isprintable())
    _write_if_changed(os.path.join(state_dir, CHAIN_FILE), f"{settings.chain_timeout:g}\n{chain}")
    _write_if_changed(path, text)


def _write_if_changed(path: str, text: str) -> None:
    with contextlib.suppress(OSError):
        with open(path) as f:
            if f.read() == text and stat.S_IMODE(os.fstat(f.fileno()).st_mode) == 0o600:
                return
    write_atomic(path, text)


def write_json(path: str, data: object) -> None:
    """`data` as JSON at `path` (write_atomic), its directory made 0700 if missing: the run dir's files."""
    safefile.private_dir(os.path.dirname(path))
    write_atomic(path, json.dumps(data))


def write_atomic(path: str, text: str) -> None:
    """Replace the file at `path` with `text`, readable by root alone (safefile.write_atomic: no link
    followed, no predictable name; a reader sees the old or the new file, never a part)."""
    safefile.write_atomic(path, text, 0o600)


def remembered_settings(state_dir: str) -> HookSettings | None:
    """The settings remember_settings() kept, or None (none kept, or unreadable)."""
    try:
        with open(os.path.join(state_dir, SETTINGS_FILE)) as f:
            d = json.load(f)
        d["chain"] = tuple(d.get("chain", ()))
        if d.get("notify") is not None:
            n = d["notify"]  # an older install kept the url itself: only its hash is used
            n["url_sha256"] = n.get("url_sha256") or NotifyConfig(n.get("url", "")).key()
            d["notify"] = NotifyConfig(**{**n, "url": ""})
        return HookSettings(**d)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


# -- what the node last heard of a guest's recovery program (backup-start's note, phase/runner.py) -------------

RECOVERY_DIR = "guest-side"
RECHECK = 7 * 86400.0  # seconds a "current" answer is trusted
RECHECK_GAP = 86400.0  # ... a "NOT INSTALLED" or "OUTDATED" one (`guest install` forgets it at once)


def recovery_answer(state_dir: str, vmid: int, now: float) -> str | None:
    """The node's last answer for the guest's recovery program while it is trusted, else None."""
    try:
        with open(os.path.join(state_dir, RECOVERY_DIR, f"{vmid}.json")) as f:
            d = json.load(f)
        answer, at = str(d["recovery"]), float(d["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return answer if 0 <= now - at < (RECHECK if answer == "current" else RECHECK_GAP) else None


def keep_recovery_answer(state_dir: str, vmid: int, answer: str, now: float) -> None:
    d = os.path.join(state_dir, RECOVERY_DIR)
    safefile.private_dir(state_dir)
    os.makedirs(d, mode=0o700, exist_ok=True)
    write_atomic(os.path.join(d, f"{vmid}.json"), json.dumps({"recovery": answer, "at": now}))


def forget_recovery_answers(state_dir: str, vmid: int | None = None, unless_version: str | None = None) -> None:
    """Forget the answer for `vmid` (after `guest install`), or all of them when this node's version
    is no longer `unless_version`'s (an upgrade changes the guest files: every answer is stale)."""
    d = os.path.join(state_dir, RECOVERY_DIR)
    if vmid is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, f"{vmid}.json"))
        return
    stamp = os.path.join(d, "version")
    with contextlib.suppress(OSError):
        with open(stamp) as f:
            if f.read() == unless_version:
                return
    with contextlib.suppress(OSError):
        for name in os.listdir(d):
            if name.endswith(".json"):
                os.unlink(os.path.join(d, name))
    if unless_version is not None:
        safefile.private_dir(state_dir)
        os.makedirs(d, mode=0o700, exist_ok=True)
        write_atomic(stamp, unless_version)


def _read_record(path: str) -> GuestRecord | None:
    """The guest record at `path`, None if there is none. Raises HookError when it is unreadable."""
    try:
        with open(path) as f:
            return GuestRecord.from_json(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HookError(f"host state {path} unreadable: {e}") from None


class LockTimeout(HookError):
    pass


class HostState:
    """State of one job (`job`) under settings.run_dir, history under settings.state_dir."""

    def __init__(self, settings: HookSettings, job: JobId) -> None:
        self.settings = settings
        self.job = job
        self.job_dir = job.directory(settings.run_dir)

    def _make_job_dir(self) -> None:
        """The job's directory, under a run dir only root may enter (an older install's 0755 is fixed)."""
        safefile.private_dir(self.settings.run_dir)
        os.makedirs(self.job_dir, mode=0o700, exist_ok=True)

    # -- per-guest records -----------------------------------------------------------------------

    def _path(self, vmid: int) -> str:
        return os.path.join(self.job_dir, f"guest-{vmid}.json")

    def load(self, vmid: int) -> GuestRecord | None:
        return _read_record(self._path(vmid))

    def save(self, rec: GuestRecord) -> None:
        self._make_job_dir()
        write_atomic(self._path(rec.vmid), rec.to_json())

    def records(self, job_dir: str | None = None) -> list[GuestRecord]:
        """Every guest record of this job (or of the job directory `job_dir`), in VMID order."""
        job_dir = job_dir or self.job_dir
        try:
            names = os.listdir(job_dir)
        except FileNotFoundError:
            return []
        found = (_read_record(os.path.join(job_dir, n)) for n in names
                 if n.startswith("guest-") and n.endswith(".json"))
        return sorted((r for r in found if r is not None), key=lambda r: r.vmid)

    def write_job_info(self) -> None:
        self._make_job_dir()
        with open(os.path.join(self.job_dir, "job.json"), "w") as f:
            json.dump({**self.job.to_dict(), "started": time.time()}, f)

    def set_flag(self, name: str) -> None:
        """Remember `name` for later phases of this job (an empty file in the job directory)."""
        self._make_job_dir()
        with open(os.path.join(self.job_dir, f"flag-{name}"), "w"):
            pass

    def flag(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.job_dir, f"flag-{name}"))

    # -- the config's state for this job --------------------------------------------------------

    def note_config_error(self, text: str) -> None:
        """Remember for job-end that this job ran without a usable config (`text`: why)."""
        self._make_job_dir()
        with open(os.path.join(self.job_dir, "config-error"), "w") as f:
            f.write(text)

    def config_error(self) -> str | None:
        """Why this job ran without a usable config (note_config_error), or None."""
        try:
            with open(os.path.join(self.job_dir, "config-error")) as f:
                return f.read()
        except OSError:
            return None

    def other_jobs(self) -> list[tuple[JobId | None, str]]:
        """(job, directory) of every other job directory; job None when unreadable."""
        base = os.path.join(self.settings.run_dir, "jobs")
        out: list[tuple[JobId | None, str]] = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(base)):
                if name == self.job.key:
                    continue
                d = os.path.join(base, name)
                job: JobId | None = None
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    with open(os.path.join(d, "job.json")) as f:
                        j = json.load(f)
                    job = JobId(j["node"], j["boot"], int(j["pid"]), int(j["start"]))
                out.append((job, d))
        return out

    # -- locks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def guest_lock(self, vmid: int, timeout: float) -> Iterator[None]:
        """Exclusive per-guest lock (across processes), waited for at most `timeout` seconds."""
        lock_dir = os.path.join(self.settings.run_dir, "locks")
        safefile.private_dir(self.settings.run_dir)
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(lock_dir, f"{vmid}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise LockTimeout(f"guest {vmid}: another vzdump-hook process holds its lock "
                                          f"for more than {timeout:.0f} s") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # -- history -------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        safefile.private_dir(self.settings.state_dir)
        db = sqlite3.connect(os.path.join(self.settings.state_dir, "history.sqlite"), timeout=10)
        db.execute(
            "CREATE TABLE IF NOT EXISTS runs (job TEXT, node TEXT, vmid INTEGER, vmtype TEXT, mode TEXT, "
            "stacks TEXT, stop_started REAL, stop_ended REAL, resumed_at REAL, downtime REAL, "
            "status TEXT, crash_consistent INTEGER, problems TEXT, PRIMARY KEY (job, vmid))"
        )
        return db

    def record_history(self, rec: GuestRecord) -> None:
        with contextlib.closing(self._db()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    f"{self.job.node}/{self.job.key}",
                    self.job.node,
                    rec.vmid,
                    rec.vmtype.value,
                    rec.mode.value,
                    ",".join(s.name for s in rec.stacks),
                    rec.stop_started,
                    rec.stop_ended,
                    rec.resumed_at,
                    rec.downtime,
                    rec.status.value,
                    int(rec.crash_consistent),
                    "\n".join(rec.problems),
                ),
            )

    def history(self, vmid: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with contextlib.closing(self._db()) as db:
            db.row_factory = sqlite3.Row
            q = ("SELECT * FROM runs" + (" WHERE vmid = ?" if vmid is not None else "")
                 + " ORDER BY stop_started DESC LIMIT ?")
            args: tuple[Any, ...] = (vmid, limit) if vmid is not None else (limit,)
            return [dict(r) for r in db.execute(q, args)]
