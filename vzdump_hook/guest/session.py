"""GuestSession: the verbs the hook uses on one guest (preflight, quiesce, resume, marker, readiness),
built on a transport and a stack driver. Every call takes a monotonic `deadline`: no operation
outlives the phase. Their steps are next to it: ready.py (waiting for the guest, and for its stacks'
apps), stops.py (the stacks stopped and started in order), marker_file.py (the marker in the guest).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import ConfigError, ConnectError, ConnectionLost, ControllerError, HookError, MarkerError
from ..node.job import JobId
from ..stacks import Kind
from ..stacks.base import Absent, StopOutcome
from ..stacks.conversation import CONFIG_ERROR
from ..stacks.kinds import Stacks
from ..transports import open_transport
from . import marker_file, ready, stops
from .marker import Marker, StackRecord
from .ready import Readiness, left

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..stacks.table import StackSpec
    from ..transports.base import Transport

log = logging.getLogger(__name__)


class NothingStopped(ControllerError):
    """Quiesce failed before any stack was stopped (the guest state is unchanged)."""


@dataclass(frozen=True)
class Preflight:
    compose: tuple[str, ...]
    running: tuple[str, ...]
    selected: tuple[str, ...]
    missing: tuple[str, ...]  # listed in the config, exist, and do not run (left alone)
    marker: Marker | None
    notes: tuple[str, ...] = ()  # what the guest's controllers said (stacks/controller.py)
    # names the config gives that the guest does not have at all, each with its key path (a config problem)
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Quiesce:
    stacks: tuple[StackRecord, ...]  # what the hook issued a stop for (and must start again)
    outcomes: tuple[StopOutcome, ...]
    started: float  # wall clock of the first stop
    ended: float
    down_at: float | None = None  # when every stack stopped has `ready`: its first failed check during the stop

    @property
    def killed(self) -> tuple[str, ...]:
        return tuple(f"{o.name}:{c}" for o in self.outcomes for c in o.killed)

    @property
    def errors(self) -> tuple[str, ...]:
        return tuple(f"{o.name}: {o.error}" for o in self.outcomes if o.error)


@dataclass(frozen=True)
class Resume:
    started: tuple[str, ...]
    failed: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())
    marker_removed: bool = False
    marker_left: bool = False  # a marker is still in the guest (an invalid one, or one listing what failed)


class GuestSession:
    """One guest, one phase. Connects lazily; close() when done."""

    def __init__(self, guest: GuestConfig, job: JobId, transport: Transport | None = None) -> None:
        self.guest = guest
        self.job = job
        self.t = transport if transport is not None else open_transport(guest)
        self.driver = Stacks(self.t, guest, job)
        self.readiness = Readiness(self.t, guest, self.driver)

    def close(self) -> None:
        self.driver.controllers.close_carriers()
        self.t.close()

    @property
    def name(self) -> str:
        return str(self.guest.vmid)

    # -- marker --------------------------------------------------------------------------------

    def read_marker(self, deadline: float) -> Marker | None:
        """The guest's marker, or None. Raises MarkerError for one that is invalid."""
        return marker_file.read(self.t, self.guest, deadline)

    def _write_marker(self, m: Marker, deadline: float) -> None:
        marker_file.write(self.t, self.guest, m, deadline)

    def spec(self, name: str) -> StackSpec | None:
        return next((s for s in self.guest.stacks or () if s.name == name), None)

    # -- verbs ---------------------------------------------------------------------------------

    def wait_ready(self, wait: float, deadline: float) -> None:
        """Connect, retrying for up to `wait` seconds (a guest that is booting). Raises ConnectError."""
        ready.connect(self.t, wait, deadline)

    def select(self, running: dict[str, StackRecord]) -> tuple[list[StackRecord], list[str]]:
        """(stacks to stop in stop order, configured stacks that are not running)."""
        if self.guest.stacks is None:
            return [running[n] for n in sorted(running) if n not in self.guest.exclude], []
        chosen = [running[s.name] for s in self.guest.stacks if s.name in running and running[s.name].kind is s.kind]
        missing = [s.name for s in self.guest.stacks if s.name not in running or running[s.name].kind is not s.kind]
        return chosen, missing

    def preflight(self, deadline: float, end_stale: bool = False) -> Preflight:
        """Guest answers, compose found, stacks listed, marker read, controllers asked. Changes
        nothing, unless `end_stale` (backup-start: vzdump holds the guest's backup lock, so a job a
        controller still has open is over): then such a job is told abort."""
        self.t.connect(left(deadline))
        running = self.driver.running(left(deadline, self.guest.command_timeout))
        chosen, missing = self.select(running)
        m = self.read_marker(deadline)
        notes = []
        for name, text, down in self.driver.controllers.end_stale(True, left(deadline, self.guest.command_timeout),
                                                                  act=end_stale):
            if down and text.startswith(CONFIG_ERROR):  # a refused token, a bad token file: the config's to fix
                raise ConfigError([f"controller {name}: {text}"])
            if down:
                raise ControllerError(f"controller {name}: {text}")
            if text:
                notes.append(f"controller {name}: {text}")
        absent = self.driver.absent()
        gone = {a.stack for a in absent}
        return Preflight(self.driver.compose or (), tuple(sorted(running)), tuple(s.name for s in chosen),
                         tuple(n for n in missing if n not in gone), m, tuple(notes), self._absent_lines(absent))

    def _absent_lines(self, absent: list[Absent]) -> tuple[str, ...]:
        """Each name the guest does not have, as a config problem: its key path, what, the stack."""
        index = {s.name: i for i, s in enumerate(self.guest.stacks or ())}
        return tuple(f"guests.{self.guest.vmid}.stacks[{index.get(a.stack, '?')}].{a.key}: {a.what} in the guest "
                     f"(stack {a.stack})" for a in absent)

    def quiesce(self, vmtype: str, mode: str, deadline: float, inherited: tuple[StackRecord, ...] | None = None,
                before_marker: Callable[[tuple[StackRecord, ...]], None] | None = None) -> Quiesce:
        """Write the marker (fsynced) listing the running selected stacks, then stop them.
        `before_marker` runs right before the marker is written, with the stacks it lists (the node's
        ledger entry and record: a resume after a crash from here on knows them); if it
        raises HookError, nothing is written or stopped.

        Stacks an earlier marker lists (`inherited`, read from the guest when None) are kept in the
        new marker, so that nothing is dropped before it runs. A marker that cannot be read is never
        overwritten. Raises NothingStopped when nothing was stopped (guest unreachable, marker
        unreadable or not writable), HookError when the marker write may or may not have landed."""
        inherited, running = _look(self, deadline, inherited)
        chosen, missing = self.select(running)
        for name in missing:
            log.info("quiesce %s: %s is not running, left alone", self.name, name)
        m, to_stop = marker_file.for_quiesce(self.job, self.guest, vmtype, mode, inherited, chosen)
        if not m.stacks:
            return Quiesce((), (), m.written_at, m.written_at)
        self.driver.controllers.mode, self.driver.controllers.deadline = mode, m.deadline
        stops.before_stop(self.t, self.guest, to_stop, deadline)
        _mark(self, m, deadline, before_marker)
        started = time.time()
        down: dict[str, float] = {}
        outcomes = stops.stop_all(self.driver, self.readiness, to_stop, deadline, down)
        ended = time.time()
        # no rewrite to "stopped" here: the marker already lists every stack, and a write would be
        # one more round trip between the stop and the backup's point in time
        return Quiesce(_confirmed(m.stacks, outcomes), tuple(outcomes), started, ended,
                       _down_at(self, to_stop, down, started))

    def has_ready(self, rec: StackRecord) -> bool:
        return self.readiness.has(rec)

    def resume(self, deadline: float, fallback: tuple[StackRecord, ...] = ()) -> Resume:
        """Start every stack the marker lists (reverse stop order), then remove the marker.

        Stacks that fail to start stay in the marker (rewritten), so nothing is dropped. `fallback`
        is the host's record of what this job stopped: it is started while the marker is read (one
        round trip less on the resume path), then whatever else the marker lists. When the marker
        is missing or invalid, only `fallback` is started and the marker is left alone."""
        m, invalid, problems, results = _read_starting(self, fallback, deadline)
        done = {name for name, _ in results}
        stacks = tuple(s for s in (m.stacks if m is not None else ()) if s.name not in done)
        if not stacks and not results:
            if m is not None:  # nothing listed: nothing to start, the marker has served
                marker_file.remove(self.t, self.guest, deadline)
            return Resume((), (), tuple(problems), m is not None, invalid)
        results += stops.start_all(self.driver, self.readiness, stacks, deadline)
        started = tuple(name for name, err in results if not err)
        failed = tuple(name for name, err in results if err)
        problems += [f"{name}: {err}" for name, err in results if err]
        removed = m is not None and _settle_marker(self, m, failed, fallback, stacks, deadline, problems)
        return Resume(started, failed, tuple(problems), removed, invalid or (m is not None and not removed))

    def await_ready(self, stacks: tuple[StackRecord, ...], deadline: float) -> dict[str, float | None]:
        """Wait until each stack's `ready` says its app is back, each within its ready_timeout, all
        at once. name -> when it was first seen ready (wall clock), or None when not in time. The
        looks began with the stack's start when this session started it (resume)."""
        return self.readiness.await_all(stacks, deadline)


