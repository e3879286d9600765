"""A stand-in for Proxmox VE's ``vzdump`` that calls a hook executable exactly as vzdump does.

Written from docs/design.md §1 and checked against the sources it cites (pve-manager ``PVE/VZDump.pm``
``exec_backup``/``exec_backup_task``/``run_hook_script``, pve-container ``PVE/VZDump/LXC.pm``,
qemu-server ``PVE/VZDump/QemuServer.pm``). It does not import ``vzdump_hook``: it is the
independent referee the package is tested against.

How a hook is called (one new process per phase, all children of the job's own worker process,
tests/infra/vzdump_worker.py, as all phases of a real job are children of the one vzdump worker; it
is not the test's process, ends with the job, and a callback can SIGKILL it by raising
:class:`WorkerKilled`; ``run_phase`` runs a hook as a child of the calling process instead, so
phases played one by one are one job, the caller's):

- argv ``HOOK PHASE`` for job phases, ``HOOK PHASE MODE VMID`` for guest phases; the hook path
  is used as given (vzdump does the same), the working directory is ``/``, stdin is /dev/null.
- The environment is emptied and holds only vzdump's variables, each only when known:
  ``STOREID`` (job uses a storage), ``DUMPDIR`` (not for a PBS storage; in ``job-init`` only when
  a dump directory is given directly, because vzdump resolves the storage's directory after
  ``job-init``), and for guest phases ``VMTYPE``, ``HOSTNAME`` (the guest's name: a CT's
  hostname or ``CT<vmid>``; a VM's ``name``, unset for a VM without a name; unset in
  ``backup-abort``/``log-end`` when the failure came before vzdump read the guest config),
  ``TARGET`` (archive path, or the PBS snapshot name) and ``LOGFILE`` (not for PBS). vzdump's
  runner adds ``LC_ALL=C`` and ``LVM_SUPPRESS_FD_WARNINGS=1`` to every command it runs, the hook
  included (pve-common ``PVE/Cmd.pm`` ``run``, called through ``PVE::Tools::run_command`` by
  pve-manager's ``run_hook_script`` without ``keeplocale``).
- **Test-only deviation**: ``extra_env`` adds variables (e.g. ``VZDUMP_HOOK_CONFIG``,
  ``PYTHONPATH``) to every phase; they may not shadow vzdump's own variables.
- stdout and stderr are read together until both reach EOF, then the process is reaped, as
  ``PVE::Tools::run_command`` does: a background child that keeps the hook's stdout open keeps
  the phase running. Each line (split at ``\\n``, ``\\r`` or backspaces) becomes an
  ``INFO: <line>`` task-log line; empty lines (and, Perl being Perl, a line ``0``) are dropped.
- vzdump has no timeout. The stand-in has a per-phase safety timeout (default 600 s): on expiry
  it kills the hook's process group, records the phase as hung and raises :class:`HookHang`
  (an ``AssertionError``: a hang is a test failure), or returns a ``HUNG`` result with
  ``raise_on_hang=False``. Hooks are started in their own session so the kill reaches their
  children (real vzdump does not do that; the hook cannot observe the difference except via
  ``getsid``).

Phase order per guest (running guest; ``[PIT]`` = the backup's point in time, where
``on_point_in_time`` fires; ``{...}`` = vzdump's clean-up, run on success *and* failure):

==============  =============================================================================
lxc snapshot    backup-start, pre-stop, [PIT storage snapshot], pre-restart, post-restart,
                (transfer), backup-end, log-end
lxc suspend     backup-start, pre-stop, (freeze, final rsync) [PIT], pre-restart, (thaw),
                post-restart, (transfer), backup-end, log-end
lxc stop        backup-start, pre-stop, (shutdown) [PIT], (transfer), backup-end,
                {pre-restart, (start CT), post-restart}, log-end
qemu snapshot   backup-start, pre-stop, pre-restart, post-restart, [PIT QMP job start],
                (transfer), backup-end, log-end
qemu suspend    backup-start, pre-stop, (pause) [PIT job start] (continue), (transfer),
                backup-end, {pre-restart, post-restart}, log-end
qemu stop       backup-start, pre-stop, (shutdown, start paused) [PIT job start] (VM boots),
                (transfer), backup-end, {pre-restart, post-restart}, log-end
not running     backup-start (MODE=stop), [PIT], (transfer), backup-end, log-end
==============  =============================================================================

LXC ``snapshot`` with ``snapshot_supported=False`` runs as ``suspend`` (MODE=suspend for every
phase). LXC ``snapshot`` of a CT with more than one volume (``volumes > 1``): vzdump freezes
the CT itself after ``pre-stop`` (LXC.pm sets ``snapshot_count``); pve-guest-common's
``AbstractConfig::snapshot_create`` thaws it once the volume snapshots are taken, so it runs again
at ``pre-restart``; vzdump's own thaw after ``pre-restart`` finds it running - same hook order, but
it changes the abort path (below).

Callbacks (``ctx`` is a :class:`Context`; all run in the calling thread, between hooks):

- ``on_phase(phase, ctx)``: right before (``Moment.BEFORE_PHASE``) and right after
  (``Moment.AFTER_PHASE``, ``ctx.record`` set) every hook process, job phases included.
- ``on_guest_shutdown(ctx)``: stop mode, running guest: after ``pre-stop`` (vzdump shut it down).
- ``on_point_in_time(ctx)``: at ``[PIT]`` above: lxc snapshot/suspend between ``pre-stop`` and
  ``pre-restart``; lxc stop after the shutdown; qemu snapshot after ``post-restart``; qemu
  suspend after ``pre-stop``; qemu stop after the shutdown (VM started paused). Not-running
  guests: after ``backup-start``.
- ``on_guest_suspend(ctx)``, ``on_guest_resume(ctx)``: vzdump suspends the running guest and resumes it
  (a test plugs in the real thing here, e.g. ``lxc-freeze``/``lxc-unfreeze``). LXC: the cgroup
  freezer, in suspend mode after ``pre-stop`` until after ``pre-restart`` (or the clean-up's);
  in snapshot mode around the storage snapshot (pve-guest-common's ``snapshot_create`` freezes
  the CT before the volume snapshots and thaws it after them, also when they fail), and with
  ``volumes > 1`` from after ``pre-stop`` (vzdump's own freeze) until that thaw. QEMU suspend: the
  pause after ``pre-stop`` until the job start (or the failure). The context's ``guest_state`` is
  the new one (``suspended``, ``running``).
- ``on_guest_start(ctx)``: the guest OS boots again. qemu stop: right after the PIT (vzdump
  continues the paused VM once the backup job runs), or at the failure if the job never
  started. lxc stop: in the clean-up between ``pre-restart`` and ``post-restart``.
- ``transfer(ctx)``: the data transfer, after the PIT (lxc suspend: the archive of the
  rsynced copy, after ``post-restart``; the rsync passes themselves are not simulated).
  Default: sleep ``transfer_seconds``. Raising :class:`VzdumpError` from any callback makes
  vzdump fail there, like ``fail_at``.

Exit codes and failures (``GuestSpec.fail_at`` names where vzdump itself errors: ``prepare``
before ``backup-start``; ``guest-stop`` when its own shutdown/freeze/pause fails;
``before-point-in-time``; ``after-point-in-time``; ``transfer``):

- Non-zero from a main-path guest phase, or a vzdump failure, fails the guest's backup: the
  remaining main-path phases are skipped. Then vzdump's clean-up runs ``pre-restart``,
  (resume/start), ``post-restart`` only if vzdump itself had suspended or shut down the guest
  and not yet resumed it; then ``backup-abort``, then ``log-end``. Non-zero in the clean-up,
  in ``backup-abort`` or ``log-end`` is a warning.
- Decided from the sources, where docs/design.md is not explicit:
  * lxc snapshot, one volume: the CT is frozen only *inside* the storage-snapshot step, which
    thaws it itself; vzdump sets no resume flag, so a failure after ``pre-stop`` goes straight
    to ``backup-abort`` (no ``pre-restart``/``post-restart``). With ``volumes > 1`` the flag is
    set from the freeze until after ``pre-restart``: a failing ``pre-restart`` is followed by a
    second ``pre-restart`` (clean-up), thaw, ``post-restart``.
  * lxc suspend: the flag is cleared just *before* ``pre-restart``; a failing ``pre-restart``
    leaves the CT frozen (no clean-up phases). A failure before the freeze (``pre-stop``,
    ``guest-stop``) has nothing to resume either.
  * stop mode: a failing ``pre-stop`` or shutdown means the guest was never stopped: no
    restart phases.
  * Clean-up is one ``eval`` in vzdump: a failing clean-up ``pre-restart`` is a warning *and*
    skips the resume/start and ``post-restart`` (lxc stop: the CT stays down).
  * qemu: a failure during the archive step makes vzdump continue the VM right away (it was
    paused/started paused); the clean-up phases follow where the flag was set.
  * ``prepare`` failures come before vzdump settles the mode: ``backup-abort``/``log-end`` see
    the requested MODE and no HOSTNAME.
- Job: ``job-init`` non-zero fails the job before it starts (no ``job-start``, no guests, no
  ``job-abort``: vzdump runs ``job-init`` while setting up). ``job-start`` non-zero:
  ``job-abort``, no guests. Guests run one after another in VMID order. ``job-end`` non-zero:
  ``job-abort``, job failed. A failed guest alone gives "finished with errors", not
  ``job-abort``.

Other deviations: the mode is per guest (vzdump has one per job). Not simulated: the files
behind ``TARGET``/``LOGFILE`` (paths only) and vzdump's per-guest log in /var/log/vzdump, the
LXC rsync passes, the QEMU guest-agent fs-freeze/thaw and QMP socket (a test that needs
``query-backup`` to change provides its own fake and flips it in ``on_point_in_time``).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

DEFAULT_TIMEOUT = 600.0
VZDUMP_VARS = frozenset({"STOREID", "DUMPDIR", "VMTYPE", "HOSTNAME", "TARGET", "LOGFILE", "LC_ALL",
                         "LVM_SUPPRESS_FD_WARNINGS"})
# what PVE's command runner sets for every command (PVE/Cmd.pm run: no keeplocale in vzdump's call)
RUNNER_ENV = {"LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}
_LINE_END = re.compile(rb"\r\n?|\n|\x08+")


class Phase(StrEnum):
    """The phases vzdump calls a hook with."""

    JOB_INIT = "job-init"
    JOB_START = "job-start"
    JOB_END = "job-end"
    JOB_ABORT = "job-abort"
    BACKUP_START = "backup-start"
    PRE_STOP = "pre-stop"
    PRE_RESTART = "pre-restart"
    POST_RESTART = "post-restart"
    BACKUP_END = "backup-end"
    BACKUP_ABORT = "backup-abort"
    LOG_END = "log-end"


class Mode(StrEnum):
    STOP = "stop"
    SUSPEND = "suspend"
    SNAPSHOT = "snapshot"


class GuestType(StrEnum):
    LXC = "lxc"
    QEMU = "qemu"


class FailPoint(StrEnum):
    """Where vzdump itself fails (see the module docstring)."""

    PREPARE = "prepare"
    GUEST_STOP = "guest-stop"
    BEFORE_POINT_IN_TIME = "before-point-in-time"
    AFTER_POINT_IN_TIME = "after-point-in-time"
    TRANSFER = "transfer"


class GuestState(StrEnum):
    RUNNING = "running"
    SUSPENDED = "suspended"
    STOPPED = "stopped"


class Moment(StrEnum):
    """What a callback is being told about."""

    BEFORE_PHASE = "before-phase"
    AFTER_PHASE = "after-phase"
    GUEST_SHUTDOWN = "guest-shutdown"
    POINT_IN_TIME = "point-in-time"
    GUEST_START = "guest-start"
    GUEST_SUSPEND = "guest-suspend"
    GUEST_RESUME = "guest-resume"
    TRANSFER = "transfer"


class BackupStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    NOT_RUN = "not-run"


class JobStatus(StrEnum):
    OK = "ok"  # "Backup job finished successfully"
    ERRORS = "errors"  # "Backup job finished with errors": a guest failed
    FAILED = "failed"  # "Backup job failed": job-init/job-start/job-end failed
    HUNG = "hung"  # a hook outlived the safety timeout
    KILLED = "killed"  # the vzdump worker was SIGKILLed (a callback raised WorkerKilled): nothing more ran


class VzdumpError(Exception):
    """vzdump itself fails at this point (raise it from a callback to simulate that)."""


class WorkerKilled(Exception):  # noqa: N818 - an event, not an error of the stand-in
    """Raise it from a callback: the job's vzdump worker is SIGKILLed right there (OOM, a node-local
    crash) and runs nothing more: no hook, no clean-up, no job-end."""


_FAIL_MESSAGES = {
    FailPoint.PREPARE: "simulated failure before backup-start (lock/prepare)",
    FailPoint.GUEST_STOP: "simulated failure stopping/suspending the guest",
    FailPoint.BEFORE_POINT_IN_TIME: "simulated failure before the point in time",
    FailPoint.AFTER_POINT_IN_TIME: "simulated failure after the point in time",
    FailPoint.TRANSFER: "simulated failure writing the archive",
}


@dataclass(frozen=True)
class GuestSpec:
    """One guest of the job. ``volumes`` counts a CT's volumes in the backup (rootfs + mount points)."""

    vmid: int
    vmtype: GuestType
    mode: Mode = Mode.SNAPSHOT
    running: bool = True
    hostname: str | None = None
    snapshot_supported: bool = True
    volumes: int = 1
    fail_at: FailPoint | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vmtype", GuestType(self.vmtype))
        object.__setattr__(self, "mode", Mode(self.mode))
        if self.fail_at is not None:
            object.__setattr__(self, "fail_at", FailPoint(self.fail_at))
        if not self.snapshot_supported and self.vmtype is GuestType.QEMU:
            raise ValueError("snapshot_supported=False: only LXC falls back to suspend")
        if self.fail_at is FailPoint.GUEST_STOP and not self.vzdump_stops_guest:
            raise ValueError(f"fail_at=guest-stop: vzdump does not stop/suspend {self}")

    @property
    def effective_mode(self) -> Mode:
        """The MODE the hooks see once vzdump has settled it."""
        if not self.running:
            return Mode.STOP
        if self.mode is Mode.SNAPSHOT and not self.snapshot_supported:
            return Mode.SUSPEND
        return self.mode

    @property
    def freezes_for_snapshot(self) -> bool:
        """LXC snapshot of a multi-volume CT: vzdump freezes the CT around the snapshots."""
        return (
            self.vmtype is GuestType.LXC
            and self.effective_mode is Mode.SNAPSHOT
            and self.volumes > 1
        )

    @property
    def vzdump_stops_guest(self) -> bool:
        """vzdump itself shuts down, freezes or pauses the guest."""
        return self.running and (
            self.effective_mode in (Mode.STOP, Mode.SUSPEND) or self.freezes_for_snapshot
        )


