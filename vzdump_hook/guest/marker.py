"""The marker: a JSON file inside the guest that lists what the hook stopped and how to start it.

Written and fsynced before anything is stopped, rewritten when the set of stopped stacks is known,
removed only after every listed stack runs again. It is inside the guest, so it is also inside the
backup: a restored guest knows what to start. Read back, it is untrusted input: size-limited and
schema-checked before anything in it is used.

One stack per line, so that the guest-side recovery (POSIX sh, no JSON parser) can read it by lines.
This module holds the head and what every stack has (name, kind); a stack's other keys are its kind's
(stacks/KIND_table.py: record_dict writes them, record_fields reads and checks them).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MarkerError
from ..node.job import JobId
from ..stacks import Kind, kind_module
from ..stacks.table import valid_stack_name

SCHEMA = 1
TOOL = "vzdump-hook"
MAX_SIZE = 64 * 1024
# The wire keeps the key "driver" for a record's kind (older versions and the guest's sh programs in
# examples/guest/ read it); the code says kind. This is the one place that maps the two.
KIND_KEY = "driver"
_KIND_NAMES = frozenset(k.value for k in Kind)


@dataclass(frozen=True)
class StackRecord:
    """One stack as the hook found and stopped it. Its kind's fields (the others keep their defaults):
    a compose project (compose .. containers, services), systemd service units (units, triggers,
    user), plain containers (engine, names, containers) or the guest's controller (job). In the
    marker, its kind's table module writes and reads it (stacks/KIND_table.py: record_dict, record_fields)."""

    name: str
    compose: tuple[str, ...] = ()  # compose: the compose command
    workdir: str = ""  # compose: the project's working directory
    files: tuple[str, ...] = ()  # compose: its compose files
    containers: tuple[str, ...] = ()  # ids of the containers that were running (compose, container)
    stopped: bool = False  # True once the hook issued the stop (the stack may be down)
    services: tuple[str, ...] = ()  # compose services that were running: only these are started again
    kind: Kind = Kind.COMPOSE
    units: tuple[str, ...] = ()  # systemd: the service units that were active (stop order)
    triggers: tuple[str, ...] = ()  # systemd: sockets and timers that were active, stopped first
    user: str = ""  # systemd: "" system units, else the user whose --user units they are
    engine: str = ""  # container: "docker" or "podman"
    names: tuple[str, ...] = ()  # container: the names of the containers that ran (containers: their ids)
    job: str = ""  # controller: the job it was told to quiesce (its later messages name the same job)
    quiesced: bool = False  # controller: it confirmed the quiesce (else it is told abort, and nothing else)

    # thin constructors of the kinds that have fields of their own beside the compose ones
    @classmethod
    def systemd(cls, name: str, units: tuple[str, ...], triggers: tuple[str, ...] = (), stopped: bool = False,
                user: str = "") -> StackRecord:
        return cls(name, stopped=stopped, kind=Kind.SYSTEMD, units=units, triggers=triggers, user=user)

    @classmethod
    def container(cls, name: str, engine: str, names: tuple[str, ...], ids: tuple[str, ...],
                  stopped: bool = False) -> StackRecord:
        """Plain containers that ran, in stop order: `names[i]` is the container with id `ids[i]`."""
        return cls(name, containers=ids, stopped=stopped, kind=Kind.CONTAINER, engine=engine, names=names)

    @classmethod
    def controller(cls, name: str, job: str, stopped: bool = False, quiesced: bool = False) -> StackRecord:
        """The guest's controller (stacks/controller.py): kept in the node's records only. The
        controller keeps its own marker in the guest, and the guest's marker never lists it."""
        return cls(name, stopped=stopped, kind=Kind.CONTROLLER, job=job, quiesced=quiesced)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, KIND_KEY: self.kind.value, **kind_module(self.kind).record_dict(self)}


@dataclass(frozen=True)
class Marker:
    job: JobId
    vmid: int
    vmtype: str
    mode: str
    written_at: float
    deadline: float
    state: str  # "stopping": stops under way; "stopped": the stacks listed are all the hook stopped
    stacks: tuple[StackRecord, ...] = field(default=())

    def to_json(self) -> bytes:
        head = {
            "schema": SCHEMA,
            "tool": TOOL,
            "job": self.job.to_dict(),
            "vmid": self.vmid,
            "vmtype": self.vmtype,
            "mode": self.mode,
            "written_at": round(self.written_at, 3),
            "deadline": round(self.deadline, 3),
            "state": self.state,
        }
        body = json.dumps(head, indent=1)[:-2]  # drop the closing "\n}"
        stacks = ",\n".join("  " + json.dumps(s.to_dict(), separators=(", ", ": ")) for s in self.stacks)
        return f'{body},\n "stacks": [\n{stacks}\n ]\n}}\n'.encode()

    @property
    def expired(self) -> bool:
        return time.time() > self.deadline

    def stopped_stacks(self) -> tuple[StackRecord, ...]:
        return tuple(s for s in self.stacks if s.stopped)


