"""vzdump's vocabulary: phases, modes, guest types (see docs/design.md §1)."""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
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

    @property
    def is_job_phase(self) -> bool:
        return self in JOB_PHASES


JOB_PHASES = frozenset({Phase.JOB_INIT, Phase.JOB_START, Phase.JOB_END, Phase.JOB_ABORT})


class Mode(str, Enum):
    STOP = "stop"
    SUSPEND = "suspend"
    SNAPSHOT = "snapshot"


class GuestType(str, Enum):
    LXC = "lxc"
    QEMU = "qemu"


def parse_phase(value: str) -> Phase | None:
    """The Phase for `value`, or None for a phase this version does not know (future PVE)."""
    try:
        return Phase(value)
    except ValueError:
        return None


POINT_IN_TIME = "[point in time]"
TRANSFER = "[data transfer]"


def backup_order(vmtype: GuestType, mode: Mode, running: bool = True) -> tuple[str, ...]:
    """vzdump's hook calls for one guest on the success path, with where the point in time is
    (docs/design.md §1). A guest that is not running is backed up in stop mode without stop/restart hooks."""
    p = Phase
    if not running:
        seq: tuple[object, ...] = (p.BACKUP_START, POINT_IN_TIME, TRANSFER, p.BACKUP_END, p.LOG_END)
    elif vmtype is GuestType.LXC and mode is not Mode.STOP:  # snapshot, suspend
        seq = (p.BACKUP_START, p.PRE_STOP, POINT_IN_TIME, p.PRE_RESTART, p.POST_RESTART, TRANSFER, p.BACKUP_END,
               p.LOG_END)
    elif vmtype is GuestType.LXC:
        seq = (p.BACKUP_START, p.PRE_STOP, POINT_IN_TIME, TRANSFER, p.BACKUP_END, p.PRE_RESTART, p.POST_RESTART,
               p.LOG_END)
    elif mode is Mode.SNAPSHOT:
        seq = (p.BACKUP_START, p.PRE_STOP, p.PRE_RESTART, p.POST_RESTART, POINT_IN_TIME, TRANSFER, p.BACKUP_END,
               p.LOG_END)
    else:  # qemu suspend, stop
        seq = (p.BACKUP_START, p.PRE_STOP, POINT_IN_TIME, TRANSFER, p.BACKUP_END, p.PRE_RESTART, p.POST_RESTART,
               p.LOG_END)
    return tuple(s.value if isinstance(s, Phase) else str(s) for s in seq)
