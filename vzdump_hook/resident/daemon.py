"""The resident process itself (resident/process.py says what it is for): it serves the phases on its socket
(server.py) and, between two requests, looks at its job, the guest's record and QEMU's backup job (watch.py);
it starts the stacks once (guest/resume.py), retrying a failed start, and ends when they run again or at the
marker's deadline.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..node.job import JobId
from .control import Info, paths
from .server import Kept, Server
from .watch import EarlyWatch

if TYPE_CHECKING:
    from ..guest.resume import Resumer
    from ..guest.session import GuestSession
    from ..node.state import GuestRecord

log = logging.getLogger("vzdump_hook.resident.process")  # the resident's lines, whichever module logs them

POLL = 0.1  # seconds between two looks at the job, the record and QMP
CONNECT_WAIT = 10.0  # the resident's first connect to the guest (while the hook stops the stacks)
RETRY_FIRST, RETRY_MAX = 1.0, 5.0  # seconds between two starts after a failed one (doubling)


class _Stopped(BaseException):
    """SIGTERM outside a start: end now. (BaseException: no `except Exception` swallows it.)"""


class _Retry:
    """When a failed start is tried again: RETRY_FIRST s after the first failure, each pause twice the
    one before, at most RETRY_MAX."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.pause = RETRY_FIRST

    def due(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def later(self, left: float) -> float:
        """Schedule the next try, within the `left` s there are; the pause it waits for."""
        pause = self.pause
        self.at = time.monotonic() + min(pause, left)
        self.pause = min(2 * pause, RETRY_MAX)
        return pause


def end_controllers(resumer: Resumer, ctl: GuestSession, job: JobId, retry: _Retry, left: float,
                    rec: GuestRecord) -> bool:
    """The stacks run again, and controllers still hold `job` open: backup-end, backup-abort or job-end
    tell them it is over; if vzdump's worker dies first, the resident tells them (what backup-end or
    backup-abort recorded, else abort: stacks/conversation.py), retrying until the deadline. True when
    none is left open."""
    from ..guest.resume import close_controllers
    from ..stacks.conversation import Moment, message

    if not job.is_over() or (retry.at is not None and not retry.due()):
        return False
    word = rec.ended or message(Moment.WORKER_GONE, True)
    if close_controllers(resumer, ctl, "resident", word,
                         "the resident tries again until the deadline, then the next job-start's sweep"):
        retry.at = None
        return True
    retry.later(left)
    return False


class Resident:
    """The resident of one guest and job, armed by pre-stop with `info` (resident-VMID.json at `info_path`)."""

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
        self.server = Server(paths(self.state.job_dir, info.vmid)[2], info_path, info)
        self.kept = Kept()
        self.status = "waiting"  # waiting, watching, starting, retrying, done
        self.remembered: GuestRecord | None = None  # the record as last read (run_dir may be wiped)
        self.retry = _Retry()
        self.critical = False  # a start is under way: SIGTERM lets it finish
        self.stop_requested = False
        self.watch = EarlyWatch(self.state, info)
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
        self.watch.early = guest.early_resume
        self.server.listen()
        if self.info.watching:
            self._arm_watch()
        if self.info.mode != "stop":  # the guest runs on: the session is open when the start is due
            try:
                self.ctl.t.connect(min(self.left(), CONNECT_WAIT))
            except Exception as e:
                log.debug("resident %d: no session yet: %s", self.vmid, e)
        while True:
            self.server.serve(POLL, self._answer, self.kept)
            if self._tick():
                return

    # -- the phases ------------------------------------------------------------------------------

    def _answer(self, phase: str) -> dict[str, Any]:
        """The answer to a hook that told `phase` ("": that only asks how it is)."""
        final = self._on_phase(phase) if phase else False
        rec = self.remembered
        lines = self.kept.take()
        return {"state": self.status, "resumed": self.status == "done", "lines": lines, "final": final,
                "stacks": [s.name for s in rec.stacks] if rec is not None else []}

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
        plan = rules.plan(phase, vmtype, mode, rec, self.watch.early)
        done = False
        if plan.step is Step.ARM_WATCHER:
            self._arm_watch()
            if self.watch.armed:
                log.info("%s %d: %s", phase.value, self.vmid, self.watch.note())
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
        self.server.keep_listening()
        rec = self._record()
        if self.readiness is not None and self.readiness.is_alive():
            return False  # await_ready: the downtime ends when the stacks are ready
        if rec is not None and not rec.status.pending and rec.unclosed_controllers and self.left() > 0:
            assert self.ctl is not None
            return end_controllers(self.resumer, self.ctl, self.job, self.retry, self.left(), rec)
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
        if self.watch.due(rec.status.value):
            self._arm_watch()  # suspend, stop: the last hook before QEMU's backup job was pre-stop, now done
        if self.watch.armed:
            if self.watch.started(self.left()):  # stop mode: the VM boots while the job runs
                if self._start("resident", wait=self.info.mode == "stop"):
                    return True
            elif not self.watch.armed:  # QMP gave up: a phase starts the stacks
                self.status = "waiting"
        if self.retry.due():
            return self._start("resident", wait=True)
        return False

    def _arm_watch(self) -> None:
        if self.watch.arm():
            self.status = "watching"

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
            self.status, self.retry.at = "done", None
            # waiting for the stacks' `ready` must not hold up the phases that ask meanwhile
            ready = self.resumer.await_ready
            self.readiness = threading.Thread(target=ready, args=(self.ctl, "resident"), daemon=True)
            self.readiness.start()
        else:
            self.ctl.t.close()  # a fresh session next time: the old one may be what failed
            self.status = "retrying"
            pause = self.retry.later(self.left())
            log.info("resident %d: trying again in %.0f s (until the marker's deadline, %s)", self.vmid, pause,
                     time.strftime("%H:%M:%S", time.localtime(self.info.deadline)))
        if self.stop_requested:
            raise _Stopped
        return done

    def _close(self) -> None:
        if self.info.vmtype == "qemu" and self.status == "done":
            self.watch.forget()  # the stacks run: no job start to wait for
        if self.ctl is not None:
            with contextlib.suppress(Exception):
                self.ctl.close()
        self.server.close()
        self.kept.write_out()