# Bounds: a time is seconds since the epoch before the year 2286; an integer has at most 15 digits.
# The guest's parser (examples/guest/vzdump-hook-recover) applies the same ones.
MAX_TIME = 1e10
MAX_INT = 10**15
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _duplicates_refused(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise MarkerError(f"marker: duplicate key {dup[:40]!r}")
    return d


def _no_constant(word: str) -> Any:
    raise MarkerError(f"marker: not JSON ({word})")


def _check_strings(v: Any, where: str) -> None:
    """Every string (keys too) is free of control characters, as the guest's parser wants it."""
    if isinstance(v, str):
        if _CONTROL.search(v):
            raise MarkerError(f"marker: {where or 'a string'} has a control character")
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_strings(k, where)
            _check_strings(x, f"{where}.{k}" if where else k)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_strings(x, f"{where}[{i}]")


def _req(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise MarkerError(f"marker: {where}{key} missing")
    value = d[key]
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
        raise MarkerError(f"marker: {where}{key} has the wrong type")
    return value


def _int(d: dict[str, Any], key: str, where: str) -> int:
    v: int = _req(d, key, int, where)
    if not 0 <= v < MAX_INT:
        raise MarkerError(f"marker: {where}{key} out of range")
    return v


def _time(d: dict[str, Any], key: str) -> float:
    v = _req(d, key, (int, float), "")
    if isinstance(v, int) and not 0 <= v < MAX_TIME:  # before float(): a 400-digit int overflows
        raise MarkerError(f"marker: {key} out of range")
    if not 0 <= float(v) < MAX_TIME:  # (NaN fails this too)
        raise MarkerError(f"marker: {key} out of range")
    return float(v)


def _strings(d: dict[str, Any], key: str, where: str, ok: Any, what: str, *, optional: bool = False) -> tuple[str, ...]:
    if optional and key not in d:
        return ()
    items = _req(d, key, list, where)
    if not all(isinstance(x, str) and ok(x) for x in items):
        raise MarkerError(f"marker: {where}{key} must be {what}")
    return tuple(items)


class StackFields:
    """One stack object of a marker, read by its kind (stacks/KIND_table.py: record_fields); every
    error names its key as stacks[I].KEY."""

    def __init__(self, d: dict[str, Any], where: str, kind: str) -> None:
        self.d = d
        self.where = where
        self.kind = kind  # as the marker names it

    def __contains__(self, key: str) -> bool:
        return key in self.d

    def req(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """The value of `key`, of type `kind`."""
        return _req(self.d, key, kind, self.where)

    def strings(self, key: str, ok: Callable[[str], object], what: str, *, optional: bool = False) -> tuple[str, ...]:
        """The list of strings at `key`, each `ok`; `what` they must be, for the error."""
        return _strings(self.d, key, self.where, ok, what, optional=optional)

    def error(self, why: str) -> MarkerError:
        """A MarkerError about this stack: `why` begins with the key it is about."""
        return MarkerError(f"marker: {self.where}{why}")

    def unknown(self) -> MarkerError:
        """The error of a kind the marker may not list."""
        return self.error(f"{KIND_KEY} {self.kind[:20]!r} unknown")


def _stack(d: Any, i: int) -> StackRecord:
    where = f"stacks[{i}]."
    if not isinstance(d, dict):
        raise MarkerError(f"marker: stacks[{i}] is not an object")
    name = _req(d, "name", str, where)
    if not valid_stack_name(name):
        raise MarkerError(f"marker: {where}name {name[:40]!r} is not a compose project name")
    kind = _req(d, KIND_KEY, str, where) if KIND_KEY in d else Kind.COMPOSE.value  # older markers: compose only
    f = StackFields(d, where, kind)
    if kind not in _KIND_NAMES:
        raise f.unknown()
    return StackRecord(name, kind=Kind(kind), **kind_module(Kind(kind)).record_fields(f))


def record_from_dict(d: dict[str, Any]) -> StackRecord:
    """A StackRecord from its to_dict() form, as the host state keeps it (trusted: written by us): each
    key but the kind's is the field of that name (stacks/__init__.py: record_dict)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != KIND_KEY}
    return StackRecord(kind=Kind(d.get(KIND_KEY, Kind.COMPOSE.value)), **fields)


def parse(data: bytes) -> Marker:
    """A Marker from bytes read off a guest. Raises MarkerError naming what is wrong (and nothing else)."""
    if len(data) > MAX_SIZE:
        raise MarkerError(f"marker: larger than {MAX_SIZE} bytes")
    # the hook writes \u escapes (json.dumps), and the guest parser reads bytes: both refuse the rest
    if not data.isascii():
        raise MarkerError("marker: not ASCII")
    try:
        d = json.loads(data, object_pairs_hook=_duplicates_refused, parse_constant=_no_constant)
        # \ud800-style escapes decode to lone surrogates, which no command line can carry
        json.dumps(d, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError) as e:
        raise MarkerError(f"marker: not JSON ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise MarkerError("marker: not a JSON object")
    schema = d.get("schema")
    if type(schema) is not int or schema != SCHEMA:
        raise MarkerError(f"marker: schema {str(schema)[:20]!r}, this version reads {SCHEMA}")
    try:
        _check_strings(d, "")
    except RecursionError:
        raise MarkerError("marker: nested too deeply") from None
    tool = d.get("tool", TOOL)
    if tool != TOOL:
        raise MarkerError(f"marker: tool {str(tool)[:40]!r}: not written by {TOOL}")
    j = _req(d, "job", dict, "")
    job = JobId(_req(j, "node", str, "job."), _req(j, "boot", str, "job."), _int(j, "pid", "job."),
                _int(j, "start", "job."))
    stacks = _req(d, "stacks", list, "")
    if len(stacks) > 256:
        raise MarkerError("marker: too many stacks")
    state = _req(d, "state", str, "")
    if state not in ("stopping", "stopped"):
        raise MarkerError(f"marker: state {state[:20]!r} unknown")
    return Marker(
        job=job,
        vmid=_int(d, "vmid", ""),
        vmtype=_req(d, "vmtype", str, ""),
        mode=_req(d, "mode", str, ""),
        written_at=_time(d, "written_at"),
        deadline=_time(d, "deadline"),
        state=state,
        stacks=tuple(_stack(s, i) for i, s in enumerate(stacks)),
    )
