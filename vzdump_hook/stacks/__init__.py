"""Stack kinds by name, their modules imported lazily: every vzdump phase validates the config.

A kind is two modules, a member of Kind and a line in _REGISTRY (and a field of guest/marker.py's
StackRecord for what its record keeps that no kind's field holds yet). The common code reaches a kind
through this registry, with no branch per kind: config.py and stacks/table.py its table,
guest/marker.py its record, stacks/kinds.py its driver.

- stacks/KIND_table.py, its config table and its record in the marker; small, imports no driver. It
  defines the same names in every kind (KindModule):

    Table         the kind's own keys of a stack table: a frozen dataclass, a KindTable
    KEYS          the names of those keys (beside the keys every stack has: stacks/table.py)
    validate      a stack table -> Table; raises ConfigError naming every problem's key path
    check_list    problems across one list of stacks (a guest's, or [defaults]'), as `key.path: why`
    check_guest   problems of a guest's stacks given its transport, as `key.path: why`
    record_dict   a StackRecord of the kind -> its keys in the marker after "name" and "driver", in the
                  order written; each key is the record's field of that name (the host state reads
                  them back by name: guest/marker.py's record_from_dict)
    record_fields a marker's stack object (untrusted: a StackFields) -> the record's fields but name
                  and kind; raises MarkerError naming the key (a kind the guest's marker never lists
                  refuses it as an unknown driver)

- stacks/KIND.py, its driver (list, stop, start and check it in a guest): a class `Driver`, built as
  Driver(transport, guest, job) by stacks/kinds.py for one guest and job, a KindDriver (base.py).

A table module is imported only when a stack of its kind is validated or a record of it is read or
written (or a name of it is imported: config.py re-exports some); validating a config imports no driver.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..guest.marker import StackFields, StackRecord
    from ..node.job import JobId
    from ..transports.base import Transport
    from .base import KindDriver
    from .table import StackSpec

    class KindModule(Protocol):
        """The names every stacks/KIND_table.py defines (this package's docstring)."""

        Table: type[KindTable]
        KEYS: frozenset[str]

        def validate(self, path: str, item: Mapping[str, Any]) -> KindTable: ...

        def check_list(self, path: str, specs: Sequence[StackSpec]) -> list[str]: ...

        def check_guest(self, path: str, specs: Sequence[StackSpec], transport: str,
                        check_files: bool) -> list[str]: ...

        def record_dict(self, rec: StackRecord) -> dict[str, Any]: ...

        def record_fields(self, f: StackFields) -> dict[str, Any]: ...

    class DriverModule(Protocol):
        """The name every stacks/KIND.py defines (this package's docstring)."""

        Driver: Callable[[Transport, GuestConfig, JobId], KindDriver]


class Kind(str, Enum):
    """What a stack is: how the hook finds, stops and starts it."""

    COMPOSE = "compose"  # a docker compose project, found by its labels
    SYSTEMD = "systemd"  # listed systemd service units (never discovered: see README)
    CONTROLLER = "controller"  # the guest's own controller, told the backup's phases (docs/controller-api.md)
    CONTAINER = "container"  # plain docker or podman containers, by name or by label


AUTO = Kind.COMPOSE  # `stacks = "auto"`: every running stack of this kind (its driver lists them unasked)

# one line a kind: the module of its config table (its driver: stacks/KIND.py, driver_module)
_REGISTRY = {
    Kind.COMPOSE: "vzdump_hook.stacks.compose_table",
    Kind.SYSTEMD: "vzdump_hook.stacks.systemd_table",
    Kind.CONTROLLER: "vzdump_hook.stacks.controller_table",
    Kind.CONTAINER: "vzdump_hook.stacks.container_table",
}


class KindTable:
    """What the common code asks of a kind's Table (each a frozen dataclass of this class)."""

    kind: ClassVar[Kind]

    @property
    def in_guest(self) -> bool:
        """The hook reaches the stack through the guest's transport (transport "none" reaches none)."""
        return True

    def stop_bound(self, stop_timeout: float) -> float:
        """How long one stop of the stack may take, each of its stops within `stop_timeout`."""
        return stop_timeout


_loaded: dict[Kind, KindModule] = {}


def kind_module(kind: Kind) -> KindModule:
    """The config table module of `kind`, imported on first use (asked once a stack table, once a record)."""
    module = _loaded.get(kind)
    if module is None:
        module = _loaded[kind] = cast("KindModule", importlib.import_module(_REGISTRY[kind]))
    return module


def driver_module(kind: Kind) -> DriverModule:
    """The driver module of `kind` (stacks/KIND.py, named as the kind), imported on first use."""
    return cast("DriverModule", importlib.import_module(f"{__name__}.{kind.value}"))


def kinds_in(specs: Iterable[StackSpec] | None) -> list[Kind]:
    """The kinds of `specs`, each once, in the order of Kind (None, "auto": AUTO)."""
    used = {AUTO} if specs is None else {s.kind for s in specs}
    return [k for k in Kind if k in used]


_T = TypeVar("_T", bound=KindTable)


def of_kind(specs: Iterable[StackSpec], table: type[_T]) -> list[tuple[StackSpec, _T]]:
    """The stacks of `specs` whose kind's Table is `table`, each with its table, in their order."""
    out: list[tuple[StackSpec, _T]] = []
    for spec in specs:
        if isinstance(spec.table, table):
            out.append((spec, spec.table))
    return out
