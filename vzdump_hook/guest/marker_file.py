"""The marker as a file in one guest (its format: marker.py): read, written, removed, bounded by the
phase's deadline, and what GuestSession (session.py) puts in it. A quiesce writes what it stops plus
what an earlier marker still lists, before anything is stopped; a controller's stacks are left out (a
controller keeps its own marker). A resume removes it once everything listed runs again, or leaves in
it what failed to start.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from ..stacks import Kind
from . import marker as markers
from .marker import Marker
from .ready import left

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..node.job import JobId
    from ..transports.base import Transport
    from .marker import StackRecord


def read(t: Transport, guest: GuestConfig, deadline: float) -> Marker | None:
    """The guest's marker, or None. Raises MarkerError for one that is invalid."""
    data = t.read_file(guest.marker_path, limit=markers.MAX_SIZE, timeout=left(deadline, guest.command_timeout))
    return None if data is None else markers.parse(data)


def write(t: Transport, guest: GuestConfig, m: Marker, deadline: float) -> None:
    t.write_file(guest.marker_path, m.to_json(), timeout=left(deadline, guest.command_timeout))


def remove(t: Transport, guest: GuestConfig, deadline: float) -> None:
    t.remove_file(guest.marker_path, timeout=left(deadline, guest.command_timeout))


def for_quiesce(job: JobId, guest: GuestConfig, vmtype: str, mode: str, inherited: tuple[StackRecord, ...],
                chosen: list[StackRecord]) -> tuple[Marker, tuple[StackRecord, ...]]:
    """(the marker a quiesce writes, the stacks it stops): `chosen` marked stopped, after the stacks
    an earlier marker lists (`inherited`) that are not chosen again, so that nothing is dropped."""
    names = {s.name for s in chosen}
    keep = tuple(s for s in inherited if s.name not in names)
    to_stop = tuple(replace(s, stopped=True) for s in chosen)
    now = time.time()
    return Marker(job, guest.vmid, vmtype, mode, now, now + guest.max_downtime, "stopping", keep + to_stop), to_stop


def own_part(m: Marker) -> Marker | None:
    """What of `m` the guest's marker file lists: all but the controllers' stacks; None when that is nothing."""
    own = tuple(s for s in m.stacks if s.kind is not Kind.CONTROLLER)
    return replace(m, stacks=own) if own else None


def failed_part(m: Marker, failed: tuple[str, ...], fallback: tuple[StackRecord, ...]) -> Marker:
    """`m` rewritten after a resume: the stacks that failed to start, those it lists, then those only
    the node's record (`fallback`) has (a controller's are not: it keeps its own marker)."""
    listed = {s.name for s in m.stacks}
    return replace(m, stacks=tuple(s for s in m.stacks if s.name in failed) + tuple(
        s for s in fallback if s.name in failed and s.name not in listed and s.kind is not Kind.CONTROLLER))