@dataclass(frozen=True)
class OutputLine:
    """One line the hook wrote."""

    stream: str  # "stdout" | "stderr"
    text: str
    time: float  # time.monotonic()


@dataclass(frozen=True)
class PhaseRecord:
    """One hook process. ``returncode`` is None when it hung; ``fatal``: non-zero fails the
    guest's backup (guest phase) or the job (job phase)."""

    phase: str
    vmid: int | None
    argv: tuple[str, ...]
    env: Mapping[str, str]
    returncode: int | None
    start: float
    end: float
    output: tuple[OutputLine, ...]
    fatal: bool

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def hung(self) -> bool:
        return self.returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def lines(self) -> list[str]:
        return [line.text for line in self.output]


@dataclass(frozen=True)
class LogLine:
    """A task-log line as PVE shows it (``text`` starts with ``INFO:``/``WARN:``/``ERROR:``)."""

    text: str
    level: str
    time: float
    vmid: int | None = None
    phase: str | None = None  # set for lines the hook wrote
    stream: str | None = None


@dataclass(frozen=True)
class Context:
    """What a callback gets: the moment, the guest (None for job phases) and its state."""

    moment: Moment
    time: float
    guest: GuestSpec | None = None
    mode: Mode | None = None  # the MODE the hooks see at this moment
    guest_state: GuestState | None = None
    phase: str | None = None
    record: PhaseRecord | None = None  # set after a phase
    worker_pid: int | None = None  # the job's vzdump worker: the parent of its hooks

    @property
    def vmid(self) -> int | None:
        return self.guest.vmid if self.guest else None


