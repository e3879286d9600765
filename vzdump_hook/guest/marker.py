"""The marker: a JSON file inside the guest that lists what the hook stopped and how to start it.

Written and fsynced before anything is stopped, rewritten when the set of stopped stacks is known,
removed only after every listed stack runs again. It is inside the guest, so it is also inside the
backup: a restored guest knows what to start. Read back, it is untrusted input: size-limited and
schema-checked before anything in it is used.

One stack per line, so that the guest-side recovery (POSIX sh, no JSON parser) can read it by lines.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import MarkerError
from ..node.job import JobId
from ..stacks import Kind
from ..stacks.container_table import ENGINES, MAX_CONTAINERS, valid_container_name
from ..stacks.systemd_table import valid_unit, valid_user
from ..stacks.table import valid_stack_name

SCHEMA = 1
TOOL = "vzdump-hook"
MAX_SIZE = 64 * 1024
ALLOWED_COMPOSE = (("docker", "compose"), ("docker-compose",))
_CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")
_FULL_ID = re.compile(r"[0-9a-f]{64}")  # container stacks record full ids (the wrapper accepts no other)
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# a socket or timer that triggers a listed service: held down for the window (stacks/systemd.py)
_TRIGGER = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,240}\.(socket|timer)")


@dataclass(frozen=True)
class StackRecord:
    """One stack as the hook found and stopped it: a compose project, or (kind systemd) the service
    units that were active and the sockets and timers held down with them."""

    name: str
    compose: tuple[str, ...]
    workdir: str
    files: tuple[str, ...]
    containers: tuple[str, ...]  # ids of the containers that were running
    stopped: bool = False  # True once the hook issued the stop (the stack may be down)
    services: tuple[str, ...] = ()  # compose services that were running: only these are started again
    kind: Kind = Kind.COMPOSE
    units: tuple[str, ...] = ()  # systemd: the service units that were active (stop order)
    triggers: tuple[str, ...] = ()  # systemd: sockets and timers that were active, stopped first
    user: str = ""  # systemd: "" system units, else the user whose --user units they are
    engine: str = ""  # container: "docker" or "podman"
    names: tuple[str, ...] = ()  # container: the names of the containers that ran (containers: their ids)
    job: str = ""  # controller: the job it was told to quiesce (its later messages name the same job)

    @classmethod
    def systemd(cls, name: str, units: tuple[str, ...], triggers: tuple[str, ...] = (), stopped: bool = False,
                user: str = "") -> StackRecord:
        return cls(name, (), "", (), (), stopped, kind=Kind.SYSTEMD, units=units, triggers=triggers, user=user)

    @classmethod
    def container(cls, name: str, engine: str, names: tuple[str, ...], ids: tuple[str, ...],
                  stopped: bool = False) -> StackRecord:
        """Plain containers that ran, in stop order: `names[i]` is the container with id `ids[i]`."""
        return cls(name, (), "", (), ids, stopped, kind=Kind.CONTAINER, engine=engine, names=names)

    @classmethod
    def controller(cls, name: str, job: str, stopped: bool = False) -> StackRecord:
        """The guest's controller (stacks/controller.py): kept in the node's records only. The
        controller keeps its own marker in the guest, and the guest's marker never lists it."""
        return cls(name, (), "", (), (), stopped, kind=Kind.CONTROLLER, job=job)

    def to_dict(self) -> dict[str, Any]:
        if self.kind is Kind.CONTAINER:
            return {"name": self.name, "driver": "container", "engine": self.engine, "names": list(self.names),
                    "containers": list(self.containers), "stopped": self.stopped}
        if self.kind is Kind.CONTROLLER:
            return {"name": self.name, "driver": "controller", "job": self.job, "stopped": self.stopped}
        if self.kind is Kind.SYSTEMD:
            d: dict[str, Any] = {"name": self.name, "driver": "systemd", "units": list(self.units),
                                 "triggers": list(self.triggers), "stopped": self.stopped}
            if self.user:
                d["user"] = self.user
            return d
        return {
            "name": self.name,
            "driver": "compose",
            "compose": list(self.compose),
            "workdir": self.workdir,
            "files": list(self.files),
            "containers": list(self.containers),
            "stopped": self.stopped,
            "services": list(self.services),
        }


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


