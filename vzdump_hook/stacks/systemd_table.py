"""The systemd kind's config table: `units` (the service units to stop, in stop order: never discovered)
and `user` (whose `systemctl --user` units they are). Its record in the marker: the units that were
active, the sockets and timers held down with them, and the user. Its driver: stacks/systemd.py."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError
from . import Kind, KindTable, of_kind
from .checks import Problems, distinct

if TYPE_CHECKING:
    from ..guest.marker import StackFields, StackRecord
    from .table import StackSpec

# A systemd service unit name as the hook accepts it (no \\-escapes, no globs); the wrapper and the
# guest's recovery program check the same pattern.
# (patterns compiled on first use, by re: a config without them does not pay for them)
_UNIT = r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,240}\.service"
MAX_UNITS = 32
# a socket or timer that triggers a listed service: held down for the window (stacks/systemd.py)
_TRIGGER = r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,240}\.(socket|timer)"
MAX_TRIGGERS = 64
_USER = r"[a-z_][a-z0-9_-]{0,31}"
KEYS = frozenset({"units", "user"})


def valid_user(name: str) -> bool:
    """A user name for --user units: lowercase letters, digits, '_', '-', not starting with a digit or '-'."""
    return re.fullmatch(_USER, name) is not None


def valid_unit(name: str) -> bool:
    """A service unit name: letters, digits, ':', '_', '.', '@', '-', ending in .service."""
    return re.fullmatch(_UNIT, name) is not None


@dataclass(frozen=True)
class Table(KindTable):
    kind: ClassVar[Kind] = Kind.SYSTEMD

    units: tuple[str, ...] = ()  # the service units, in stop order
    user: str = ""  # "" for system units, else the user whose `systemctl --user` units they are


def validate(path: str, item: Mapping[str, Any]) -> Table:
    if "units" not in item:
        raise ConfigError([f'{path}.units: missing (the service units to stop, e.g. ["postgresql.service"]: '
                           "systemd units are never discovered)"])
    p = Problems()
    units = distinct(p, f"{path}.units", item["units"], MAX_UNITS, valid_unit,
                     'service unit names, e.g. ["postgresql.service"]',
                     "a service unit name (letters, digits, ':', '_', '.', '@', '-', ending in .service)", "a unit")
    if units is None:
        raise ConfigError(p.items)
    user = item.get("user", "")
    if "user" in item and (not isinstance(user, str) or not valid_user(user) or user == "root"):
        raise ConfigError([f"{path}.user: must be the name of the user whose --user units these are "
                           f"(lowercase letters, digits, '_', '-'; not root) (got {user!r})"])
    return Table(units, user)


def check_list(path: str, specs: Sequence[StackSpec]) -> list[str]:
    """A unit in two stacks (of one systemd: the system's, or a user's); --user units of two users."""
    out: list[str] = []
    claimed: dict[tuple[str, str], str] = {}
    mine = of_kind(specs, Table)
    for spec, t in mine:
        for u in t.units:
            if (t.user, u) in claimed:
                out.append(f"{path}: unit {u} is in stacks {claimed[t.user, u]!r} and {spec.name!r}")
            claimed[t.user, u] = spec.name
    users = sorted({t.user for _, t in mine if t.user})
    if len(users) > 1:
        out.append(f"{path}: --user units of one user only (got {', '.join(users)})")
    return out


def check_guest(path: str, specs: Sequence[StackSpec], transport: str, check_files: bool) -> list[str]:
    return []


def record_dict(rec: StackRecord) -> dict[str, Any]:
    d: dict[str, Any] = {"units": list(rec.units), "triggers": list(rec.triggers), "stopped": rec.stopped}
    if rec.user:
        d["user"] = rec.user
    return d


def record_fields(f: StackFields) -> dict[str, Any]:
    units = f.strings("units", valid_unit, "service unit names")
    if not units or len(units) > MAX_UNITS:
        raise f.error(f"units must list 1-{MAX_UNITS} units")
    triggers = f.strings("triggers", lambda t: re.fullmatch(_TRIGGER, t), "socket or timer unit names")
    if len(triggers) > MAX_TRIGGERS:
        raise f.error("triggers: too many")
    stopped = f.req("stopped", bool)
    user = f.req("user", str) if "user" in f else ""
    if user and (not valid_user(user) or user == "root"):
        raise f.error(f"user {user[:40]!r} is not a user name")
    return {"units": units, "triggers": triggers, "stopped": stopped, "user": user}