@dataclass(frozen=True)
class GuestResult:
    """One guest's backup: status, why it failed, its point in time and its hook records."""

    spec: GuestSpec
    mode: Mode
    status: BackupStatus
    error: str | None
    point_in_time: float | None
    guest_state: GuestState
    records: tuple[PhaseRecord, ...]
    warnings: tuple[str, ...]

    @property
    def phases(self) -> list[str]:
        return [str(r.phase) for r in self.records]


@dataclass(frozen=True)
class JobResult:
    """A whole job: every hook record in order, per-guest results, the task log."""

    status: JobStatus
    error: str | None
    records: tuple[PhaseRecord, ...]
    guests: tuple[GuestResult, ...]
    log: tuple[LogLine, ...]
    hang: PhaseRecord | None = None

    @property
    def ok(self) -> bool:
        return self.status is JobStatus.OK

    def phases(self, vmid: int | None = None) -> list[str]:
        """All phases in order, or only those of guest ``vmid``."""
        return [str(r.phase) for r in self.records if vmid is None or r.vmid == vmid]

    def guest(self, vmid: int) -> GuestResult:
        return next(g for g in self.guests if g.spec.vmid == vmid)

    @property
    def point_in_time(self) -> dict[int, float | None]:
        return {g.spec.vmid: g.point_in_time for g in self.guests}

    @property
    def warnings(self) -> list[str]:
        return [line.text for line in self.log if line.level == "WARN"]

    def task_log(self) -> str:
        return "".join(line.text + "\n" for line in self.log)


