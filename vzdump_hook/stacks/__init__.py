"""Stack kinds by name, their config tables imported lazily: every vzdump phase validates the config.

A kind is its config table (stacks/KIND_table.py), its driver (stacks/KIND.py: list, stop, start and
check it in a guest; the interface in base.py), its marker record (guest/marker.py: StackRecord) and a
line in _REGISTRY. Every KIND_table.py defines the same names (KindModule):

    Table        the kind's own keys of a stack table: a frozen dataclass, a KindTable
    KEYS         the names of those keys (beside the keys every stack has: stacks/table.py)
    validate     a stack table -> Table; raises ConfigError naming every problem's key path
    check_list   problems across one list of stacks (a guest's, or [defaults]'), as `key.path: why`
    check_guest  problems of a guest's stacks given its transport, as `key.path: why`

A table module is small and imports no driver: validating a config imports no driver, and a table only
when a stack of its kind is validated (or a name of it is imported: config.py re-exports some).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from .table import StackSpec

    class KindModule(Protocol):
        """The names every stacks/KIND_table.py defines (this package's docstring)."""

        Table: type[KindTable]
        KEYS: frozenset[str]

        def validate(self, path: str, item: Mapping[str, Any]) -> KindTable: ...

        def check_list(self, path: str, specs: Sequence[StackSpec]) -> list[str]: ...

        def check_guest(self, path: str, specs: Sequence[StackSpec], transport: str,
                        check_files: bool) -> list[str]: ...


class Kind(str, Enum):
    """What a stack is: how the hook finds, stops and starts it."""

    COMPOSE = "compose"  # a docker compose project, found by its labels
    SYSTEMD = "systemd"  # listed systemd service units (never discovered: see README)
    CONTROLLER = "controller"  # the guest's own controller, told the backup's phases (docs/controller-api.md)
    CONTAINER = "container"  # plain docker or podman containers, by name or by label


# one line a kind: the module of its config table (its driver: stacks/KIND.py, by the same name)
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
    """The config table module of `kind`, imported on first use (asked once a stack table)."""
    module = _loaded.get(kind)
    if module is None:
        module = _loaded[kind] = cast("KindModule", importlib.import_module(_REGISTRY[kind]))
    return module


def kinds_in(specs: Iterable[StackSpec]) -> list[Kind]:
    """The kinds of `specs`, each once, in the order of Kind."""
    used = {s.kind for s in specs}
    return [k for k in Kind if k in used]


_T = TypeVar("_T", bound=KindTable)


def of_kind(specs: Iterable[StackSpec], table: type[_T]) -> list[tuple[StackSpec, _T]]:
    """The stacks of `specs` whose kind's Table is `table`, each with its table, in their order."""
    out: list[tuple[StackSpec, _T]] = []
    for spec in specs:
        if isinstance(spec.table, table):
            out.append((spec, spec.table))
    return out
