"""The phases and the guest's resident (resident/process.py): the resident is armed before the stop,
told each later phase, and for a QEMU guest watches for the backup job's start (qemu/watcher.py)."""

from __future__ import annotations

import logging
import time

from ..config import GuestConfig
from ..errors import HookError
from ..guest.session import describe
from ..resident import client, control
from ..vzdump.phases import GuestType, Mode, Phase
from .context import PhaseContext

log = logging.getLogger("vzdump_hook")


def arm_resident(ctx: PhaseContext, guest: GuestConfig, vmtype: GuestType, mode: Mode, phase: Phase,
                 watching: bool = False) -> None:
    """Start the guest's resident (pre-stop: before the stop), or, where a QEMU guest's watch is
    armed, one that watches at once if the first one is gone. Never fails the phase."""
    if not ctx.settings.resident:
        return
    rec = ctx.state.load(guest.vmid)
    if rec is None or not rec.status.pending:
        return
    deadline = (rec.stop_started or time.time()) + guest.max_downtime
    try:
        info = control.arm(ctx.state, guest, vmtype.value, mode.value, deadline, watching=watching)
    except HookError as e:
        log.warning("%s %d: no resident (%s): the phases start the stacks themselves", phase.value, guest.vmid,
                    describe(e))
        return
    if info.pid and watching and not info.watching:
        log.debug("%s %d: resident %d already running (told this phase)", phase.value, guest.vmid, info.pid)


def say_watching(ctx: PhaseContext, vmid: int, phase: Phase) -> None:
    from ..qemu import watcher

    rec = ctx.state.load(vmid)
    try:
        w = watcher.load(watcher._paths(ctx.state, vmid))
    except HookError:
        w = None
    if w is not None and rec is not None and rec.status.pending and ctx.settings.resident:
        log.info("%s %d: %s", phase.value, vmid, watcher.watching(w))


def hear_resident(ctx: PhaseContext, vmid: int, phase: Phase | str) -> bool:
    """Tell the guest's resident this phase (cli.py may have done it already) and log what it
    says, and what an ended one left. True when it answered."""
    name = phase.value if isinstance(phase, Phase) else phase
    answer = client.EARLY.pop(vmid) if vmid in client.EARLY else client.tell(ctx.state.job_dir, vmid, name)
    lines = [(int(lv), str(t)) for lv, t in answer.get("lines", ())] if answer else []
    lines += control.leftover_lines(ctx.state.job_dir, vmid)
    for level, text in lines:
        log.log(level, "%s", text)  # its lines: escaped like any argument
    return answer is not None