class HookHang(AssertionError):
    """A hook ran longer than the safety timeout: real vzdump would wait forever."""

    def __init__(self, record: PhaseRecord, timeout: float) -> None:
        super().__init__(
            f"hook hung: {' '.join(record.argv)} still running after {timeout:g} s "
            "(vzdump has no timeout: the backup job would hang)"
        )
        self.record = record
        self.result: JobResult | None = None


class _Hung(Exception):
    def __init__(self, record: PhaseRecord) -> None:
        super().__init__(record.phase)
        self.record = record


Callback = Callable[[Context], None]
PhaseCallback = Callable[[str, Context], None]


@dataclass
class _Task:
    """vzdump's per-guest ``$task`` plus the simulated guest state."""

    spec: GuestSpec
    mode: Mode
    target: str
    logfile: str | None
    state: GuestState
    hostname: str | None = None
    point_in_time: float | None = None
    stopped_at: float | None = None
    records: list[PhaseRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Cleanup:
    resume: bool = False
    restart: bool = False


def _guest_name(spec: GuestSpec) -> str | None:
    """HOSTNAME as vzdump's plugins set it: CT hostname or ``CT<vmid>``; VM name or unset."""
    if spec.hostname:
        return spec.hostname
    return f"CT{spec.vmid}" if spec.vmtype is GuestType.LXC else None


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vzdump_worker.py")


class _Worker:
    """The job's vzdump worker (tests/infra/vzdump_worker.py): a process of its own, the parent of
    every hook of the job, as vzdump's one worker process is; it can be killed between two hooks."""

    def __init__(self, cwd: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, WORKER, str(theirs.fileno())], stdin=subprocess.DEVNULL, env={},
                                     cwd=cwd, pass_fds=(theirs.fileno(),))
        theirs.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def spawn(self, argv: list[str], env: Mapping[str, str], out: int, err: int) -> int:
        """Start a hook with stdout `out` and stderr `err`; its pid. Raises OSError when it cannot start."""
        self.sock.settimeout(30)
        self.sock.sendmsg([json.dumps({"argv": argv, "env": dict(env)}).encode()],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [out, err]))])
        reply = self._recv()
        if "error" in reply:
            raise OSError(0, reply["error"])
        return int(reply["pid"])

    def wait(self, timeout: float | None) -> int:
        """The exit status of the running hook (subprocess's convention); TimeoutExpired."""
        self.sock.settimeout(timeout)
        try:
            return int(self._recv()["status"])
        except TimeoutError:
            raise subprocess.TimeoutExpired("hook", timeout or 0) from None

    def _recv(self) -> dict[str, Any]:
        data = self.sock.recv(1 << 16)
        if not data:
            raise RuntimeError("the stand-in's vzdump worker died")
        reply: dict[str, Any] = json.loads(data)
        return reply

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.sock.close()

    def close(self) -> None:
        self.sock.close()  # the worker ends at EOF
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


class _Spawned:
    """A hook started by the worker, shaped like the Popen that _collect reads."""

    def __init__(self, worker: _Worker, pid: int, out: int, err: int) -> None:
        self.worker, self.pid = worker, pid
        self.stdout, self.stderr = os.fdopen(out, "rb", buffering=0), os.fdopen(err, "rb", buffering=0)
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.worker.wait(timeout)
        return self.returncode


