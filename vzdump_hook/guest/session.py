"""GuestSession: the verbs the hook uses on one guest (preflight, quiesce, resume, marker),
built on a transport and a stack driver. Every call takes a monotonic `deadline`: no operation
outlives the phase.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from ..config import Kind
from ..errors import ConnectError, ConnectionLost, ControllerError, GuestFrozen, HookError, MarkerError
from ..node.job import JobId
from ..stacks.base import StopOutcome
from ..stacks.kinds import Stacks
from ..transports import open_transport
from . import marker as markers
from .marker import Marker, StackRecord

if TYPE_CHECKING:
    from ..config import GuestConfig, ReadySpec, StackSpec
    from ..transports.base import Transport

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_MARGIN = 30.0  # seconds for compose / systemctl itself on top of the stop timeout
READY_POLL = 0.1  # seconds between two looks at whether a started stack is ready
READY_PROBE = 5.0  # bound of one look
READY_INFLIGHT = 2  # looks under way at once: a look's own start-up (a process in the guest) does not add to the wait


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
    notes: tuple[str, ...] = ()  # what the guest's controllers said (stacks/controller.py)


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


class _ReadyWatch:
    """The looks at one stack's `ready` (GuestSession._watch_ready): `seen` once one succeeded."""

    def __init__(self) -> None:
        self.seen: float | None = None
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


