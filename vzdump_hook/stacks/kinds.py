"""Every stack kind of one guest behind one face: what runs, stop, start. A record's `kind` picks the
driver (stacks/compose.py, stacks/systemd.py, stacks/controller.py, stacks/container.py); only the kinds
the guest's config uses are asked."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import Kind
from .base import Driver, StopOutcome
from .compose import ComposeDriver
from .container import ContainerDriver
from .controller import ControllerDriver
from .systemd import SystemdDriver

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..guest.marker import StackRecord
    from ..node.job import JobId
    from ..transports.base import Transport


class Stacks:
    """The drivers of one guest, reached through `transport`."""

    def __init__(self, transport: Transport, guest: GuestConfig, job: JobId) -> None:
        self.guest = guest
        self.compose_driver = ComposeDriver(transport, guest.compose_command)
        self.systemd = SystemdDriver(transport)
        self.container = ContainerDriver(transport)
        self.controllers = ControllerDriver(transport, guest, job)
        self.drivers: dict[Kind, Driver] = {Kind.COMPOSE: self.compose_driver, Kind.SYSTEMD: self.systemd,
                                            Kind.CONTAINER: self.container, Kind.CONTROLLER: self.controllers}

    @property
    def compose(self) -> tuple[str, ...] | None:
        """The compose command in use (None: not detected yet, or no compose stack configured)."""
        return self.compose_driver.compose

    @compose.setter
    def compose(self, value: tuple[str, ...] | None) -> None:
        self.compose_driver.compose = value

    @property
    def uses_compose(self) -> bool:
        specs = self.guest.stacks
        return specs is None or any(s.kind is Kind.COMPOSE for s in specs)

    def running(self, timeout: float) -> dict[str, StackRecord]:
        """Stacks with something up, by name: every running compose project (when the guest uses
        compose), the listed systemd stacks that have an active unit or trigger, and the container stacks
        with a running container. A compose project
        named as a listed stack of another kind is left out (names are unique in the config)."""
        deadline = time.monotonic() + timeout  # one bound for every kind's listing
        found: dict[str, StackRecord] = {}
        specs = self.guest.stacks or ()
        other = {s.name for s in specs if s.kind is not Kind.COMPOSE}
        if self.uses_compose:
            found.update((n, r) for n, r in self.compose_driver.running(timeout).items() if n not in other)
        if any(s.kind is Kind.SYSTEMD for s in specs):
            found.update(self.systemd.running(specs, deadline - time.monotonic()))
        if any(s.kind is Kind.CONTAINER for s in specs):
            found.update(self.container.running(specs, deadline - time.monotonic()))
        found.update(self.controllers.running(specs, deadline - time.monotonic()))
        return found

    def driver(self, rec: StackRecord) -> Driver:
        return self.drivers[rec.kind]

    def stop_bound(self, rec: StackRecord, stop_timeout: float) -> float:
        """How long stopping `rec` may take with `stop_timeout`, before the transport's own margin."""
        return stop_timeout * len(rec.containers) if rec.kind is Kind.CONTAINER else stop_timeout

    def stop(self, rec: StackRecord, stop_timeout: float, timeout: float) -> StopOutcome:
        return self.driver(rec).stop(rec, stop_timeout, timeout)

    def start(self, rec: StackRecord, timeout: float) -> float:
        return self.driver(rec).start(rec, timeout)

    def is_up(self, rec: StackRecord, timeout: float) -> bool:
        return self.driver(rec).is_up(rec, timeout)
