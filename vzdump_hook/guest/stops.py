"""Stopping and starting one guest's stacks, in the order the config gives: the groups they stop in
(`group`, `parallel`, else one by one), each stack's `before_stop` command, the stops (with a stack's
`ready` check looked at while it stops, for when its app went down) and the starts (the reverse order,
the `ready` looks begun with each start). The steps of GuestSession.quiesce and .resume (session.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from ..errors import HookError
from .ready import READY_POLL, left

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..stacks.base import StopOutcome
    from ..stacks.kinds import Stacks
    from ..transports.base import Transport
    from .marker import StackRecord
    from .ready import Readiness

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_MARGIN = 30.0  # seconds for compose / systemctl itself on top of the stop timeout


def groups(guest: GuestConfig, stacks: tuple[StackRecord, ...]) -> list[tuple[StackRecord, ...]]:
    """`stacks` (stop order) as the groups they stop in: by `group` when the config gives them
    (a stack no longer in the config first), else all at once (`parallel`), else one by one."""
    specs = {s.name: s for s in guest.stacks or ()}
    if any(s.group is not None for s in specs.values()):
        def group(rec: StackRecord) -> int:
            spec = specs.get(rec.name)
            return spec.group if spec is not None and spec.group is not None else 0
        return [tuple(r for r in stacks if group(r) == g) for g in sorted({group(r) for r in stacks})]
    if guest.parallel:
        return [stacks] if stacks else []
    return [(r,) for r in stacks]


def each(fn: Callable[[StackRecord], T], in_groups: list[tuple[StackRecord, ...]]) -> list[T]:
    """fn over the stacks group by group; the stacks of a group at once."""
    out: list[T] = []
    for group in in_groups:
        if len(group) > 1:
            with ThreadPoolExecutor(max_workers=min(8, len(group))) as pool:
                out += pool.map(fn, group)
        else:
            out += [fn(rec) for rec in group]
    return out


def before_stop(t: Transport, guest: GuestConfig, stacks: tuple[StackRecord, ...], deadline: float) -> None:
    """Each stack's `before_stop` command, right before the stops (nothing is down yet: its time
    is not downtime). Bounded; a failure is reported and the stop goes on."""
    specs = {s.name: s for s in guest.stacks or ()}
    for rec in stacks:
        spec = specs.get(rec.name)
        if spec is None or not spec.before_stop:
            continue
        t0 = time.monotonic()
        try:
            res = t.run(list(spec.before_stop), timeout=left(deadline, spec.before_stop_timeout))
        except HookError as e:
            log.warning("quiesce %s: before_stop of %s failed after %.1f s (%s): stopping it all the same",
                        guest.vmid, rec.name, time.monotonic() - t0, e)
            continue
        if res.ok:
            log.info("quiesce %s: before_stop of %s done in %.1f s", guest.vmid, rec.name, res.duration)
        else:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
            log.warning("quiesce %s: before_stop of %s exited %d in %.1f s (%s): stopping it all the same",
                        guest.vmid, rec.name, res.exit_status, res.duration, tail[0][:200])


def stop_all(driver: Stacks, ready: Readiness, stacks: tuple[StackRecord, ...], deadline: float,
             down: dict[str, float] | None = None) -> list[StopOutcome]:
    """Stop the stacks group by group. For a stack with `ready`, its check runs while it stops:
    `down` gets the time of its first failure (the moment the app stopped answering)."""
    guest = ready.guest

    def stop(rec: StackRecord) -> StopOutcome:
        st = guest.stop_timeout_of(rec.name)
        bound = left(deadline, driver.stop_bound(rec, st) + STOP_MARGIN)
        if down is None or not ready.has(rec):
            return driver.stop(rec, st, bound)
        watch = ready.watch(rec, deadline, want=False)
        try:
            return driver.stop(rec, st, bound)
        finally:
            watch.join(READY_POLL)  # a look under way is not waited for long
            watch.cancelled.set()
            if watch.seen is not None:
                down[rec.name] = watch.seen

    return each(stop, groups(guest, stacks))


def start_all(driver: Stacks, ready: Readiness, stacks: tuple[StackRecord, ...],
              deadline: float) -> list[tuple[str, str]]:
    """Start `stacks` (given in stop order) in the reverse order: the last group first: (name, its
    error or "") for each."""
    guest = ready.guest

    def start(rec: StackRecord) -> tuple[str, str]:
        ready.starting(rec, deadline)
        try:
            driver.start(rec, left(deadline, guest.command_timeout))
            return rec.name, ""
        except HookError as e:
            ready.start_failed(rec)
            return rec.name, str(e)

    return each(start, [tuple(reversed(g)) for g in reversed(groups(guest, stacks))])