class GuestSession:
    """One guest, one phase. Connects lazily; close() when done."""

    def __init__(self, guest: GuestConfig, job: JobId, transport: Transport | None = None) -> None:
        self.guest = guest
        self.job = job
        self.t = transport if transport is not None else open_transport(guest)
        self.driver = Stacks(self.t, guest, job)
        self._ready_watch: dict[str, _ReadyWatch] = {}  # stacks started here whose `ready` is being looked at

    def close(self) -> None:
        self.driver.controllers.close_carriers()
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

    def spec(self, name: str) -> StackSpec | None:
        return next((s for s in self.guest.stacks or () if s.name == name), None)

    def groups(self, stacks: tuple[StackRecord, ...]) -> list[tuple[StackRecord, ...]]:
        """`stacks` (stop order) as the groups they stop in: by `group` when the config gives them
        (a stack no longer in the config first), else all at once (`parallel`), else one by one."""
        specs = {s.name: s for s in self.guest.stacks or ()}
        if any(s.group is not None for s in specs.values()):
            def group(rec: StackRecord) -> int:
                spec = specs.get(rec.name)
                return spec.group if spec is not None and spec.group is not None else 0
            return [tuple(r for r in stacks if group(r) == g) for g in sorted({group(r) for r in stacks})]
        if self.guest.parallel:
            return [stacks] if stacks else []
        return [(r,) for r in stacks]

    # -- verbs ---------------------------------------------------------------------------------

    def wait_ready(self, wait: float, deadline: float) -> None:
        """Connect, retrying for up to `wait` seconds (a guest that is booting). Raises ConnectError."""
        until = min(deadline, time.monotonic() + wait)
        while True:
            try:
                self.t.connect(max(0.1, _left(deadline)))
                return
            except GuestFrozen:
                raise  # thawed only by vzdump (or by hand): waiting here would hold the guest's lock
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

    def preflight(self, deadline: float, end_stale: bool = False) -> Preflight:
        """Guest answers, compose found, stacks listed, marker read, controllers asked. Changes
        nothing, unless `end_stale` (backup-start: vzdump holds the guest's backup lock, so a job a
        controller still has open is over): then such a job is told abort."""
        self.t.connect(_left(deadline))
        running = self.driver.running(_left(deadline, self.guest.command_timeout))
        chosen, missing = self.select(running)
        m = self.read_marker(deadline)
        notes = []
        for name, text, down in self.driver.controllers.end_stale(True, _left(deadline, self.guest.command_timeout), act=end_stale):
            if down:
                raise ControllerError(f"controller {name}: {text}")
            if text:
                notes.append(f"controller {name}: {text}")
        return Preflight(self.driver.compose or (), tuple(sorted(running)), tuple(s.name for s in chosen), tuple(missing), m, tuple(notes))

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
        self.driver.controllers.mode, self.driver.controllers.deadline = mode, m.deadline
        self._before_stop(to_stop, deadline)
        if before_marker is not None:
            try:
                before_marker()
            except HookError as e:
                raise NothingStopped(str(e)) from e
        # a controller keeps its own marker: the guest's lists only what the hook itself stops
        own = tuple(s for s in m.stacks if s.kind is not Kind.CONTROLLER)
        try:
            if own:
                self._write_marker(replace(m, stacks=own), deadline)  # before anything is stopped
        except ConnectionLost:
            raise  # the write may have landed: the later phases go by the marker
        except ConnectError as e:
            raise NothingStopped(f"marker not written: {e}") from e
        started = time.time()
        down: dict[str, float] = {}
        outcomes = self._stop_all(to_stop, deadline, down)
        ended = time.time()
        # with `ready` on every stack, the app's downtime starts when the check first failed
        # (a stack whose check never failed during its stop: the stop's start, the longest it may have been down)
        down_at = min((down.get(s.name, started) for s in to_stop), default=None) if all(self.has_ready(s) for s in to_stop) else None
        # no rewrite to "stopped" here: the marker already lists every stack, and a write would be
        # one more round trip between the stop and the backup's point in time
        return Quiesce(m.stacks, tuple(outcomes), started, ended, down_at)

    def _before_stop(self, stacks: tuple[StackRecord, ...], deadline: float) -> None:
        """Each stack's `before_stop` command, right before the stops (nothing is down yet: its time
        is not downtime). Bounded; a failure is reported and the stop goes on."""
        for rec in stacks:
            spec = self.spec(rec.name)
            if spec is None or not spec.before_stop:
                continue
            t0 = time.monotonic()
            try:
                res = self.t.run(list(spec.before_stop), timeout=_left(deadline, spec.before_stop_timeout))
            except HookError as e:
                log.warning("quiesce %s: before_stop of %s failed after %.1f s (%s): stopping it all the same", self.name, rec.name, time.monotonic() - t0, e)
                continue
            if res.ok:
                log.info("quiesce %s: before_stop of %s done in %.1f s", self.name, rec.name, res.duration)
            else:
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
                log.warning("quiesce %s: before_stop of %s exited %d in %.1f s (%s): stopping it all the same", self.name, rec.name, res.exit_status, res.duration, tail[0][:200])

    def _each(self, fn: Callable[[StackRecord], T], groups: list[tuple[StackRecord, ...]]) -> list[T]:
        """fn over the stacks group by group; the stacks of a group at once."""
        out: list[T] = []
        for group in groups:
            if len(group) > 1:
                with ThreadPoolExecutor(max_workers=min(8, len(group))) as pool:
                    out += pool.map(fn, group)
            else:
                out += [fn(rec) for rec in group]
        return out

    def has_ready(self, rec: StackRecord) -> bool:
        spec = self.spec(rec.name)
        return spec is not None and spec.ready is not None

    def _stop_all(self, stacks: tuple[StackRecord, ...], deadline: float, down: dict[str, float] | None = None) -> list[StopOutcome]:
        """Stop the stacks group by group. For a stack with `ready`, its check runs while it stops:
        `down` gets the time of its first failure (the moment the app stopped answering)."""
        def stop(rec: StackRecord) -> StopOutcome:
            st = self.guest.stop_timeout_of(rec.name)
            bound = _left(deadline, self.driver.stop_bound(rec, st) + STOP_MARGIN)
            if down is None or not self.has_ready(rec):
                return self.driver.stop(rec, st, bound)
            watch = self._watch_ready(rec, deadline, want=False)
            try:
                return self.driver.stop(rec, st, bound)
            finally:
                watch.join(READY_POLL)  # a look under way is not waited for long
                watch.cancelled.set()
                if watch.seen is not None:
                    down[rec.name] = watch.seen

        return self._each(stop, self.groups(stacks))

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
                results = self._start_all(fallback, deadline)
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
        results += self._start_all(stacks, deadline)
        started = tuple(name for name, err in results if not err)
        failed = tuple(name for name, err in results if err)
        problems += [f"{name}: {err}" for name, err in results if err]
        removed = False
        controllers = {s.name for s in fallback + stacks if s.kind is Kind.CONTROLLER}
        if m is not None:
            if not set(failed) - controllers:  # a controller keeps its own marker
                self.t.remove_file(self.guest.marker_path, timeout=_left(deadline, self.guest.command_timeout))
                removed = True
            else:
                listed = {s.name for s in m.stacks}
                left = tuple(s for s in m.stacks if s.name in failed) + tuple(s for s in fallback if s.name in failed and s.name not in listed and s.kind is not Kind.CONTROLLER)
                try:
                    self._write_marker(Marker(m.job, m.vmid, m.vmtype, m.mode, m.written_at, m.deadline, m.state, left), deadline)
                except HookError as e:
                    problems.append(f"marker not updated (it still lists every stack): {e}")
        return Resume(started, failed, tuple(problems), removed, invalid or (m is not None and not removed))

    def _start_all(self, stacks: tuple[StackRecord, ...], deadline: float) -> list[tuple[str, str]]:
        """Start `stacks` (given in stop order) in the reverse order: the last group first."""
        def start(rec: StackRecord) -> tuple[str, str]:
            if self.has_ready(rec):  # the app may answer before the start command returns
                self._ready_watch[rec.name] = self._watch_ready(rec, deadline)
            try:
                self.driver.start(rec, _left(deadline, self.guest.command_timeout))
                return rec.name, ""
            except HookError as e:
                if (watch := self._ready_watch.pop(rec.name, None)) is not None:
                    watch.cancelled.set()
                return rec.name, str(e)

        return self._each(start, [tuple(reversed(g)) for g in reversed(self.groups(stacks))])

    def await_ready(self, stacks: tuple[StackRecord, ...], deadline: float) -> dict[str, float | None]:
        """Wait until each stack's `ready` says its app is back, each within its ready_timeout, all
        at once. name -> when it was first seen ready (wall clock), or None when not in time. The
        looks began with the stack's start when this controller started it (_start_all)."""

        def one(rec: StackRecord) -> float | None:
            watch = self._ready_watch.pop(rec.name, None)
            if watch is None:
                watch = self._watch_ready(rec, deadline)
            watch.join(max(0.0, deadline - time.monotonic()))
            return watch.seen

        if len(stacks) == 1:
            return {stacks[0].name: one(stacks[0])}
        with ThreadPoolExecutor(max_workers=min(8, len(stacks))) as pool:
            return dict(zip((s.name for s in stacks), pool.map(one, stacks), strict=True))

    def _watch_ready(self, rec: StackRecord, deadline: float, want: bool = True) -> _ReadyWatch:
        """Look whether `rec`'s app answers, in a thread of its own, from now on: a look every
        READY_POLL s, up to READY_INFLIGHT at once, until one answers `want` (True: the app is back;
        False: it went down) or its ready_timeout runs out."""
        spec = self.spec(rec.name)
        watch = _ReadyWatch()
        if spec is None or spec.ready is None:
            watch.seen = time.time()
            return watch
        ready, until = spec.ready, min(deadline, time.monotonic() + spec.ready_timeout)

        def look() -> bool:
            try:
                return self._ready_once(rec, ready, min(READY_PROBE, until - time.monotonic()))
            except (HookError, OSError) as e:
                log.debug("ready %s %s: %s", self.name, rec.name, e)
                return False

        def run() -> None:
            pool = ThreadPoolExecutor(max_workers=READY_INFLIGHT)
            running: set[Future[bool]] = set()
            try:
                next_look = time.monotonic()
                while time.monotonic() < until and not watch.cancelled.is_set():
                    if len(running) < READY_INFLIGHT and time.monotonic() >= next_look:
                        running.add(pool.submit(look))
                        next_look = time.monotonic() + READY_POLL
                    finished, running = futures_wait(running, timeout=max(0.0, min(next_look, until) - time.monotonic()), return_when=FIRST_COMPLETED)
                    if any(f.result() is want for f in finished):
                        watch.seen = time.time()
                        return
            finally:
                pool.shutdown(wait=False, cancel_futures=True)

        watch.thread = threading.Thread(target=run, daemon=True, name=f"ready-{rec.name}")
        watch.thread.start()
        return watch

    def _ready_once(self, rec: StackRecord, ready: ReadySpec, timeout: float) -> bool:
        if timeout <= 0:
            return False
        if ready.command:
            return self.t.run(list(ready.command), timeout=timeout).ok
        if ready.url:
            import requests

            from .. import httpio

            with requests.Session() as s:
                s.trust_env = False
                httpio.mount(s)
                try:  # only the status counts: the body is never read
                    r = httpio.request(s, "GET", ready.url, timeout=timeout, cap=0, source=f"ready {ready.url}",
                                       connect_timeout=min(2.0, timeout), body=False)
                except httpio.DeadlineExceeded as e:
                    raise OSError(str(e)) from None
                except requests.RequestException as e:
                    raise OSError(f"{ready.url}: {type(e).__name__}") from None
                return r.status < 400
        return self.driver.compose_driver.healthy(rec, timeout)


def describe(error: BaseException) -> str:
    """One line for the task log."""
    if isinstance(error, (HookError, OSError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


__all__ = ["ControllerError", "GuestSession", "NothingStopped", "Preflight", "Quiesce", "Resume", "describe"]
