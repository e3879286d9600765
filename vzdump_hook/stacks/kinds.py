"""Every stack kind of one guest behind one face: what runs, stop, start. A record's `kind` picks the
driver (stacks/KIND.py's Driver, through the registry: stacks/__init__.py), built on first use: listing
asks only the kinds the guest's config uses, and a record of another kind (a marker an older config
left) still finds its driver."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from . import Kind, driver_module, kinds_in

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..guest.marker import StackRecord
    from ..node.job import JobId
    from ..transports.base import Transport
    from .base import Absent, KindDriver, StopOutcome
    from .compose import ComposeDriver
    from .controller import ControllerDriver


class Stacks:
    """The drivers of one guest, reached through `transport`."""

    def __init__(self, transport: Transport, guest: GuestConfig, job: JobId) -> None:
        self.t = transport
        self.guest = guest
        self.job = job
        self.drivers: dict[Kind, KindDriver] = {}

    def of(self, kind: Kind) -> KindDriver:
        """The driver of `kind`, built on first use."""
        driver = self.drivers.get(kind)
        if driver is None:
            driver = self.drivers[kind] = driver_module(kind).Driver(self.t, self.guest, self.job)
        return driver

    # what callers ask of one kind's driver by name: compose's command and healthchecks, the controllers'
    # own messages (close, end_stale, the quiesce's mode and deadline)
    @property
    def compose_driver(self) -> ComposeDriver:
        return cast("ComposeDriver", self.of(Kind.COMPOSE))

    @property
    def controllers(self) -> ControllerDriver:
        return cast("ControllerDriver", self.of(Kind.CONTROLLER))

    @property
    def compose(self) -> tuple[str, ...] | None:
        """The compose command in use (None: not detected yet, or no compose stack configured)."""
        return self.compose_driver.compose

    @compose.setter
    def compose(self, value: tuple[str, ...] | None) -> None:
        self.compose_driver.compose = value

    def running(self, timeout: float) -> dict[str, StackRecord]:
        """Stacks with something up, by name: each kind the guest's config uses lists its own (its
        driver's running: e.g. every running compose project but those named as a listed stack of
        another kind, the listed systemd stacks with an active unit or trigger)."""
        deadline = time.monotonic() + timeout  # one bound for every kind's listing
        found: dict[str, StackRecord] = {}
        specs = self.guest.stacks or ()
        for kind in kinds_in(self.guest.stacks):
            found.update(self.of(kind).running(specs, deadline - time.monotonic()))
        return found

    def absent(self) -> list[Absent]:
        """What the last running() found the config names but the guest does not have, every kind's."""
        return [a for kind in kinds_in(self.guest.stacks) if kind in self.drivers for a in self.drivers[kind].absent()]

    def driver(self, rec: StackRecord) -> KindDriver:
        return self.of(rec.kind)

    def stop_bound(self, rec: StackRecord, stop_timeout: float) -> float:
        """How long stopping `rec` may take with `stop_timeout`, before the transport's own margin."""
        return self.driver(rec).stop_bound(rec, stop_timeout)

    def stop(self, rec: StackRecord, stop_timeout: float, timeout: float) -> StopOutcome:
        return self.driver(rec).stop(rec, stop_timeout, timeout)

    def start(self, rec: StackRecord, timeout: float) -> float:
        return self.driver(rec).start(rec, timeout)

    def is_up(self, rec: StackRecord, timeout: float) -> bool:
        return self.driver(rec).is_up(rec, timeout)
