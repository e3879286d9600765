"""A phase at or after a resume point (vzdump/rules.py): start what this job stopped, and tell the
guest's controllers (stacks/controller.py) that the job is over for them."""

from __future__ import annotations

import logging

from ..config import GuestConfig
from ..guest.resume import close_controllers as close_controllers_of
from ..stacks.conversation import Moment, message
from ..vzdump.phases import Phase
from ..vzdump.rules import CONTROLLER_ENDS
from .context import PhaseContext

log = logging.getLogger("vzdump_hook")


def resume(ctx: PhaseContext, guest: GuestConfig, phase: Phase, wait: bool) -> bool:
    """Start what this job stopped in `guest`, exactly once. True when nothing of it is down."""
    with ctx.session(guest) as ctl:
        return ctx.resumer.resume_with(ctl, phase.value, wait)


def close_controllers(ctx: PhaseContext, vmid: int, phase: Phase) -> None:
    """Tell the guest's controllers that this job is over for them, once the hook's resume went
    through: at backup-end `done`, at backup-abort `failed`; at job-end and job-abort what those
    recorded, else `abort` / `failed` (stacks/conversation.py). One that does not confirm is told
    again at job-end, and a job it keeps open is ended by the resident if vzdump's worker dies, the
    next job-start's sweep, or the controller's own deadline."""
    rec = ctx.state.load(vmid)
    if rec is None or not rec.unclosed_controllers:
        return
    if phase in CONTROLLER_ENDS and not rec.ended:
        rec.ended = message(Moment(phase.value), True)
        ctx.state.save(rec)
    if rec.status.pending:
        return  # `snapshotted` is not confirmed yet: the resume paths keep at it
    guest = ctx.recorded_guest(rec, phase)
    if guest is None:
        return
    word = rec.ended or message(Moment.JOB_ABORT if phase is Phase.JOB_ABORT else Moment.JOB_END, True)
    later = ("job-end tells it again" if phase in CONTROLLER_ENDS
             else "the next job-start's sweep ends the job (or the controller at its deadline)")
    with ctx.session(guest) as ctl:
        close_controllers_of(ctx.resumer, ctl, phase.value, word, later)
