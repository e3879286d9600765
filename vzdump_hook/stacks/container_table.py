"""The container kind's config table: `containers` (docker or podman containers by name, in stop order)
or `label` (the running containers that carry it), and `engine`. Its record in the marker: the engine,
and the names and full ids of the containers that ran, in stop order. Its driver: stacks/container.py."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from . import Kind, KindTable, of_kind
from .checks import Problems, distinct, string

if TYPE_CHECKING:
    from ..guest.marker import StackFields, StackRecord
    from .table import StackSpec

# Container names as docker and podman accept them; labels as `KEY` or `KEY=VALUE` without spaces or
# quotes (the wrapper and the recovery program keep lists of both in guest.conf, split at spaces). The
# patterns are compiled on first use, by re.
_CONTAINER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_LABEL = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}(=[A-Za-z0-9._/:@+-]{0,255})?"
_FULL_ID = r"[0-9a-f]{64}"  # a record keeps full ids (the wrapper accepts no other)
MAX_CONTAINERS = 64
ENGINES = ("docker", "podman")
KEYS = frozenset({"containers", "label", "engine"})


def valid_container_name(name: str) -> bool:
    """A container name: letters, digits, '_', '.', '-', starting with a letter or digit, at most 128."""
    return re.fullmatch(_CONTAINER_NAME, name) is not None


def valid_label(label: str) -> bool:
    """A label filter: KEY or KEY=VALUE (KEY: letters, digits, '.', '_', '/', '-'; VALUE also ':', '@', '+')."""
    return re.fullmatch(_LABEL, label) is not None


@dataclass(frozen=True)
class Table(KindTable):
    kind: ClassVar[Kind] = Kind.CONTAINER

    containers: tuple[str, ...] = ()  # the container names, in stop order
    label: str = ""  # "KEY" or "KEY=VALUE": the running containers carrying it (by name)
    engine: str = ""  # "docker" or "podman"; "": detected in the guest

    def stop_bound(self, stop_timeout: float) -> float:
        """The containers stop one at a time, each within the stop timeout."""
        return stop_timeout * max(1, len(self.containers))


def validate(path: str, item: Mapping[str, Any]) -> Table:
    """Exactly one of `containers` and `label`; `engine` if given."""
    p = Problems()
    if ("containers" in item) == ("label" in item):
        p.add(f"{path}.containers", 'give either containers (names, e.g. ["app", "db"]) or label ("KEY=VALUE"), '
              "not both, not neither")
    elif "containers" in item:
        distinct(p, f"{path}.containers", item["containers"], MAX_CONTAINERS, valid_container_name,
                 "container names", "a container name (letters, digits, '_', '.', '-')", "a container")
    elif not isinstance(item["label"], str) or not valid_label(item["label"]):
        p.add(f"{path}.label", 'must be "KEY" or "KEY=VALUE" (letters, digits, ".", "_", "/", "-"; the value also '
              f'":", "@", "+") (got {item["label"]!r})')
    p.raise_any()
    if "engine" in item:
        string(p, f"{path}.engine", item["engine"], choices=ENGINES)
        p.raise_any()
    return Table(tuple(item.get("containers", ())), item.get("label", ""), item.get("engine", ""))


def check_list(path: str, specs: Sequence[StackSpec]) -> list[str]:
    """A container, or a label, in two stacks."""
    out: list[str] = []
    held: dict[str, str] = {}
    for spec, t in of_kind(specs, Table):
        for what in (*(f"container {c}" for c in t.containers), *([f"label {t.label}"] if t.label else [])):
            if what in held:
                out.append(f"{path}: {what} is in stacks {held[what]!r} and {spec.name!r}")
            held[what] = spec.name
    return out


def check_guest(path: str, specs: Sequence[StackSpec], transport: str, check_files: bool) -> list[str]:
    return []


def record_dict(rec: StackRecord) -> dict[str, Any]:
    return {"engine": rec.engine, "names": list(rec.names), "containers": list(rec.containers), "stopped": rec.stopped}


def record_fields(f: StackFields) -> dict[str, Any]:
    engine = f.req("engine", str)
    if engine not in ENGINES:
        raise f.error(f"engine must be one of {ENGINES}")
    names = f.strings("names", valid_container_name, "container names")
    ids = f.strings("containers", lambda c: re.fullmatch(_FULL_ID, c), "full container ids (64 hex digits)")
    if not ids or len(ids) > MAX_CONTAINERS or len(names) != len(ids):
        raise f.error(f"containers must list 1-{MAX_CONTAINERS} ids, one per name")
    return {"engine": engine, "names": names, "containers": ids, "stopped": f.req("stopped", bool)}
