"""A phase at or after a resume point (vzdump/rules.py): start what this job stopped, and tell the
guest's controllers (stacks/controller.py) that the job is over for them."""

from __future__ import annotations

import logging

from ..config import GuestConfig
from ..errors import HookError
from ..guest.session import describe
from ..vzdump import rules
from ..vzdump.phases import Phase
from .context import PhaseContext

log = logging.getLogger("vzdump_hook")


def resume(ctx: PhaseContext, guest: GuestConfig, phase: Phase, wait: bool) -> bool:
    """Start what this job stopped in `guest`, exactly once. True when nothing of it is down."""
    with ctx.session(guest) as ctl:
        return ctx.resumer.resume_with(ctl, phase.value, wait)


def close_controllers(ctx: PhaseContext, vmid: int, phase: Phase, message: str = "") -> None:
    """Tell the guest's controllers that this job is over for them (`message`: done, failed; ""
    at job-end: what backup-end/abort recorded, else abort), once the hook's resume went
    through. One that does not confirm is told again at job-end, and a job it keeps open is
    ended by the next job-start's sweep (or its own deadline)."""
    rec = ctx.state.load(vmid)
    if rec is None or not rec.unclosed_controllers:
        return
    if message and not rec.ended:
        rec.ended = message
        ctx.state.save(rec)
    if rec.status.pending:
        return  # `snapshotted` is not confirmed yet: the resume paths keep at it
    guest = ctx.recorded_guest(rec, phase)
    if guest is None:
        return
    word = rec.ended or ("failed" if phase is Phase.JOB_ABORT else "abort")
    with ctx.session(guest) as ctl:
        try:
            with ctx.state.guest_lock(vmid, ctx.left()):
                rec = ctx.state.load(vmid) or rec
                for s in rec.unclosed_controllers:
                    try:
                        ctl.driver.controllers.close(s, word, max(0.1, min(ctx.left(), guest.command_timeout)))
                    except HookError as e:
                        later = ("job-end tells it again" if phase in rules.CONTROLLER_ENDS
                                 else "the next job-start's sweep ends the job (or the controller at its deadline)")
                        log.warning("%s %d: controller %s not told %s: %s; %s", phase.value, vmid, s.name, word,
                                    describe(e), later)
                        continue
                    rec.closed.append(s.name)
                    log.info("%s %d: controller %s told %s", phase.value, vmid, s.name, word)
                ctx.state.save(rec)
        except HookError as e:  # the lock
            log.warning("%s %d: controllers not told %s: %s", phase.value, vmid, word, describe(e))