@dataclass
class _Job:
    """Plays one vzdump job; mirrors the structure of ``PVE::VZDump::exec_backup(_task)``."""

    hook: str
    storeid: str | None = "local"
    dumpdir: str | None = "/var/lib/vz/dump"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT
    cwd: str = "/"
    transfer: Callback | None = None
    transfer_seconds: float = 0.0
    on_point_in_time: Callback | None = None
    on_phase: PhaseCallback | None = None
    on_guest_shutdown: Callback | None = None
    on_guest_start: Callback | None = None
    on_guest_suspend: Callback | None = None
    on_guest_resume: Callback | None = None
    on_log: Callable[[LogLine], None] | None = None
    records: list[PhaseRecord] = field(default_factory=list, init=False)
    log: list[LogLine] = field(default_factory=list, init=False)
    guests: list[GuestResult] = field(default_factory=list, init=False)
    worker: _Worker | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.storeid is None and self.dumpdir is None:
            raise ValueError("need a storage (storeid) or a dump directory (dumpdir)")
        clash = VZDUMP_VARS & set(self.extra_env)
        if clash:
            raise ValueError(f"extra_env may not set vzdump's own variables: {sorted(clash)}")

    # -- task log ---------------------------------------------------------------------------

    def _say(
        self,
        msg: str,
        level: str = "INFO",
        vmid: int | None = None,
        phase: str | None = None,
        stream: str | None = None,
    ) -> None:
        for text in msg.rstrip("\n").split("\n"):
            line = LogLine(f"{level}: {text}", level, time.monotonic(), vmid, phase, stream)
            self.log.append(line)
            if self.on_log:
                self.on_log(line)

    # -- hook processes ---------------------------------------------------------------------

    def _env(self, phase: str, task: _Task | None) -> dict[str, str]:
        env: dict[str, str] = dict(RUNNER_ENV)
        if self.storeid:
            env["STOREID"] = self.storeid
        # job-init runs before vzdump resolves the storage's directory
        if self.dumpdir and (phase != Phase.JOB_INIT or not self.storeid):
            env["DUMPDIR"] = self.dumpdir
        if task:
            for key, value in (
                ("VMTYPE", str(task.spec.vmtype)),
                ("HOSTNAME", task.hostname),
                ("TARGET", task.target),
                ("LOGFILE", task.logfile),
            ):
                if value:
                    env[key] = value
        env.update(self.extra_env)
        return env

    def _ctx(
        self,
        moment: Moment,
        task: _Task | None = None,
        phase: str | None = None,
        record: PhaseRecord | None = None,
    ) -> Context:
        return Context(
            moment=moment,
            time=time.monotonic(),
            guest=task.spec if task else None,
            mode=task.mode if task else None,
            guest_state=task.state if task else None,
            phase=phase,
            record=record,
            worker_pid=self.worker.pid if self.worker else None,
        )

    def hook_phase(
        self, phase: str, task: _Task | None = None, *, fatal: bool = True
    ) -> PhaseRecord:
        """Run one hook process; raise VzdumpError on non-zero exit, _Hung on timeout."""
        argv = [self.hook, str(phase)]
        if task:
            argv += [str(task.mode), str(task.spec.vmid)]
        cmdstr = " ".join(argv)
        env = self._env(phase, task)
        vmid = task.spec.vmid if task else None
        if self.on_phase:
            self.on_phase(phase, self._ctx(Moment.BEFORE_PHASE, task, phase))
        start = time.monotonic()
        try:
            proc = self._spawn(argv, env)
        except OSError as exc:
            raise VzdumpError(f"command '{cmdstr}' failed: {exc.strerror}") from exc
        output, returncode = self._collect(proc, start + self.timeout, vmid, phase)
        record = PhaseRecord(
            phase=phase,
            vmid=vmid,
            argv=tuple(argv),
            env=env,
            returncode=returncode,
            start=start,
            end=time.monotonic(),
            output=tuple(output),
            fatal=fatal,
        )
        self.records.append(record)
        if task:
            task.records.append(record)
        if returncode is None:
            raise _Hung(record)
        if self.on_phase:
            self.on_phase(phase, self._ctx(Moment.AFTER_PHASE, task, phase, record))
        if returncode > 0:
            raise VzdumpError(f"command '{cmdstr}' failed: exit code {returncode}")
        if returncode < 0:
            raise VzdumpError(f"command '{cmdstr}' failed: got signal {-returncode}")
        return record

    def _spawn(self, argv: list[str], env: dict[str, str]) -> _Spawned | subprocess.Popen[bytes]:
        """Start a hook: by the job's worker (run_job), or as a child of this process (run_phase)."""
        if self.worker is None:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd=self.cwd, start_new_session=True)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = self.worker.spawn(argv, env, out_w, err_w)
        except OSError:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return _Spawned(self.worker, pid, out_r, err_r)

    def _collect(
        self, proc: _Spawned | subprocess.Popen[bytes], deadline: float, vmid: int | None, phase: str
    ) -> tuple[list[OutputLine], int | None]:
        """Read stdout+stderr until both hit EOF, then reap; (lines, None) on timeout."""
        assert proc.stdout is not None and proc.stderr is not None
        output: list[OutputLine] = []
        pending = {"stdout": b"", "stderr": b""}

        def emit(stream: str, raw: bytes) -> None:
            text = raw.decode("utf-8", errors="replace")
            output.append(OutputLine(stream, text, time.monotonic()))
            if text not in ("", "0"):  # debugmsg's `return if !$msg`
                self._say(text, vmid=vmid, phase=phase, stream=stream)

        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in sel.select(remaining):
                    stream = str(key.data)
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        if pending[stream]:
                            emit(stream, pending[stream])
                        continue
                    parts = _LINE_END.split(pending[stream] + chunk)
                    pending[stream] = parts.pop()
                    for part in parts:
                        emit(stream, part)
            eof = not sel.get_map()
        returncode: int | None = None
        if eof:
            try:
                returncode = proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                pass
        if returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        return output, returncode

    # -- the guest's backup -----------------------------------------------------------------

    def _fail(self, task: _Task, point: FailPoint) -> None:
        if task.spec.fail_at is point:
            raise VzdumpError(_FAIL_MESSAGES[point])

    def _notify(self, callback: Callback | None, moment: Moment, task: _Task) -> None:
        if callback:
            callback(self._ctx(moment, task))

    def _point_in_time(self, task: _Task) -> None:
        self._fail(task, FailPoint.BEFORE_POINT_IN_TIME)
        task.point_in_time = time.monotonic()
        self._notify(self.on_point_in_time, Moment.POINT_IN_TIME, task)

    def _transfer(self, task: _Task) -> None:
        if self.transfer:
            self.transfer(self._ctx(Moment.TRANSFER, task))
        elif self.transfer_seconds > 0:
            time.sleep(self.transfer_seconds)
        self._fail(task, FailPoint.TRANSFER)

    def _guest_up(self, task: _Task) -> None:
        """The guest runs again: booted (after a shutdown) or thawed/continued."""
        was = task.state
        task.state = GuestState.RUNNING
        if was is GuestState.STOPPED:
            self._notify(self.on_guest_start, Moment.GUEST_START, task)
        elif was is GuestState.SUSPENDED:
            self._notify(self.on_guest_resume, Moment.GUEST_RESUME, task)

    def _suspend(self, task: _Task) -> None:
        """vzdump (or snapshot_create) freezes the CT / pauses the VM."""
        task.state = GuestState.SUSPENDED
        self._notify(self.on_guest_suspend, Moment.GUEST_SUSPEND, task)

    def _online_again(self, task: _Task) -> None:
        if task.stopped_at is not None:
            delay = time.monotonic() - task.stopped_at
            task.stopped_at = None
            self._say(f"guest is online again after {delay:.0f} seconds", vmid=task.spec.vmid)

    def _archive(self, task: _Task) -> None:
        vmid = task.spec.vmid
        self._say(f"creating vzdump archive '{task.target}'", vmid=vmid)
        if task.spec.vmtype is GuestType.LXC:
            if task.mode is Mode.STOP:  # the archive is read from the stopped CT
                self._point_in_time(task)
                self._fail(task, FailPoint.AFTER_POINT_IN_TIME)
            self._transfer(task)
            return
        # QEMU: the point in time is the start of the QMP backup job; on any error inside
        # archive() qemu-server continues a VM it had paused/started paused.
        resume = task.spec.running and task.state is not GuestState.RUNNING
        if task.state is GuestState.STOPPED:
            self._say("starting kvm to execute backup task", vmid=vmid)
        try:
            self._point_in_time(task)
            self._say(f"started backup task '{uuid.uuid4()}'", vmid=vmid)
            if resume:
                self._say("resuming VM again", vmid=vmid)
                self._guest_up(task)
            self._fail(task, FailPoint.AFTER_POINT_IN_TIME)
            self._transfer(task)
        except VzdumpError:
            if resume and task.state is not GuestState.RUNNING:
                self._say("resuming VM again", vmid=vmid)
                self._guest_up(task)
            raise

    def _main_path(self, task: _Task, cleanup: _Cleanup) -> None:
        spec = task.spec
        self._fail(task, FailPoint.PREPARE)
        if spec.running and spec.mode is Mode.SNAPSHOT and not spec.snapshot_supported:
            self._say("mode failure - some volumes do not support snapshots", vmid=spec.vmid)
            self._say("trying 'suspend' mode instead", vmid=spec.vmid)
        task.mode = spec.effective_mode
        task.hostname = _guest_name(spec)
        self._say(f"backup mode: {task.mode}", vmid=spec.vmid)
        lxc = spec.vmtype is GuestType.LXC

        self.hook_phase(Phase.BACKUP_START, task)
        if task.mode is Mode.STOP:
            if spec.running:
                self._say("stopping virtual guest", vmid=spec.vmid)
                task.stopped_at = time.monotonic()
                self.hook_phase(Phase.PRE_STOP, task)
                self._fail(task, FailPoint.GUEST_STOP)
                task.state = GuestState.STOPPED
                self._notify(self.on_guest_shutdown, Moment.GUEST_SHUTDOWN, task)
                cleanup.restart = True
        elif task.mode is Mode.SUSPEND:
            self._say("suspending guest", vmid=spec.vmid)
            task.stopped_at = time.monotonic()
            self.hook_phase(Phase.PRE_STOP, task)
            self._fail(task, FailPoint.GUEST_STOP)
            cleanup.resume = True
            self._suspend(task)
            if lxc:  # final rsync while frozen: that copy is the backup's content
                self._point_in_time(task)
                self._fail(task, FailPoint.AFTER_POINT_IN_TIME)
                self._say("resuming guest", vmid=spec.vmid)
                cleanup.resume = False
                self.hook_phase(Phase.PRE_RESTART, task)
                self._guest_up(task)
                self.hook_phase(Phase.POST_RESTART, task)
                self._online_again(task)
        else:
            freeze = spec.freezes_for_snapshot
            self.hook_phase(Phase.PRE_STOP, task)
            if freeze:
                self._say("suspend vm to make snapshot", vmid=spec.vmid)
                task.stopped_at = time.monotonic()
                self._fail(task, FailPoint.GUEST_STOP)
                cleanup.resume = True
                self._suspend(task)
            if lxc:
                self._say("create storage snapshot 'vzdump'", vmid=spec.vmid)
                # snapshot_create (pve-guest-common) freezes the CT around the volume snapshots and thaws
                # it after them, also when they fail; the freezer is on or off, so this also ends
                # vzdump's own freeze (volumes > 1)
                if not freeze:
                    self._suspend(task)
                try:
                    self._point_in_time(task)
                finally:
                    self._guest_up(task)
                self._fail(task, FailPoint.AFTER_POINT_IN_TIME)
            self.hook_phase(Phase.PRE_RESTART, task)
            if freeze:
                self._say("resume vm", vmid=spec.vmid)
                cleanup.resume = False
                self._guest_up(task)
                self._online_again(task)
            self.hook_phase(Phase.POST_RESTART, task)
        self._archive(task)
        self.hook_phase(Phase.BACKUP_END, task)

    def _clean_up(self, task: _Task, cleanup: _Cleanup) -> None:
        if not (cleanup.resume or cleanup.restart):
            return
        # one eval in vzdump: a failing pre-restart also skips the resume/start and post-restart
        try:
            self.hook_phase(Phase.PRE_RESTART, task, fatal=False)
            if cleanup.resume:
                self._say("resume vm", vmid=task.spec.vmid)
                self._guest_up(task)
            elif task.state is GuestState.STOPPED:
                self._say("restarting vm", vmid=task.spec.vmid)
                self._guest_up(task)
            self.hook_phase(Phase.POST_RESTART, task, fatal=False)
        except VzdumpError as exc:
            self._warn(task, str(exc))
        else:
            self._online_again(task)

    def _warn(self, task: _Task, msg: str) -> None:
        task.warnings.append(msg)
        self._say(msg, level="WARN", vmid=task.spec.vmid)

    def new_task(self, spec: GuestSpec) -> _Task:
        """vzdump's ``$task`` before ``prepare``: requested mode, target and log file, no name."""
        vmid, vmtype = spec.vmid, spec.vmtype
        if self.dumpdir:
            base = f"{self.dumpdir}/vzdump-{vmtype}-{vmid}-{time.strftime('%Y_%m_%d-%H_%M_%S')}"
            ext = ".tar.zst" if vmtype is GuestType.LXC else ".vma.zst"
            target, logfile = base + ext, base + ".log"
        else:  # Proxmox Backup Server: a snapshot name, no log file
            kind = "ct" if vmtype is GuestType.LXC else "vm"
            target = f"{kind}/{vmid}/{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
            logfile = None
        return _Task(
            spec=spec,
            mode=spec.mode,
            target=target,
            logfile=logfile,
            state=GuestState.RUNNING if spec.running else GuestState.STOPPED,
        )

    def backup_guest(self, spec: GuestSpec) -> GuestResult:
        """One guest; the result is also kept for the job (a hung guest counts as failed)."""
        task = self.new_task(spec)
        try:
            error = self._exec_backup_task(task)
        except _Hung as hung:
            self._finish(task, f"hook hung: {' '.join(hung.record.argv)}")
            raise
        return self._finish(task, error)

    def _exec_backup_task(self, task: _Task) -> str | None:
        """Main path, clean-up, backup-abort, log-end; returns the backup's error, if any."""
        vmid = task.spec.vmid
        started = time.monotonic()
        self._say(f"Starting Backup of VM {vmid} ({task.spec.vmtype})", vmid=vmid)
        self._say(f"status = {task.state}", vmid=vmid)
        cleanup = _Cleanup()
        error: str | None = None
        try:
            self._main_path(task, cleanup)
        except VzdumpError as exc:
            error = str(exc)
        self._clean_up(task, cleanup)
        if error is not None:
            self._say(f"Backup of VM {vmid} failed - {error}", level="ERROR", vmid=vmid)
            try:
                self.hook_phase(Phase.BACKUP_ABORT, task, fatal=False)
            except VzdumpError as exc:
                self._warn(task, str(exc))
        else:
            took = _fmt_time(time.monotonic() - started)
            self._say(f"Finished Backup of VM {vmid} ({took})", vmid=vmid)
        try:
            self.hook_phase(Phase.LOG_END, task, fatal=False)
        except VzdumpError as exc:
            self._warn(task, str(exc))
        return error

    def _finish(self, task: _Task, error: str | None) -> GuestResult:
        result = GuestResult(
            spec=task.spec,
            mode=task.mode,
            status=BackupStatus.FAILED if error is not None else BackupStatus.OK,
            error=error,
            point_in_time=task.point_in_time,
            guest_state=task.state,
            records=tuple(task.records),
            warnings=tuple(task.warnings),
        )
        self.guests.append(result)
        return result

    # -- the job ----------------------------------------------------------------------------

    def _result(
        self,
        status: JobStatus,
        error: str | None,
        specs: Sequence[GuestSpec],
        hang: PhaseRecord | None = None,
    ) -> JobResult:
        done = {g.spec.vmid for g in self.guests}
        not_run = tuple(
            GuestResult(
                spec=s,
                mode=s.mode,
                status=BackupStatus.NOT_RUN,
                error="aborted",
                point_in_time=None,
                guest_state=GuestState.RUNNING if s.running else GuestState.STOPPED,
                records=(),
                warnings=(),
            )
            for s in specs
            if s.vmid not in done
        )
        return JobResult(
            status=status,
            error=error,
            records=tuple(self.records),
            guests=tuple(self.guests) + not_run,
            log=tuple(self.log),
            hang=hang,
        )

    def run(self, guests: Sequence[GuestSpec]) -> JobResult:
        """``PVE::VZDump::new`` (job-init) + ``exec_backup`` (job-start, guests, job-end)."""
        specs = sorted(guests, key=lambda g: g.vmid)
        self.worker = _Worker(self.cwd)
        try:
            return self._run(specs)
        except _Hung as hung:
            self._say(f"hook hung: {' '.join(hung.record.argv)}", level="ERROR")
            return self._result(JobStatus.HUNG, "hook hung", specs, hang=hung.record)
        except WorkerKilled:
            self.worker.kill()
            return self._result(JobStatus.KILLED, "vzdump worker killed", specs)
        finally:
            self.worker.close()


    def _run(self, specs: Sequence[GuestSpec]) -> JobResult:
        try:
            self.hook_phase(Phase.JOB_INIT)
        except VzdumpError as exc:
            self._say(str(exc), level="ERROR")
            return self._result(JobStatus.FAILED, str(exc), specs)
        where = f"--storage {self.storeid}" if self.storeid else f"--dumpdir {self.dumpdir}"
        vmids = " ".join(str(s.vmid) for s in specs)
        self._say(f"starting new backup job: vzdump {vmids} {where} --script {self.hook}")
        error: str | None = None
        try:
            self.hook_phase(Phase.JOB_START)
            for spec in specs:
                self.backup_guest(spec)
            self.hook_phase(Phase.JOB_END)
        except VzdumpError as exc:
            error = str(exc)
        if error is not None:
            try:
                self.hook_phase(Phase.JOB_ABORT, fatal=False)
            except VzdumpError as exc:
                self._say(str(exc), level="WARN")
            self._say(f"Backup job failed - {error}", level="ERROR")
            return self._result(JobStatus.FAILED, error, specs)
        if any(g.status is not BackupStatus.OK for g in self.guests):
            self._say("Backup job finished with errors")
            return self._result(JobStatus.ERRORS, "job errors", specs)
        self._say("Backup job finished successfully")
        return self._result(JobStatus.OK, None, specs)


