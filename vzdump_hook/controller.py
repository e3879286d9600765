"""GuestController: the verbs the hook uses on one guest (preflight, quiesce, resume, marker),
built on a transport and a stack driver. Every call takes a monotonic `deadline`: no operation
outlives the phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from . import marker as markers
from .errors import ConnectError, ConnectionLost, ControllerError, HookError, MarkerError
from .job import JobId
from .marker import Marker, StackRecord
from .stacks.base import StopOutcome
from .stacks.kinds import Stacks
from .transports import open_transport

if TYPE_CHECKING:
    from .config import GuestConfig
    from .transports.base import Transport

log = logging.getLogger(__name__)

STOP_MARGIN = 30.0  # seconds for compose / systemctl itself on top of the stop timeout


def _left(deadline: float, cap: float | None = None) -> float:
    left = deadline - time.monotonic()
    return left if cap is None else min(left, cap)


class NothingStopped(ControllerError):
    """Quiesce failed before any stack was stopped (the guest state is unchanged)."""


@dataclass(frozen=True)
class Preflight:
    compose: tuple[str, ...]
    running: tuple[str, ...]
    selected: tuple[str, ...]
    missing: tuple[str, ...]  # listed in the config but not running
    marker: Marker | None


@dataclass(frozen=True)
class Quiesce:
    stacks: tuple[StackRecord, ...]  # what the hook issued a stop for (and must start again)
    outcomes: tuple[StopOutcome, ...]
    started: float  # wall clock of the first stop
    ended: float

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


class GuestController:
    """One guest, one phase. Connects lazily; close() when done."""

    def __init__(self, guest: GuestConfig, job: JobId, transport: Transport | None = None) -> None:
        self.guest = guest
        self.job = job
        self.t = transport if transport is not None else open_transport(guest)
        self.driver = Stacks(self.t, guest)

    def close(self) -> None:
        self.t.close()

    @property
    def name(self) -> str:
        return str(self.guest.vmid)

    # -- marker --------------------------------------------------------------------------------

    def read_marker(self, deadline: float) -> Marker | None:
        """The guest's marker, or None. Raises MarkerError for one that is invalid."""
        data = self.t.read_file(self.guest.marker_path, limit=markers.MAX_SIZE, timeout=_left(deadline, self.guest.command_timeout))
        return None if data is None else markers.parse(data)

    def _write_marker(self, m: Marker, deadline: float) -> None:
        self.t.write_file(self.guest.marker_path, m.to_json(), timeout=_left(deadline, self.guest.command_timeout))

    # -- verbs ---------------------------------------------------------------------------------

    def wait_ready(self, wait: float, deadline: float) -> None:
        """Connect, retrying for up to `wait` seconds (a guest that is booting). Raises ConnectError."""
        until = min(deadline, time.monotonic() + wait)
        while True:
            try:
                self.t.connect(max(0.1, _left(deadline)))
                return
            except ConnectError:
                if time.monotonic() + 1.0 >= until:
                    raise
                time.sleep(1.0)

    def select(self, running: dict[str, StackRecord]) -> tuple[list[StackRecord], list[str]]:
        """(stacks to stop in stop order, configured stacks that are not running)."""
        if self.guest.stacks is None:
            return [running[n] for n in sorted(running) if n not in self.guest.exclude], []
        chosen = [running[s.name] for s in self.guest.stacks if s.name in running and running[s.name].kind is s.kind]
        missing = [s.name for s in self.guest.stacks if s.name not in running or running[s.name].kind is not s.kind]
        return chosen, missing

    def preflight(self, deadline: float) -> Preflight:
        """Guest answers, compose found, stacks listed, marker read. Changes nothing."""
        self.t.connect(_left(deadline))
        running = self.driver.running(_left(deadline, self.guest.command_timeout))
        chosen, missing = self.select(running)
        m = self.read_marker(deadline)
        return Preflight(self.driver.compose or (), tuple(sorted(running)), tuple(s.name for s in chosen), tuple(missing), m)

    def quiesce(self, vmtype: str, mode: str, deadline: float, inherited: tuple[StackRecord, ...] | None = None,
                before_marker: Callable[[], None] | None = None) -> Quiesce:
        """Write the marker (fsynced) listing the running selected stacks, then stop them.
        `before_marker` runs right before the marker is written (the node's ledger entry); if it
        raises HookError, nothing is written or stopped.

        Stacks an earlier marker lists (`inherited`, read from the guest when None) are kept in the
        new marker, so that nothing is dropped before it runs. A marker that cannot be read is never
        overwritten. Raises NothingStopped when nothing was stopped (guest unreachable, marker
        unreadable or not writable), HookError when the marker write may or may not have landed."""
        try:
            self.t.connect(_left(deadline))
            if inherited is None:
                existing = self.read_marker(deadline)
                inherited = existing.stacks if existing is not None else ()
            running = self.driver.running(_left(deadline, self.guest.command_timeout))
        except MarkerError as e:
            raise NothingStopped(f"{e}; it is left in place (see `vzdump-hook status`, fix or remove it)") from e
        except HookError as e:
            raise NothingStopped(str(e)) from e
        chosen, missing = self.select(running)
        for name in missing:
            log.info("quiesce %s: %s is not running, left alone", self.name, name)
        names = {s.name for s in chosen}
        keep = tuple(s for s in inherited if s.name not in names)
        to_stop = tuple(replace(s, stopped=True) for s in chosen)
        now = time.time()
        m = Marker(self.job, self.guest.vmid, vmtype, mode, now, now + self.guest.max_downtime, "stopping", keep + to_stop)
        if not m.stacks:
            return Quiesce((), (), now, now)
        if before_marker is not None:
            try:
                before_marker()
            except HookError as e:
                raise NothingStopped(str(e)) from e
        try:
            self._write_marker(m, deadline)  # before anything is stopped
        except ConnectionLost:
            raise  # the write may have landed: the later phases go by the marker
        except ConnectError as e:
            raise NothingStopped(f"marker not written: {e}") from e
        started = time.time()
        outcomes = self._stop_all(to_stop, deadline)
        # no rewrite to "stopped" here: the marker already lists every stack, and a write would be
        # one more round trip between the stop and the backup's point in time
        return Quiesce(m.stacks, tuple(outcomes), started, time.time())

    def _stop_all(self, stacks: tuple[StackRecord, ...], deadline: float) -> list[StopOutcome]:
        def stop(rec: StackRecord) -> StopOutcome:
            st = self.guest.stop_timeout_of(rec.name)
            return self.driver.stop(rec, st, _left(deadline, self.driver.stop_bound(rec, st) + STOP_MARGIN))

        if self.guest.parallel and len(stacks) > 1:
            with ThreadPoolExecutor(max_workers=min(8, len(stacks))) as pool:
                return list(pool.map(stop, stacks))
        outcomes = []
        for rec in stacks:
            outcomes.append(stop(rec))
        return outcomes

    def resume(self, deadline: float, fallback: tuple[StackRecord, ...] = ()) -> Resume:
        """Start every stack the marker lists (reverse stop order), then remove the marker.

        Stacks that fail to start stay in the marker (rewritten), so nothing is dropped. `fallback`
        is the host's record of what this job stopped: it is started while the marker is read (one
        round trip less on the resume path), then whatever else the marker lists. When the marker
        is missing or invalid, only `fallback` is started and the marker is left alone."""
        problems: list[str] = []
        m: Marker | None = None
        invalid = False
        results: list[tuple[str, str]] = []
        if fallback:
            with ThreadPoolExecutor(max_workers=1) as pool:
                reading = pool.submit(self.read_marker, deadline)
                results = self._start_all(tuple(reversed(fallback)), deadline)
                try:
                    m = reading.result()
                except MarkerError as e:
                    invalid = True
                    problems.append(f"{e}; left in place, starting what the node recorded instead")
        else:
            try:
                m = self.read_marker(deadline)
            except MarkerError as e:
                invalid = True
                problems.append(f"{e}; left in place")
        done = {name for name, _ in results}
        stacks = tuple(s for s in (m.stacks if m is not None else ()) if s.name not in done)
        if not stacks and not results:
            if m is not None:  # nothing listed: nothing to start, the marker has served
                self.t.remove_file(self.guest.marker_path, timeout=_left(deadline, self.guest.command_timeout))
            return Resume((), (), tuple(problems), m is not None, invalid)
        results += self._start_all(tuple(reversed(stacks)), deadline)
        started = tuple(name for name, err in results if not err)
        failed = tuple(name for name, err in results if err)
        problems += [f"{name}: {err}" for name, err in results if err]
        removed = False
        if m is not None:
            if not failed:
                self.t.remove_file(self.guest.marker_path, timeout=_left(deadline, self.guest.command_timeout))
                removed = True
            else:
                listed = {s.name for s in m.stacks}
                left = tuple(s for s in m.stacks if s.name in failed) + tuple(s for s in fallback if s.name in failed and s.name not in listed)
                try:
                    self._write_marker(Marker(m.job, m.vmid, m.vmtype, m.mode, m.written_at, m.deadline, m.state, left), deadline)
                except HookError as e:
                    problems.append(f"marker not updated (it still lists every stack): {e}")
        return Resume(started, failed, tuple(problems), removed, invalid or (m is not None and not removed))

    def _start_all(self, stacks: tuple[StackRecord, ...], deadline: float) -> list[tuple[str, str]]:
        def start(rec: StackRecord) -> tuple[str, str]:
            try:
                self.driver.start(rec, _left(deadline, self.guest.command_timeout))
                return rec.name, ""
            except HookError as e:
                return rec.name, str(e)

        if self.guest.parallel and len(stacks) > 1:
            with ThreadPoolExecutor(max_workers=min(8, len(stacks))) as pool:
                return list(pool.map(start, stacks))
        return [start(rec) for rec in stacks]


def describe(error: BaseException) -> str:
    """One line for the task log."""
    if isinstance(error, (HookError, OSError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


__all__ = ["ControllerError", "GuestController", "NothingStopped", "Preflight", "Quiesce", "Resume", "describe"]
