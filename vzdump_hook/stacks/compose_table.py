"""The compose kind's config table: a compose project has no keys of its own (its name is the project's;
how compose runs is the guest's `compose_command`). Its record in the marker: the compose command, the
project's working directory and files, the ids of its running containers and their services. Its
driver: stacks/compose.py."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from . import Kind, KindTable

if TYPE_CHECKING:
    from ..guest.marker import StackFields, StackRecord
    from .table import StackSpec

KEYS: frozenset[str] = frozenset()
ALLOWED_COMPOSE = (("docker", "compose"), ("docker-compose",))  # the compose commands a record may name
# (patterns compiled on first use, by re)
_CONTAINER_ID = r"[0-9a-f]{12,64}"
SERVICE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # a compose service name


@dataclass(frozen=True)
class Table(KindTable):
    kind: ClassVar[Kind] = Kind.COMPOSE


def validate(path: str, item: Mapping[str, Any]) -> Table:
    return Table()


def check_list(path: str, specs: Sequence[StackSpec]) -> list[str]:
    return []


def check_guest(path: str, specs: Sequence[StackSpec], transport: str, check_files: bool) -> list[str]:
    return []


def record_dict(rec: StackRecord) -> dict[str, Any]:
    return {"compose": list(rec.compose), "workdir": rec.workdir, "files": list(rec.files),
            "containers": list(rec.containers), "stopped": rec.stopped, "services": list(rec.services)}


def record_fields(f: StackFields) -> dict[str, Any]:
    compose = tuple(f.req("compose", list))
    if compose not in ALLOWED_COMPOSE:
        raise f.error(f"compose must be one of {ALLOWED_COMPOSE}")
    workdir = f.req("workdir", str)
    if not workdir.startswith("/") or len(workdir) > 4096:
        raise f.error("workdir must be an absolute path")
    files = f.strings("files", lambda p: bool(p) and len(p) <= 4096, "a list of paths")
    containers = f.strings("containers", lambda c: re.fullmatch(_CONTAINER_ID, c), "container ids")
    stopped = f.req("stopped", bool)
    services = f.strings("services", lambda v: re.fullmatch(SERVICE, v), "compose service names", optional=True)
    return {"compose": compose, "workdir": workdir, "files": files, "containers": containers, "stopped": stopped,
            "services": services}
