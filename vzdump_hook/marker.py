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

from .config import valid_stack_name
from .errors import MarkerError
from .job import JobId

SCHEMA = 1
MAX_SIZE = 64 * 1024
ALLOWED_COMPOSE = (("docker", "compose"), ("docker-compose",))
_CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class StackRecord:
    """One compose project as the hook found and stopped it."""

    name: str
    compose: tuple[str, ...]
    workdir: str
    files: tuple[str, ...]
    containers: tuple[str, ...]  # ids of the containers that were running
    stopped: bool = False  # True once the hook issued the stop (the stack may be down)
    services: tuple[str, ...] = ()  # compose services that were running: only these are started again

    def to_dict(self) -> dict[str, Any]:
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
            "tool": "vzdump-hook",
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


def _req(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise MarkerError(f"marker: {where}{key} missing")
    value = d[key]
    if isinstance(value, bool) and kind is not bool:
        raise MarkerError(f"marker: {where}{key} has the wrong type")
    if not isinstance(value, kind):
        raise MarkerError(f"marker: {where}{key} has the wrong type")
    return value


def _stack(d: Any, i: int) -> StackRecord:
    where = f"stacks[{i}]."
    if not isinstance(d, dict):
        raise MarkerError(f"marker: stacks[{i}] is not an object")
    name = _req(d, "name", str, where)
    if not valid_stack_name(name):
        raise MarkerError(f"marker: {where}name {name[:40]!r} is not a compose project name")
    compose = tuple(_req(d, "compose", list, where))
    if compose not in ALLOWED_COMPOSE:
        raise MarkerError(f"marker: {where}compose must be one of {ALLOWED_COMPOSE}")
    workdir = _req(d, "workdir", str, where)
    if not workdir.startswith("/") or "\n" in workdir or len(workdir) > 4096:
        raise MarkerError(f"marker: {where}workdir must be an absolute path")
    files = tuple(_req(d, "files", list, where))
    if not all(isinstance(f, str) and f and "\n" not in f and len(f) <= 4096 for f in files):
        raise MarkerError(f"marker: {where}files must be a list of paths")
    containers = tuple(_req(d, "containers", list, where))
    if not all(isinstance(c, str) and _CONTAINER_ID.fullmatch(c) for c in containers):
        raise MarkerError(f"marker: {where}containers must be container ids")
    stopped = _req(d, "stopped", bool, where)
    services = tuple(d.get("services", ()))
    if not all(isinstance(s, str) and _SERVICE.fullmatch(s) for s in services):
        raise MarkerError(f"marker: {where}services must be compose service names")
    return StackRecord(name, compose, workdir, files, containers, stopped, services)


def parse(data: bytes) -> Marker:
    """A Marker from bytes read off a guest. Raises MarkerError naming what is wrong."""
    if len(data) > MAX_SIZE:
        raise MarkerError(f"marker: larger than {MAX_SIZE} bytes")
    try:
        d = json.loads(data)
        # \ud800-style escapes decode to lone surrogates, which no command line can carry
        json.dumps(d, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError) as e:
        raise MarkerError(f"marker: not JSON ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise MarkerError("marker: not a JSON object")
    if d.get("schema") != SCHEMA:
        raise MarkerError(f"marker: schema {d.get('schema')!r}, this version reads {SCHEMA}")
    j = _req(d, "job", dict, "")
    try:
        node, boot, pid, start = j["node"], j["boot"], j["pid"], j["start"]
    except KeyError:
        raise MarkerError("marker: job must have node, boot, pid, start") from None
    if not (isinstance(node, str) and isinstance(boot, str) and type(pid) is int and type(start) is int):
        raise MarkerError("marker: job node/boot must be strings, pid/start integers")
    job = JobId(node, boot, pid, start)
    stacks = _req(d, "stacks", list, "")
    if len(stacks) > 256:
        raise MarkerError("marker: too many stacks")
    state = _req(d, "state", str, "")
    if state not in ("stopping", "stopped"):
        raise MarkerError(f"marker: state {state[:20]!r} unknown")
    return Marker(
        job=job,
        vmid=_req(d, "vmid", int, ""),
        vmtype=_req(d, "vmtype", str, ""),
        mode=_req(d, "mode", str, ""),
        written_at=float(_req(d, "written_at", (int, float), "")),
        deadline=float(_req(d, "deadline", (int, float), "")),
        state=state,
        stacks=tuple(_stack(s, i) for i, s in enumerate(stacks)),
    )