def run_job(
    hook: str | os.PathLike[str],
    guests: Sequence[GuestSpec],
    *,
    storeid: str | None = "local",
    dumpdir: str | None = "/var/lib/vz/dump",
    extra_env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    raise_on_hang: bool = True,
    cwd: str = "/",
    transfer: Callback | None = None,
    transfer_seconds: float = 0.0,
    on_point_in_time: Callback | None = None,
    on_phase: PhaseCallback | None = None,
    on_guest_shutdown: Callback | None = None,
    on_guest_start: Callback | None = None,
    on_guest_suspend: Callback | None = None,
    on_guest_resume: Callback | None = None,
    on_log: Callable[[LogLine], None] | None = None,
) -> JobResult:
    """Play a vzdump job calling ``hook``; returns every hook record and per-guest outcome.

    ``storeid``: the job's storage (None: ``dumpdir`` is given directly); ``dumpdir=None``
    with a storeid means a PBS storage. ``timeout``: safety limit per hook process; a hang
    raises :class:`HookHang` (with ``.result``) unless ``raise_on_hang=False``. Callbacks:
    see the module docstring. Raises ValueError for contradictory arguments.
    """
    job = _Job(
        os.fspath(hook),
        storeid=storeid,
        dumpdir=dumpdir,
        extra_env=extra_env or {},
        timeout=timeout,
        cwd=cwd,
        transfer=transfer,
        transfer_seconds=transfer_seconds,
        on_point_in_time=on_point_in_time,
        on_phase=on_phase,
        on_guest_shutdown=on_guest_shutdown,
        on_guest_start=on_guest_start,
        on_guest_suspend=on_guest_suspend,
        on_guest_resume=on_guest_resume,
        on_log=on_log,
    )
    result = job.run(guests)
    if result.hang is not None and raise_on_hang:
        hang = HookHang(result.hang, timeout)
        hang.result = result
        raise hang
    return result