# -- the steps of quiesce ------------------------------------------------------------------------


def _look(s: GuestSession, deadline: float, inherited: tuple[StackRecord, ...] | None
          ) -> tuple[tuple[StackRecord, ...], dict[str, StackRecord]]:
    """(the stacks an earlier marker lists, the running stacks): `inherited`, else read from the
    guest. Raises NothingStopped when the guest does not answer or its marker cannot be read."""
    try:
        s.t.connect(left(deadline))
        if inherited is None:
            existing = s.read_marker(deadline)
            inherited = existing.stacks if existing is not None else ()
        return inherited, s.driver.running(left(deadline, s.guest.command_timeout))
    except MarkerError as e:
        raise NothingStopped(f"{e}; it is left in place (see `vzdump-hook status`, fix or remove it)") from e
    except HookError as e:
        raise NothingStopped(str(e)) from e


def _mark(s: GuestSession, m: Marker, deadline: float,
          before_marker: Callable[[tuple[StackRecord, ...]], None] | None) -> None:
    """`before_marker`, then the marker written, before anything is stopped. Raises NothingStopped when
    either failed; ConnectionLost when the write may have landed (the later phases go by the marker)."""
    if before_marker is not None:
        try:
            before_marker(m.stacks)
        except HookError as e:
            raise NothingStopped(str(e)) from e
    own = marker_file.own_part(m)  # a controller keeps its own marker: the guest's lists only what the hook stops
    try:
        if own is not None:
            s._write_marker(own, deadline)
    except ConnectionLost:
        raise
    except ConnectError as e:
        raise NothingStopped(f"marker not written: {e}") from e


