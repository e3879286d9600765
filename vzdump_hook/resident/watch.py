"""The resident's look at QEMU's backup job (early_resume): armed at most once, from what pre-stop noted
(qemu/watcher.py), then asked at every tick whether the job has started, until it has or QMP gives up
(then the stacks start when vzdump ends the backup).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..node.state import HostState
    from ..qemu.watcher import JobWatch
    from .control import Info

log = logging.getLogger("vzdump_hook.resident.process")  # the resident's lines, whichever module logs them


class EarlyWatch:
    """The watch of one guest's QEMU backup job, for its resident."""

    def __init__(self, state: HostState, info: Info) -> None:
        self.state = state
        self.vmid, self.vmtype, self.mode = info.vmid, info.vmtype, info.mode
        self.early = False  # the guest's early_resume, once its config is read
        self.job: JobWatch | None = None  # once armed
        self.tried = False  # armed once at most: after GiveUp, a phase starts the stacks

    @property
    def armed(self) -> bool:
        return self.job is not None

    def due(self, status: str) -> bool:
        """Suspend, stop: the last hook before QEMU's backup job was pre-stop; once its stop is done (the
        record's `status` is past quiescing), the watch is armed without a phase to tell."""
        return (not self.tried and self.vmtype == "qemu" and self.mode != "snapshot" and self.early
                and status != "quiescing")

    def arm(self) -> bool:
        """Arm it, for a guest with early_resume and unless it was tried before. True when it watches now."""
        from ..qemu import watcher

        if self.tried or not self.early:
            return False
        self.tried = True
        try:
            w = watcher.load(watcher._paths(self.state, self.vmid))
        except Exception as e:
            log.warning("resident %d: %s: the stacks start at backup-end", self.vmid, e)
            return False
        if w is not None:
            self.job = watcher.JobWatch(w)
        return w is not None

    def note(self) -> str:
        """What it watches, for the task log."""
        from ..qemu import watcher

        assert self.job is not None
        return watcher.watching(self.job.w)

    def started(self, left: float) -> bool:
        """One look, within `left` s: True when QEMU's backup job has started. Either that or QMP giving
        up ends the watch (`armed` is then false)."""
        from ..qemu import watcher

        assert self.job is not None
        try:
            job = self.job.poll(left)
        except watcher.GiveUp as e:
            log.info("resident %d: %s: the stacks start when vzdump ends this backup", self.vmid, e)
            self.job = None
            return False
        if job is None:
            return False
        busy = f" (QMP busy {self.job.busy}x, backed off)" if self.job.busy else ""
        log.info("resident %d: QEMU backup job %s at %s, seen at %s%s: starting the stacks", self.vmid, job.uuid,
                 time.strftime("%H:%M:%S", time.localtime(job.start_time)), time.strftime("%H:%M:%S"), busy)
        self.job = None
        return True

    def forget(self) -> None:
        """The stacks run: no job start to wait for (pre-stop's note goes)."""
        from ..qemu import watcher

        watcher.forget(self.state, self.vmid)