def run_phase(
    hook: str | os.PathLike[str],
    phase: str,
    guest: GuestSpec | None = None,
    *,
    storeid: str | None = "local",
    dumpdir: str | None = "/var/lib/vz/dump",
    extra_env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> PhaseRecord:
    """Run a single phase (any name, e.g. one a future PVE adds) as vzdump would.

    Guest phases get MODE ``guest.effective_mode`` and the guest's variables. Non-zero exit is
    returned in the record, not raised; a hang raises :class:`HookHang`. The hook is a child of the
    calling process (not of a worker of its own): phases played one by one are one job, whose
    "vzdump worker" is the caller.
    """
    job = _Job(
        os.fspath(hook),
        storeid=storeid,
        dumpdir=dumpdir,
        extra_env=extra_env or {},
        timeout=timeout,
    )
    task = None
    if guest is not None:
        task = job.new_task(guest)
        task.mode = guest.effective_mode
        task.hostname = _guest_name(guest)
    try:
        return job.hook_phase(phase, task)
    except VzdumpError:
        if not job.records:  # the hook could not be executed at all
            raise
        return job.records[-1]
    except _Hung as hung:
        raise HookHang(hung.record, timeout) from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: play a job for one or more guests of one type and print the task log."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.infra.vzdump",
        description="Call a vzdump hook exactly as vzdump does (empty environment, one process per phase).",
    )
    parser.add_argument("hook", help="hook executable (absolute path, as in /etc/vzdump.conf)")
    parser.add_argument("vmids", nargs="+", type=int, metavar="VMID")
    parser.add_argument(
        "--type", dest="vmtype", choices=[t.value for t in GuestType], default="qemu"
    )
    parser.add_argument("--mode", choices=[m.value for m in Mode], default="snapshot")
    parser.add_argument("--hostname", help="guest name (HOSTNAME)")
    parser.add_argument("--not-running", action="store_true", help="the guest is stopped")
    parser.add_argument(
        "--no-snapshot-support",
        action="store_true",
        help="LXC: storage cannot snapshot, vzdump falls back to suspend",
    )
    parser.add_argument("--volumes", type=int, default=1, help="LXC: volumes in the backup")
    parser.add_argument("--fail-at", choices=[p.value for p in FailPoint])
    parser.add_argument("--transfer-seconds", type=float, default=0.0)
    parser.add_argument("--storage", default="local", help="STOREID ('' for none)")
    parser.add_argument("--dumpdir", default="/var/lib/vz/dump", help="DUMPDIR ('' for PBS)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="safety timeout per phase"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="extra variable for every phase (test-only, vzdump has none)",
    )
    args = parser.parse_args(argv)
    extra: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env expects K=V, got {item!r}")
        extra[key] = value
    guests = [
        GuestSpec(
            vmid=vmid,
            vmtype=GuestType(args.vmtype),
            mode=Mode(args.mode),
            running=not args.not_running,
            hostname=args.hostname,
            snapshot_supported=not args.no_snapshot_support,
            volumes=args.volumes,
            fail_at=FailPoint(args.fail_at) if args.fail_at else None,
        )
        for vmid in args.vmids
    ]
    result = run_job(
        args.hook,
        guests,
        storeid=args.storage or None,
        dumpdir=args.dumpdir or None,
        extra_env=extra,
        timeout=args.timeout,
        raise_on_hang=False,
        transfer_seconds=args.transfer_seconds,
        on_log=lambda line: print(line.text, flush=True),
    )
    if result.status is JobStatus.HUNG:
        return 2
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
