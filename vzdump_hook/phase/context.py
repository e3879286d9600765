"""What every step of one phase shares: the config, the host state of this job, the phase's deadline,
and the guest's settings as this job must use them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .. import config as configuration
from ..config import Config, GuestConfig, HookSettings
from ..errors import ConfigError
from ..guest.resume import Resumer
from ..guest.session import GuestSession
from ..node import tags
from ..node.job import JobId
from ..node.state import GuestRecord, HostState
from ..stacks.controller_table import with_current_ways
from ..vzdump.phases import Phase
from ..vzdump.rules import Outcome

if TYPE_CHECKING:
    from ..node.ledger import Ledger
    from .runner import Watchdog

log = logging.getLogger("vzdump_hook")


class PhaseContext:
    """One phase of one job. `cfg` is None when the config could not be read (`problem` says why)."""

    def __init__(self, cfg: Config | None, settings: HookSettings, job: JobId, problem: ConfigError | None = None,
                 watchdog: Watchdog | None = None) -> None:
        self.cfg = cfg
        self.watchdog = watchdog
        self.problem = problem
        self.settings = settings
        self.job = job
        self.state = HostState(settings, job)
        self.deadline = time.monotonic() + settings.phase_timeout
        self.resumer = Resumer(settings, job, self.state, self.deadline)

    def if_overrun(self, outcome: Outcome) -> None:
        """What it means when the phase's watchdog ends the process during the step under way."""
        if self.watchdog is not None:
            self.watchdog.if_overrun = outcome

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    @property
    def ledger(self) -> Ledger:
        return self.resumer.ledger

    def guest(self, vmid: int, rec: GuestRecord | None) -> GuestConfig | None:
        """The guest's settings: those recorded by this job if stacks may be down (a config edited or
        broken since must not strand stopped stacks), else the config's."""
        current = tags.guest_config(self.cfg, vmid) if self.cfg is not None else None
        if rec is not None and rec.guest_table and rec.status.pending:
            recorded = configuration.recorded_guest(vmid, rec.guest_table, f"guest {vmid}", then="; using the config")
            if recorded is not None:
                return with_current_ways(recorded, current)
        return current

    def recorded_guest(self, rec: GuestRecord, phase: Phase = Phase.JOB_START) -> GuestConfig | None:
        """The guest's settings as a job's record keeps them (those of its quiesce), or None; its
        controllers reached the way the config says now, if it still has them."""
        recorded = configuration.recorded_guest(rec.vmid, rec.guest_table, f"{phase.value} {rec.vmid}")
        if recorded is None or not recorded.has_controllers or self.cfg is None:
            return recorded
        return with_current_ways(recorded, tags.guest_config(self.cfg, rec.vmid))

    @contextmanager
    def session(self, guest: GuestConfig) -> Iterator[GuestSession]:
        """A session with `guest` for this job, closed on the way out."""
        ctl = GuestSession(guest, self.job)
        try:
            yield ctl
        finally:
            ctl.close()


def first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return lines[0] + (f" (+{len(lines) - 1} more)" if len(lines) > 1 else "") if lines else type(e).__name__
