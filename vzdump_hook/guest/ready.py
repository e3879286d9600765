"""Readiness of one guest, seen from the node: waiting until the guest answers at all (`connect`, a
guest that is booting), and looking whether a stack's app answers (its `ready` check: a command in the
guest, a url, or compose's health), in threads of their own, from the moment a stack is started or
stopped. GuestSession (session.py) holds one Readiness per guest and phase.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING

from ..errors import ConnectError, GuestFrozen, HookError

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..stacks.kinds import Stacks
    from ..stacks.table import ReadySpec, StackSpec
    from ..transports.base import Transport
    from .marker import StackRecord

log = logging.getLogger(__name__)

READY_POLL = 0.1  # seconds between two looks at whether a started stack is ready
READY_PROBE = 5.0  # bound of one look
READY_INFLIGHT = 2  # looks under way at once: a look's own start-up (a process in the guest) does not add to the wait


def left(deadline: float, cap: float | None = None) -> float:
    """Seconds until the monotonic `deadline`, at most `cap`."""
    remaining = deadline - time.monotonic()
    return remaining if cap is None else min(remaining, cap)


def connect(t: Transport, wait: float, deadline: float) -> None:
    """Connect, retrying for up to `wait` seconds (a guest that is booting). Raises ConnectError."""
    until = min(deadline, time.monotonic() + wait)
    while True:
        try:
            t.connect(max(0.1, left(deadline)))
            return
        except GuestFrozen:
            raise  # thawed only by vzdump (or by hand): waiting here would hold the guest's lock
        except ConnectError:
            if time.monotonic() + 1.0 >= until:
                raise
            time.sleep(1.0)


class ReadyWatch:
    """The looks at one stack's `ready` (Readiness.watch): `seen` once one succeeded."""

    def __init__(self) -> None:
        self.seen: float | None = None
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


class Readiness:
    """The `ready` checks of one guest's stacks, and the watches begun on stacks started here."""

    def __init__(self, t: Transport, guest: GuestConfig, driver: Stacks) -> None:
        self.t = t
        self.guest = guest
        self.driver = driver
        self._watches: dict[str, ReadyWatch] = {}  # stacks started here whose `ready` is being looked at

    def _spec(self, name: str) -> StackSpec | None:
        return next((s for s in self.guest.stacks or () if s.name == name), None)

    def has(self, rec: StackRecord) -> bool:
        spec = self._spec(rec.name)
        return spec is not None and spec.ready is not None

    def starting(self, rec: StackRecord, deadline: float) -> None:
        """`rec` is about to be started: with `ready`, the looks begin now (the app may answer before
        the start command returns)."""
        if self.has(rec):
            self._watches[rec.name] = self.watch(rec, deadline)

    def start_failed(self, rec: StackRecord) -> None:
        if (watch := self._watches.pop(rec.name, None)) is not None:
            watch.cancelled.set()

    def await_all(self, stacks: tuple[StackRecord, ...], deadline: float) -> dict[str, float | None]:
        """Wait until each stack's `ready` says its app is back, each within its ready_timeout, all
        at once. name -> when it was first seen ready (wall clock), or None when not in time. The
        looks began with the stack's start when this session started it (`starting`)."""

        def one(rec: StackRecord) -> float | None:
            watch = self._watches.pop(rec.name, None)
            if watch is None:
                watch = self.watch(rec, deadline)
            watch.join(max(0.0, deadline - time.monotonic()))
            return watch.seen

        if len(stacks) == 1:
            return {stacks[0].name: one(stacks[0])}
        with ThreadPoolExecutor(max_workers=min(8, len(stacks))) as pool:
            return dict(zip((s.name for s in stacks), pool.map(one, stacks), strict=True))

    def watch(self, rec: StackRecord, deadline: float, want: bool = True) -> ReadyWatch:
        """Look whether `rec`'s app answers, in a thread of its own, from now on: a look every
        READY_POLL s, up to READY_INFLIGHT at once, until one answers `want` (True: the app is back;
        False: it went down) or its ready_timeout runs out."""
        spec = self._spec(rec.name)
        watch = ReadyWatch()
        if spec is None or spec.ready is None:
            watch.seen = time.time()
            return watch
        ready, until = spec.ready, min(deadline, time.monotonic() + spec.ready_timeout)

        def look() -> bool:
            try:
                return self.look_once(rec, ready, min(READY_PROBE, until - time.monotonic()))
            except (HookError, OSError) as e:
                log.debug("ready %s %s: %s", self.guest.vmid, rec.name, e)
                return False

        watch.thread = threading.Thread(target=_poll, args=(look, want, until, watch), daemon=True,
                                        name=f"ready-{rec.name}")
        watch.thread.start()
        return watch

    def look_once(self, rec: StackRecord, ready: ReadySpec, timeout: float) -> bool:
        """One look at whether `rec`'s app answers, bounded by `timeout`."""
        if timeout <= 0:
            return False
        if ready.command:
            return self.t.run(list(ready.command), timeout=timeout).ok
        if ready.url:
            return url_answers(ready.url, timeout)
        return self.driver.compose_driver.healthy(rec, timeout)


def _poll(look: Callable[[], bool], want: bool, until: float, watch: ReadyWatch) -> None:
    """A watch's thread: `look` every READY_POLL s, up to READY_INFLIGHT at once, until one answers
    `want`, `until` passes, or the watch is cancelled."""
    pool = ThreadPoolExecutor(max_workers=READY_INFLIGHT)
    running: set[Future[bool]] = set()
    try:
        next_look = time.monotonic()
        while time.monotonic() < until and not watch.cancelled.is_set():
            if len(running) < READY_INFLIGHT and time.monotonic() >= next_look:
                running.add(pool.submit(look))
                next_look = time.monotonic() + READY_POLL
            finished, running = futures_wait(running, timeout=max(0.0, min(next_look, until) - time.monotonic()),
                                             return_when=FIRST_COMPLETED)
            if any(f.result() is want for f in finished):
                watch.seen = time.time()
                return
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def url_answers(url: str, timeout: float) -> bool:
    """Whether `url` answers with a status below 400 within `timeout`; only the status counts, the body
    is never read. Raises OSError when it does not answer."""
    import requests

    from .. import httpio

    with requests.Session() as s:
        s.trust_env = False
        httpio.mount(s)
        try:
            r = httpio.request(s, "GET", url, timeout=timeout, cap=0, source=f"ready {url}",
                               connect_timeout=min(2.0, timeout), body=False)
        except httpio.DeadlineExceeded as e:
            raise OSError(str(e)) from None
        except requests.RequestException as e:
            raise OSError(f"{url}: {type(e).__name__}") from None
        return r.status < 400
