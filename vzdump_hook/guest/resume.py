"""Starting what a job stopped in a guest, exactly once: the one resume path. This job's stacks
(Resumer: every phase, the resident and the job's end) start under the per-guest lock, and only while
this job's host record says they are down; the ledger entry goes once the guest holds no marker. A marker
another job left (resume_leftover: a stale one at backup-start, one of a job that is over at job-start's
sweep and `recover`) is started under the same lock. Nothing else starts a guest's stacks
(tests/unit/test_resume_path.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..config import HookSettings
from ..errors import HookError
from ..node.job import JobId
from ..node.state import GuestRecord, HostState, Status
from ..stacks import Kind
from ..stacks.conversation import Moment
from .session import GuestSession, Resume, describe

if TYPE_CHECKING:
    from ..node.ledger import Entry, Ledger

log = logging.getLogger("vzdump_hook.guest.resume")

RETRY_WAIT = 10.0  # seconds to wait for a guest that already failed to answer in this job
LEDGER_SETTLE_GRACE = 15.0  # seconds past a phase's timeout before a ledger entry may be taken as stale


def resume_leftover(ctl: GuestSession, state: HostState, deadline: float, lock_held: bool = False) -> Resume:
    """Start what the marker of another job lists in ctl's guest, under the guest's lock (taken here
    unless the caller holds it); the caller decides that the marker's job no longer works on the guest."""
    if lock_held:
        return ctl.resume(deadline)
    with state.guest_lock(ctl.guest.vmid, max(0.1, deadline - time.monotonic())):
        return ctl.resume(deadline)


class Resumer:
    """Resumes guests of `job` within `deadline` (monotonic). The ledger is opened on first use."""

    def __init__(self, settings: HookSettings, job: JobId, state: HostState, deadline: float) -> None:
        self.settings = settings
        self.job = job
        self.state = state
        self.deadline = deadline
        self._ledger: Ledger | None = None

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    @property
    def ledger(self) -> Ledger:
        """The ledger of outstanding markers (node/ledger.py; imported only by the phases that use it)."""
        if self._ledger is None:
            from ..node.ledger import Ledger

            self._ledger = Ledger.for_settings(self.settings, self.job.node,
                                               settle=self.settings.phase_timeout + LEDGER_SETTLE_GRACE)
        return self._ledger

    def entries(self, vmid: int) -> list[Entry] | None:
        """The guest's ledger entries before it is asked (None: unreadable, nothing is removed then)."""
        from ..node.ledger import LedgerError

        try:
            return self.ledger.of(vmid)
        except LedgerError as e:
            log.warning("guest %d: %s", vmid, e)
            return None

    def forget(self, seen: list[Entry] | None) -> None:
        """The guest holds no marker (any more): remove the entries read before it was asked."""
        if seen:
            self.ledger.clear(seen, self.job)

    def resume_with(self, ctl: GuestSession, where: str, wait: bool, remembered: GuestRecord | None = None,
                    ready: bool = True) -> bool:
        """Start what this job stopped in ctl's guest, for `where` (a phase, or the resident): under
        the guest's lock, only if this job's record says the stacks are still down. `remembered`:
        the record as its holder last saw it, used when the file is gone (run_dir wiped). Then,
        with `ready`, wait (without the lock) for the stacks' `ready` (await_ready). True when
        nothing of it is down."""
        try:
            with self.state.guest_lock(ctl.guest.vmid, self.left()):
                rec = self.state.load(ctl.guest.vmid)
                if rec is None and remembered is not None and remembered.status.pending:
                    rec = remembered
                if rec is None or not rec.status.pending:
                    return True  # another phase or process did it
                done = self.resume_locked(ctl, rec, where, wait)
        except HookError as e:
            log.warning("%s %d: resume: %s", where, ctl.guest.vmid, describe(e))
            return False
        if done and ready:
            self.await_ready(ctl, where)
        return done

    def await_ready(self, ctl: GuestSession, where: str) -> None:
        """The stacks started whose `ready` is awaited: wait for it (each within its ready_timeout),
        then end the downtime where the last one was ready. A stack not ready in time is reported
        (WARNING, the job-end table, history) and never fails the backup."""
        vmid = ctl.guest.vmid
        rec = self.state.load(vmid)
        if rec is None or rec.status is not Status.RESUMED or not rec.ready_pending:
            return
        stacks = tuple(s for s in rec.stacks if s.name in rec.ready_pending)
        seen = ctl.await_ready(stacks, self.deadline)
        try:
            with self.state.guest_lock(vmid, self.left()):
                rec = self.state.load(vmid)
                if rec is None or not rec.ready_pending:
                    return  # another process waited already
                late = [name for name, at in seen.items() if at is None]
                times = [at for at in seen.values() if at is not None]
                rec.resumed_at = time.time() if late else max(times, default=rec.resumed_at)
                rec.ready_pending, rec.not_ready = [], late
                if late:
                    rec.problems.append(f"{where}: not ready in time: {', '.join(late)}")
                self._save(rec)
        except HookError as e:
            log.warning("%s %d: readiness not recorded: %s", where, vmid, describe(e))
            return
        try:
            self.state.record_history(rec)
        except Exception as e:
            log.warning("history not written: %s", e)
        down = f", down {rec.downtime:.1f} s" if rec.downtime is not None else ""
        ready = [n for n in seen if n not in late]
        if ready:
            log.info("%s %d: %s ready %.1f s after the start%s", where, vmid, ", ".join(ready),
                     max(times) - (rec.started_at or max(times)), down if not late else "")
        for name in late:
            spec = ctl.spec(name)
            what = f"{spec.ready.describe()}, " if spec is not None and spec.ready is not None else ""
            log.warning("%s %d: %s NOT READY within %.0f s of its start (%snot seen): it runs, "
                        "but its app did not answer; the backup goes on",
                        where, vmid, name, spec.ready_timeout if spec is not None else 0, what)

    def resume_locked(self, ctl: GuestSession, rec: GuestRecord, where: str, wait: bool, give_up: bool = False) -> bool:
        """resume_with() once the lock is held and `rec` is known to be pending. `give_up`: the hook
        gives up on the job (on_quiesce_error = abort); so does a resume after vzdump's worker died:
        the guest's controllers are told abort, not snapshotted (stacks/conversation.py)."""
        vmid = rec.vmid
        start = time.monotonic()
        seen = self.entries(vmid)
        controllers = any(s.kind is Kind.CONTROLLER for s in rec.stacks)
        if controllers and (give_up or self.job.is_over() is True):
            ctl.driver.controllers.moment = Moment.GIVE_UP
        try:
            if wait:
                # a guest that already failed to answer in an earlier phase gets a short wait: a dead
                # guest must not add resume_wait to every remaining phase of the job
                ctl.wait_ready(ctl.guest.resume_wait if rec.status is not Status.RESUME_FAILED
                               else min(RETRY_WAIT, ctl.guest.resume_wait), self.deadline)
            r = ctl.resume(self.deadline, fallback=tuple(rec.stacks))
        except HookError as e:
            self._ended(ctl, rec, controllers)
            rec.status = Status.RESUME_FAILED
            rec.problems.append(f"{where}: resume: {describe(e)}")
            self._save(rec)
            log.warning("%s %d: resume failed: %s (retried at the next phase; job-end fails if still down)",
                        where, vmid, describe(e))
            return False
        for p in r.problems:
            log.warning("%s %d: %s", where, vmid, p)
        self._ended(ctl, rec, controllers)
        if r.failed:
            rec.status = Status.RESUME_FAILED
            rec.problems += [f"{where}: {p}" for p in r.problems]
            self._save(rec)
            log.warning("%s %d: STILL DOWN: %s (retried at the next phase)", where, vmid, ", ".join(r.failed))
            return False
        self._resumed(ctl, rec, r, where, seen, start)
        return True

    def _resumed(self, ctl: GuestSession, rec: GuestRecord, r: Resume, where: str, seen: list[Entry] | None,
                 start: float) -> None:
        """After a resume that started everything: the record, the ledger, the history, the log line."""
        vmid = rec.vmid
        rec.status = Status.RESUMED
        rec.resumed_at = rec.started_at = time.time()
        rec.ready_pending = [s.name for s in rec.stacks if s.name in r.started and ctl.has_ready(s)]
        rec.marker_left = r.marker_left
        self._save(rec)
        if not r.marker_left and not rec.unclosed_controllers:  # else close_controllers() forgets
            self.forget(seen)
        try:
            self.state.record_history(rec)
        except Exception as e:  # history is for reports; it never fails a backup
            log.warning("history not written: %s", e)
        down = f", down {rec.downtime:.1f} s" if rec.downtime is not None else ""
        if rec.ready_pending:
            down = (f" (down {rec.downtime:.1f} s to the start; waiting until {', '.join(rec.ready_pending)} ready)"
                    if rec.downtime is not None else "")
        log.info("%s %d: started %s in %.1f s%s", where, vmid, ", ".join(r.started) or "nothing",
                 time.monotonic() - start, down)

    @staticmethod
    def _ended(ctl: GuestSession, rec: GuestRecord, controllers: bool) -> None:
        """The controllers whose start was their end (abort) count as closed: nothing more is sent."""
        if controllers:
            rec.closed += [n for n in sorted(ctl.driver.controllers.ended) if n not in rec.closed]

    def _save(self, rec: GuestRecord) -> None:
        """The record, if its job's directory still exists (an admin may have wiped run_dir)."""
        try:
            self.state.save(rec)
        except OSError as e:
            log.warning("guest %d: host record not written: %s", rec.vmid, e)


