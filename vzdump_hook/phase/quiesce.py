"""pre-stop: stop the guest's stacks right before the backup's point in time. The ledger entry first,
then the marker, then the stop; the resident is armed before anything stops."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import GuestConfig, QuiescePolicy
from ..errors import HookError
from ..guest.marker import StackRecord
from ..guest.session import GuestSession, NothingStopped, Quiesce, describe
from ..node.state import GuestRecord, Status
from ..vzdump.phases import GuestType, Mode, Phase
from ..vzdump.rules import Outcome
from . import handover
from .context import PhaseContext

log = logging.getLogger("vzdump_hook")


def run(ctx: PhaseContext, guest: GuestConfig, vmtype: GuestType, mode: Mode, rec: GuestRecord | None,
        note_backup_job: bool = False) -> Outcome:
    vmid = guest.vmid
    if note_backup_job:
        _note_backup_job(ctx, vmid, mode)
    if rec is None:
        rec = GuestRecord(vmid, vmtype, mode, dict(guest.table))
    abort = guest.on_quiesce_error is QuiescePolicy.ABORT
    failed = Outcome(quiesce_failed=True, abort_policy=abort)
    ctx.if_overrun(failed)
    with ctx.session(guest) as ctl:
        if ctl.driver.compose is None and rec.compose:
            ctl.driver.compose = tuple(rec.compose)
        try:
            with ctx.state.guest_lock(vmid, ctx.left()):
                rec.status = Status.QUIESCING
                ctx.state.save(rec)
                handover.arm_resident(ctx, guest, vmtype, mode, Phase.PRE_STOP)
                return _stop(ctx, ctl, guest, vmtype, mode, rec, abort)
        except HookError as e:  # the lock
            log.warning("pre-stop %d: %s: nothing stopped", vmid, describe(e))
            return failed


def _stop(ctx: PhaseContext, ctl: GuestSession, guest: GuestConfig, vmtype: GuestType, mode: Mode, rec: GuestRecord,
          abort: bool) -> Outcome:
    """Under the guest's lock: stop, and record what was stopped and how it went."""
    vmid = guest.vmid
    failed = Outcome(quiesce_failed=True, abort_policy=abort)
    try:
        q = ctl.quiesce(vmtype.value, mode.value, ctx.deadline, before_marker=_ledger_entry(ctx, guest, vmtype, rec))
    except NothingStopped as e:
        rec.status, rec.stacks = Status.NOTHING_STOPPED, []
        rec.crash_consistent = True
        rec.problems.append(f"quiesce: {e}")
        ctx.state.save(rec)
        then = ("failing this guest's backup (on_quiesce_error = abort)" if abort
                else "nothing stopped, the backup is crash-consistent")
        log.warning("pre-stop %d: %s -> %s", vmid, e, then)
        return failed
    except HookError as e:
        rec.problems.append(f"quiesce: {describe(e)}")
        ctx.state.save(rec)  # still QUIESCING: later phases start what the marker lists
        log.warning("pre-stop %d: quiesce failed: %s; whatever the marker lists is started again later", vmid,
                    describe(e))
        return failed
    _record(ctx, rec, q)
    if not q.stacks:
        log.info("pre-stop %d: nothing running to stop", vmid)
        return Outcome()
    failed_names = {o.name for o in q.outcomes if o.error}
    if stopped := [s.name for s in q.stacks if s.name not in failed_names]:  # no "stopped" for a stop that failed
        log.info("pre-stop %d: stopped %s in %.1f s", vmid, ", ".join(stopped), q.ended - q.started)
    if not (q.killed or q.errors):
        return Outcome()
    for k in q.killed:
        log.warning("pre-stop %d: %s did not stop within its stop timeout and was KILLED: "
                    "the backup of %d is crash-consistent", vmid, k, vmid)
    for err in q.errors:
        log.warning("pre-stop %d: stop failed: %s", vmid, err)
    if abort:
        log.warning("pre-stop %d: on_quiesce_error = abort: starting the stacks again and failing this guest's backup",
                    vmid)
        ctx.resumer.resume_locked(ctl, rec, "pre-stop", wait=False, give_up=True)
    else:
        log.warning("pre-stop %d: backup goes on crash-consistent (on_quiesce_error = continue)", vmid)
    return failed


def _record(ctx: PhaseContext, rec: GuestRecord, q: Quiesce) -> None:
    rec.stacks = list(q.stacks)
    rec.stop_started, rec.stop_ended, rec.app_down_at = q.started, q.ended, q.down_at
    rec.status = Status.QUIESCED if q.stacks else Status.NOTHING_STOPPED
    rec.crash_consistent = bool(q.killed or q.errors or rec.absent)  # absent: names the guest does not have
    rec.problems += [f"killed after stop timeout: {k}" for k in q.killed] + list(q.errors)
    ctx.state.save(rec)


def _ledger_entry(ctx: PhaseContext, guest: GuestConfig, vmtype: GuestType,
                  rec: GuestRecord) -> Callable[[tuple[StackRecord, ...]], None]:
    """The guest's entry, to be written right before its marker, and the stacks it lists in the
    host record (a resume after a crash from here on, the resident's, knows them: a controller
    asked to quiesce is told abort then). When the ledger cannot be written, the guest is noted as
    unknown locally (the next job-start asks it); when that fails too, nothing is stopped: a marker
    the sweeps cannot learn of must not be written."""
    from ..node.ledger import QUIESCE, LedgerError

    def write(stacks: tuple[StackRecord, ...]) -> None:
        try:
            ctx.ledger.add(guest.vmid, QUIESCE, ctx.job, guest.table, vmtype.value)
        except LedgerError as e:
            try:
                ctx.ledger.mark_uncovered(guest.vmid)
            except OSError as e2:
                raise LedgerError(f"{e}; not noted locally either ({e2})") from None
            log.warning("pre-stop %d: %s; the next job-start asks this guest", guest.vmid, e)
        rec.stacks = list(stacks)
        ctx.state.save(rec)

    return write


def _note_backup_job(ctx: PhaseContext, vmid: int, mode: Mode) -> None:
    """Before anything stops: the backup job QEMU knows now (a leftover must not count later)."""
    from ..qemu import watcher

    try:
        watcher.note_backup_job(ctx.state, vmid, mode.value, ctx.deadline)
    except HookError as e:
        log.info("pre-stop %d: early resume off (%s): the stacks start at backup-end", vmid, describe(e))
