"""systemd service units as stacks (kind "systemd"): the units a stack lists, stopped and started with
`systemctl`.

Units are never discovered: the config lists them. Only the listed units that are active are stopped,
and exactly those are started again. Sockets and timers that would start a listed unit during the
window (its TriggeredBy=) are stopped first and started again last, when they were active. After the
stop, every unit must be inactive, or failed: a unit systemd had to kill (its TimeoutStopSec= ran out,
or its main process died of SIGKILL) makes the stop unclean, and the guest's policy applies.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..errors import ControllerError
from ..guest.marker import StackRecord
from ..transports.base import Transport, sh
from . import Kind, of_kind
from .base import Absent, KindDriver, StopOutcome, timed_stop
from .systemd_table import Table
from .table import StackSpec

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..node.job import JobId

log = logging.getLogger(__name__)

# the properties the hook reads; the restricted wrapper accepts this exact list
PROPERTIES = "Id,LoadState,ActiveState,SubState,Result,Restart,TriggeredBy,ExecMainCode,ExecMainStatus"
_UP = ("active", "activating", "reloading")


def _up(props: dict[str, str]) -> bool:
    """Running or starting; a unit waiting to be restarted after a failure (auto-restart) is not up."""
    return props.get("ActiveState") in _UP and props.get("SubState") != "auto-restart"


def _started(props: dict[str, str]) -> bool:
    """Up after `systemctl start` returned (its job is done): active. A unit that failed and is being
    restarted by Restart= shows activating (start-pre, auto-restart): not started."""
    return props.get("ActiveState") in ("active", "reloading")

_KILLED_RESULTS = ("timeout", "core-dump", "watchdog")
_CLD_KILLED, _CLD_DUMPED, _SIGKILL = "2", "3", "9"


# `systemctl --user` as USER ($1), for that user's service manager (its private socket in
# XDG_RUNTIME_DIR); the restricted wrapper accepts this exact script
AS_USER = 'u=$1; shift; exec runuser -u "$u" -- env XDG_RUNTIME_DIR="/run/user/$(id -u "$u")" systemctl --user "$@"'


def systemctl(user: str, *args: str) -> list[str]:
    """argv of `systemctl ARGS` for system units (user ""), or of `systemctl --user ARGS` as `user`."""
    return ["systemctl", *args] if not user else sh(AS_USER, user, *args)


def show_argv(units: list[str], user: str = "") -> list[str]:
    return systemctl(user, "show", f"--property={PROPERTIES}", "--", *units)


class SystemdDriver(KindDriver):
    """systemd stacks in one guest, reached through `transport`."""

    kind = Kind.SYSTEMD

    def __init__(self, transport: Transport, guest: GuestConfig | None = None, job: JobId | None = None) -> None:
        self.t = transport
        self._absent: list[Absent] = []

    def absent(self) -> list[Absent]:
        return list(self._absent)

    def _show(self, units: list[str], timeout: float, user: str = "") -> list[dict[str, str]]:
        """The properties of each unit, in the order given. Raises TransportError."""
        what = (f"cannot ask {user}'s systemd (does {user} linger: loginctl enable-linger {user})" if user
                else "cannot ask systemd (is this guest's init systemd?)")
        res = self.t.run(show_argv(units, user), timeout=timeout).check(what)
        blocks: list[dict[str, str]] = []
        for chunk in res.stdout.strip("\n").split("\n\n"):
            props: dict[str, str] = {}
            for line in chunk.splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    props[key] = value
            blocks.append(props)
        if len(blocks) != len(units):
            raise ControllerError(f"{self.t.target}: systemctl show answered for {len(blocks)} of {len(units)} units")
        return blocks

    def running(self, specs: tuple[StackSpec, ...], timeout: float) -> dict[str, StackRecord]:
        """The systemd stacks of `specs` that have something up: their active listed units and the
        active sockets and timers that trigger any listed unit. Units that do not exist are logged."""
        mine = of_kind(specs, Table)
        if not mine:
            return {}
        deadline = time.monotonic() + timeout
        found: dict[str, StackRecord] = {}
        self._absent = []
        for user in sorted({t.user for _, t in mine}):
            found.update(self._running({s.name: t.units for s, t in mine if t.user == user}, user, deadline))
        return found

    def _running(self, stacks: dict[str, tuple[str, ...]], user: str, deadline: float) -> dict[str, StackRecord]:
        """`stacks`: the units of each stack, by name (`user`'s units, or the system's)."""
        units = [u for us in stacks.values() for u in us]
        state = dict(zip(units, self._show(units, deadline - time.monotonic(), user), strict=True))
        triggers: dict[str, list[str]] = {}
        for name, us in stacks.items():
            for i, u in enumerate(us):
                if state[u].get("LoadState") == "not-found":  # systemd knows no such unit (not merely stopped)
                    whose = f"{user}'s user unit" if user else "unit"
                    self._absent.append(Absent(name, f"units[{i}]", f"{whose} {u!r} does not exist"))
                for trig in state[u].get("TriggeredBy", "").split():
                    if trig.endswith((".socket", ".timer")) and trig not in triggers.setdefault(name, []):
                        triggers[name].append(trig)
        all_triggers = sorted({t for ts in triggers.values() for t in ts})
        tstate = (dict(zip(all_triggers, self._show(all_triggers, deadline - time.monotonic(), user), strict=True))
                  if all_triggers else {})
        found: dict[str, StackRecord] = {}
        for name, us in stacks.items():
            up = tuple(u for u in us if _up(state[u]))
            held = tuple(t for t in triggers.get(name, ()) if _up(tstate[t]))
            if up or held:
                found[name] = StackRecord.systemd(name, up, held, user=user)
            for u in up:
                if state[u].get("Restart") == "always":
                    log.info("systemd %s: %s has Restart=always: systemd does not restart a unit stopped by systemctl; "
                             "its state is checked after the stop", name, u)
            for t in held:
                log.info("systemd %s: %s would start a listed unit during the window: it is stopped too", name, t)
        return found

    def stop(self, rec: StackRecord, stop_timeout: float, timeout: float) -> StopOutcome:
        """Stop the stack's triggers and units (one systemctl call, which waits for the stop jobs; the
        units' TimeoutStopSec= decides when systemd kills). Never raises: the outcome carries the error."""
        return timed_stop(rec.name, timeout, lambda deadline: self._stop(rec, deadline))

    def _stop(self, rec: StackRecord, deadline: float) -> tuple[tuple[str, ...], str]:
        res = self.t.run(systemctl(rec.user, "stop", "--", *rec.triggers, *rec.units),
                         timeout=deadline - time.monotonic())
        units = [*rec.triggers, *rec.units]
        after = dict(zip(units, self._show(units, deadline - time.monotonic(), rec.user), strict=True))
        killed: list[str] = []
        problems: list[str] = []
        for u, p in after.items():
            active, result = p.get("ActiveState", "?"), p.get("Result", "?")
            if active not in ("inactive", "failed"):
                problems.append(f"{u} is {active}")
            elif result in _KILLED_RESULTS or (p.get("ExecMainCode") in (_CLD_KILLED, _CLD_DUMPED)
                                               and p.get("ExecMainStatus") == _SIGKILL):
                killed.append(u)
            elif result != "success":  # e.g. exit-code: the app failed its own shutdown
                problems.append(f"{u} stopped with Result={result}")
        error = "; ".join(problems)
        if error and not res.ok:
            error += f" ({res.stderr.strip()[-200:]})"
        return tuple(killed), error

    def start(self, rec: StackRecord, timeout: float) -> float:
        """Start the recorded units, then the recorded sockets and timers; seconds taken.
        Raises ControllerError / TransportError when one of them is not active afterwards."""
        start = time.monotonic()
        deadline = start + timeout
        units = [*rec.units, *rec.triggers]
        res = self.t.run(systemctl(rec.user, "start", "--", *units), timeout=timeout)
        after = self._show(units, deadline - time.monotonic(), rec.user)
        down = [f"{u} ({p.get('ActiveState', '?')}/{p.get('SubState', '?')})" for u, p in zip(units, after, strict=True)
                if not _started(p)]
        if down:
            detail = f" ({res.stderr.strip()[-300:]})" if not res.ok else ""
            raise ControllerError(f"stack {rec.name}: not running after start: {', '.join(down)}{detail}")
        return time.monotonic() - start

    def is_up(self, rec: StackRecord, timeout: float) -> bool:
        units = [*rec.units, *rec.triggers]
        return all(_started(p) for p in self._show(units, timeout, rec.user))


Driver = SystemdDriver  # the name every stacks/KIND.py defines (stacks/__init__.py)