def close_controllers(resumer: Resumer, ctl: GuestSession, where: str, word: str, later: str) -> bool:
    """Tell the guest's controllers that confirmed this job's quiesce that the job is over for
    them (`word`: done, failed or abort; stacks/conversation.py), under the guest's lock, once
    nothing of the guest is down any more. The guest's ledger entries go only once each of them
    confirmed (and the guest holds no marker): a job a controller still holds open is what the
    next job-start's sweep asks about. `later` says who tries again. True when none is left."""
    vmid = ctl.guest.vmid
    try:
        with resumer.state.guest_lock(vmid, resumer.left()):
            rec = resumer.state.load(vmid)
            if rec is None or not rec.unclosed_controllers:
                return True
            if rec.status.pending:
                return False  # the resume comes first (it is retried)
            seen = resumer.entries(vmid)
            for s in rec.unclosed_controllers:
                try:
                    ctl.driver.controllers.close(s, word, max(0.1, min(resumer.left(), ctl.guest.command_timeout)))
                except HookError as e:
                    log.warning("%s %d: controller %s not told %s: %s; %s", where, vmid, s.name, word,
                                describe(e), later)
                    continue
                rec.closed.append(s.name)
                log.info("%s %d: controller %s told %s", where, vmid, s.name, word)
            resumer._save(rec)
            if rec.unclosed_controllers:
                return False
            if not rec.marker_left:
                resumer.forget(seen)
            return True
    except HookError as e:  # the lock
        log.warning("%s %d: controllers not told %s: %s; %s", where, vmid, word, describe(e), later)
        return False