def _confirmed(stacks: tuple[StackRecord, ...], outcomes: list[StopOutcome]) -> tuple[StackRecord, ...]:
    """`stacks` with each controller that confirmed its quiesce marked so (stacks/conversation.py: the
    others are told abort, and nothing else)."""
    ok = {o.name for o in outcomes if not o.error}
    return tuple(replace(r, quiesced=True) if r.kind is Kind.CONTROLLER and r.name in ok else r for r in stacks)


def _down_at(s: GuestSession, stopped: tuple[StackRecord, ...], down: dict[str, float], started: float) -> float | None:
    """With `ready` on every stack stopped, the app's downtime starts when a check first failed (a
    stack whose check never failed during its stop: the stop's start, the longest it may have been
    down); else None."""
    if not all(s.has_ready(rec) for rec in stopped):
        return None
    return min((down.get(rec.name, started) for rec in stopped), default=None)


# -- the steps of resume -------------------------------------------------------------------------


def _read_starting(s: GuestSession, fallback: tuple[StackRecord, ...], deadline: float
                   ) -> tuple[Marker | None, bool, list[str], list[tuple[str, str]]]:
    """(the marker or None, whether it is invalid, the problems, the starts): the marker read, and
    meanwhile `fallback` (the node's record) started. An invalid marker is left in place."""
    if not fallback:
        try:
            return s.read_marker(deadline), False, [], []
        except MarkerError as e:
            return None, True, [f"{e}; left in place"], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        reading = pool.submit(s.read_marker, deadline)
        results = stops.start_all(s.driver, s.readiness, fallback, deadline)
        try:
            return reading.result(), False, [], results
        except MarkerError as e:
            return None, True, [f"{e}; left in place, starting what the node recorded instead"], results


def _settle_marker(s: GuestSession, m: Marker, failed: tuple[str, ...], fallback: tuple[StackRecord, ...],
                   stacks: tuple[StackRecord, ...], deadline: float, problems: list[str]) -> bool:
    """After the starts: the marker removed when all that failed are controllers' stacks (a controller
    keeps its own marker), else rewritten to list what failed. True when removed."""
    controllers = {rec.name for rec in fallback + stacks if rec.kind is Kind.CONTROLLER}
    if not set(failed) - controllers:
        marker_file.remove(s.t, s.guest, deadline)
        return True
    try:
        s._write_marker(marker_file.failed_part(m, failed, fallback), deadline)
    except HookError as e:
        problems.append(f"marker not updated (it still lists every stack): {e}")
    return False


def describe(error: BaseException) -> str:
    """One line for the task log."""
    if isinstance(error, (HookError, OSError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


__all__ = ["ControllerError", "GuestSession", "NothingStopped", "Preflight", "Quiesce", "Resume", "describe"]
