"""The compose kind's config table: a compose project has no keys of its own (its name is the project's;
how compose runs is the guest's `compose_command`). Its driver: stacks/compose.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from . import Kind, KindTable

if TYPE_CHECKING:
    from .table import StackSpec

KEYS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Table(KindTable):
    kind: ClassVar[Kind] = Kind.COMPOSE


def validate(path: str, item: Mapping[str, Any]) -> Table:
    return Table()


def check_list(path: str, specs: Sequence[StackSpec]) -> list[str]:
    return []


def check_guest(path: str, specs: Sequence[StackSpec], transport: str, check_files: bool) -> list[str]:
    return []
