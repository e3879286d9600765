"""Resuming a guest's leftover marker (job-start's sweep, `vzdump-hook recover`), keeping the ledger
of outstanding markers in step with what the guest holds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import config as configuration
from ..config import GuestConfig
from ..errors import ConnectError, HookError
from ..node.job import JobId
from ..node.ledger import FOUND, QUIESCE, Entry, Ledger, LedgerError
from ..node.state import HostState
from .resume import resume_leftover
from .session import GuestSession, describe

log = logging.getLogger(__name__)


def guest_of_entries(entries: list[Entry]) -> GuestConfig | None:
    """The settings recorded in a guest's ledger entries (those of its quiesce first), or None."""
    for e in sorted(entries, key=lambda e: e.kind != QUIESCE):
        if e.guest_table:
            g = configuration.recorded_guest(e.vmid, e.guest_table, f"guest {e.vmid}", "settings in its ledger entry")
            if g is not None:
                return g
    return None


@dataclass(frozen=True)
class Recovery:
    """What recover_guest() found and did: `down` when anything is still down or unknown; `covered`
    when the ledger covers the guest now (no marker, or an entry for the one it holds)."""

    text: str
    down: bool
    covered: bool


def recover_guest(guest: GuestConfig, job: JobId, state: HostState, deadline: float, force: bool = False,
                  ledger: Ledger | None = None, seen: list[Entry] | None = None) -> Recovery:
    """Start what the guest's marker lists if the marker's job is provably over (or its deadline
    passed, or `force`), and keep `ledger` (entries `seen` before asking; read here when None) in
    step. A marker of a job that may still run is left alone: in a cluster sharing one config,
    another node may be backing this guest up right now."""
    ctl = GuestSession(guest, job)
    vmid = guest.vmid
    if seen is None and ledger is not None:
        try:
            seen = ledger.of(vmid)
        except LedgerError:
            seen = None

    def forget() -> bool:
        if ledger is not None and seen:
            ledger.clear(seen, job)
        return True

    def note() -> bool:
        """Make sure an entry lists the guest: a marker is (or may be) in it."""
        if ledger is None or seen:
            return seen is not None
        try:
            ledger.add(vmid, FOUND, None, guest.table)
            return True
        except LedgerError as e:
            log.warning("guest %d: %s", vmid, e)
            return False

    try:
        if not guest.has_controllers:
            return _recover_marker(ctl, state, deadline, force, forget, note)
        # a controller keeps its own marker: ask it, and end a job of it that is over; the ledger
        # keeps listing the guest while a controller may hold something
        texts, down = [], False
        for name, text, still in ctl.driver.controllers.end_stale(
                force, max(0.1, min(deadline - time.monotonic(), guest.command_timeout))):
            if text:
                texts.append(f"{vmid}: controller {name}: {text}")
            down = down or still
        r = _recover_marker(ctl, state, deadline, force, note if down else forget, note)
        return Recovery("; ".join(([r.text] if r.text else []) + texts), down or r.down, r.covered)
    finally:
        ctl.close()


def _recover_marker(ctl: GuestSession, state: HostState, deadline: float, force: bool,
                    forget: Callable[[], bool], note: Callable[[], bool]) -> Recovery:
    vmid = ctl.guest.vmid
    try:
        m = ctl.read_marker(deadline)
        if m is None:
            return Recovery("", False, forget())
        over = m.job.is_over()
        if over is not True and not m.expired and not force:
            return Recovery(f"{vmid}: marker of job {m.job} left alone (that job may still run, deadline not passed)",
                            False, note())
        r = resume_leftover(ctl, state, deadline)
        why = ("forced" if force and over is not True and not m.expired
               else "its job is over" if over else "its deadline passed")
        text = f"{vmid}: marker of job {m.job} ({why}): started {', '.join(r.started) or 'nothing'}"
        for p in r.problems:
            text += f"; {p}"
        text += f"; STILL DOWN: {', '.join(r.failed)}" if r.failed else ""
        return Recovery(text, bool(r.failed), note() if r.marker_left else forget())
    except ConnectError as e:
        return Recovery(f"{vmid}: not reachable ({e})", True, note())
    except HookError as e:
        return Recovery(f"{vmid}: {describe(e)}", True, note())