def _path(p: str) -> bool:
    return bool(p) and len(p) <= 4096


def _stack(d: Any, i: int) -> StackRecord:
    where = f"stacks[{i}]."
    if not isinstance(d, dict):
        raise MarkerError(f"marker: stacks[{i}] is not an object")
    name = _req(d, "name", str, where)
    if not valid_stack_name(name):
        raise MarkerError(f"marker: {where}name {name[:40]!r} is not a compose project name")
    driver = _req(d, "driver", str, where) if "driver" in d else "compose"
    if driver == "systemd":
        units = _strings(d, "units", where, valid_unit, "service unit names")
        if not units or len(units) > 32:
            raise MarkerError(f"marker: {where}units must list 1-32 units")
        triggers = _strings(d, "triggers", where, _TRIGGER.fullmatch, "socket or timer unit names")
        if len(triggers) > 64:
            raise MarkerError(f"marker: {where}triggers: too many")
        stopped = _req(d, "stopped", bool, where)
        user = _req(d, "user", str, where) if "user" in d else ""
        if user and (not valid_user(user) or user == "root"):
            raise MarkerError(f"marker: {where}user {user[:40]!r} is not a user name")
        return StackRecord.systemd(name, units, triggers, stopped, user)
    if driver == "container":
        engine = _req(d, "engine", str, where)
        if engine not in ENGINES:
            raise MarkerError(f"marker: {where}engine must be one of {ENGINES}")
        names = _strings(d, "names", where, valid_container_name, "container names")
        ids = _strings(d, "containers", where, _FULL_ID.fullmatch, "full container ids (64 hex digits)")
        if not ids or len(ids) > MAX_CONTAINERS or len(names) != len(ids):
            raise MarkerError(f"marker: {where}containers must list 1-{MAX_CONTAINERS} ids, one per name")
        return StackRecord.container(name, engine, names, ids, _req(d, "stopped", bool, where))
    if driver != "compose":
        raise MarkerError(f"marker: {where}driver {driver[:20]!r} unknown")
    compose = tuple(_req(d, "compose", list, where))
    if compose not in ALLOWED_COMPOSE:
        raise MarkerError(f"marker: {where}compose must be one of {ALLOWED_COMPOSE}")
    workdir = _req(d, "workdir", str, where)
    if not workdir.startswith("/") or len(workdir) > 4096:
        raise MarkerError(f"marker: {where}workdir must be an absolute path")
    files = _strings(d, "files", where, _path, "a list of paths")
    containers = _strings(d, "containers", where, _CONTAINER_ID.fullmatch, "container ids")
    stopped = _req(d, "stopped", bool, where)
    services = _strings(d, "services", where, _SERVICE.fullmatch, "compose service names", optional=True)
    return StackRecord(name, compose, workdir, files, containers, stopped, services)


def record_from_dict(d: dict[str, Any]) -> StackRecord:
    """A StackRecord from its to_dict() form, as the host state keeps it (trusted: written by us)."""
    if d.get("driver") == "container":
        return StackRecord.container(d["name"], d["engine"], tuple(d["names"]), tuple(d["containers"]), d["stopped"])
    if d.get("driver") == "controller":
        return StackRecord.controller(d["name"], d["job"], d["stopped"])
    if d.get("driver") == "systemd":
        return StackRecord.systemd(d["name"], tuple(d["units"]), tuple(d["triggers"]), d["stopped"], d.get("user", ""))
    return StackRecord(d["name"], tuple(d["compose"]), d["workdir"], tuple(d["files"]), tuple(d["containers"]),
                       d["stopped"], tuple(d.get("services", ())))


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
