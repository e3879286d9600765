"""A guest's `stacks` in the config: "auto", or a list of compose project names and stack tables. The keys
every stack table has are here (name, stop_timeout, kind, and the strategies: before_stop, ready, group);
a kind's own keys are its Table's (stacks/KIND_table.py), validated through the registry (__init__.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ..errors import ConfigError
from . import Kind, KindTable, kind_module, kinds_in
from .checks import Problems, num, unknown

if TYPE_CHECKING:
    from .controller_table import Table as ControllerSpec

_T = TypeVar("_T")


@dataclass(frozen=True)
class ReadySpec:
    """How to know a stack's app is back after its start (`ready`): one of a command in the guest that
    exits 0, an http(s) URL the node gets a 2xx/3xx answer from, or (compose) every started container
    with a healthcheck reporting healthy."""

    command: tuple[str, ...] = ()
    url: str = ""
    healthy: bool = False

    def describe(self) -> str:
        if self.command:
            return f"`{' '.join(self.command)}` exits 0"
        return f"{self.url} answers" if self.url else "its containers are healthy"


@dataclass(frozen=True)
class StackSpec:
    name: str
    stop_timeout: float | None = None  # None: the guest's stop_timeout
    # the kind's own keys (stacks/KIND_table.py: Table); by default a compose project's, which has none
    table: KindTable = field(default_factory=lambda: kind_module(Kind.COMPOSE).Table())
    before_stop: tuple[str, ...] = ()  # run in the guest right before the stop (not downtime), e.g. a CHECKPOINT
    before_stop_timeout: float = 60.0
    ready: ReadySpec | None = None  # the app is back when this says so (the downtime ends then)
    ready_timeout: float = 60.0
    group: int | None = None  # stop order: groups ascending, a group's stacks in parallel; start: the reverse

    @property
    def kind(self) -> Kind:
        return self.table.kind

    # A kind's keys read through the stack (another kind's stack: the default), as guest/shipped.py reads
    # them (kept for it); new code reads spec.table (of_kind in __init__.py).
    @property
    def units(self) -> tuple[str, ...]:
        return self._own("units", ())

    @property
    def user(self) -> str:
        return self._own("user", "")

    @property
    def containers(self) -> tuple[str, ...]:
        return self._own("containers", ())

    @property
    def label(self) -> str:
        return self._own("label", "")

    @property
    def controller(self) -> ControllerSpec | None:
        return cast("ControllerSpec", self.table) if self.kind is Kind.CONTROLLER else None

    def _own(self, key: str, default: _T) -> _T:
        value: _T = getattr(self.table, key, default)
        return value


_STACK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-.")
_KIND_NAMES = tuple(k.value for k in Kind)
COMMON_KEYS = frozenset({"name", "stop_timeout", "kind", "before_stop", "before_stop_timeout", "ready", "ready_timeout",
                         "group"})
MAX_GROUP = 99


def valid_stack_name(name: str) -> bool:
    """Compose project names: lowercase letters, digits, '_', '-', '.'; must start with a letter or digit."""
    return bool(name) and len(name) <= 128 and set(name) <= _STACK_NAME_CHARS and name[0].isalnum()


def stack_list(p: Problems, path: str, v: Any) -> tuple[StackSpec, ...] | None:
    """`stacks`: None for "auto" (every running compose project), else the stacks in stop order."""
    if v == "auto":
        return None
    if not isinstance(v, list) or not v:
        p.add(path, f'must be "auto" or a non-empty list of compose project names or stack tables (got {v!r})')
        return None
    specs: list[StackSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(v):
        spec = _stack(p, f"{path}[{i}]", item)
        if spec is None:
            continue
        if spec.name in seen:
            p.add(f"{path}[{i}]", f"{spec.name!r} is listed twice")
            continue
        seen.add(spec.name)
        specs.append(spec)
    for kind in kinds_in(specs):
        p.extend(kind_module(kind).check_list(path, specs))
    grouped = [s.group is not None for s in specs]
    if any(grouped) and not all(grouped):
        p.add(f"{path}[{grouped.index(False)}].group", "missing: once one stack has a group, every stack needs one "
              "(groups stop in ascending order, a group's stacks in parallel)")
    return tuple(specs)


def _stack(p: Problems, path: str, item: Any) -> StackSpec | None:
    """One entry of `stacks`: a compose project's name, or a stack table (its kind's keys: its Table)."""
    if not isinstance(item, dict):
        return StackSpec(item) if _named(p, path, item, Kind.COMPOSE) else None
    k = item.get("kind", "compose")
    if k not in _KIND_NAMES:
        p.add(f"{path}.kind", f"must be one of {', '.join(repr(x) for x in _KIND_NAMES)} (got {k!r})")
        return None
    kind = Kind(k)
    module = kind_module(kind)
    unknown(p, path, item, COMMON_KEYS | module.KEYS)
    strategies = _strategies(p, path, item, kind)
    if strategies is None:
        return None
    stop_timeout = None
    if "stop_timeout" in item:
        stop_timeout = num(p, f"{path}.stop_timeout", item["stop_timeout"], lo=1, hi=3600)
    try:
        table = module.validate(path, item)
    except ConfigError as e:
        p.extend(e.problems)
        return None
    if "name" not in item:
        p.add(f"{path}.name", "missing")
        return None
    if not _named(p, f"{path}.name", item["name"], kind):
        return None
    return StackSpec(item["name"], stop_timeout, table, **strategies)


def _named(p: Problems, path: str, name: Any, kind: Kind) -> bool:
    if isinstance(name, str) and valid_stack_name(name):
        return True
    what = "a compose project name" if kind is Kind.COMPOSE else "a stack name"
    p.add(path, f"not {what} (lowercase letters, digits, '_', '-', '.'): {name!r}")
    return False


def _argv(p: Problems, path: str, v: Any, what: str) -> tuple[str, ...] | None:
    """A command as a list of words (no shell): what the guest runs."""
    if not isinstance(v, list) or not 1 <= len(v) <= 64 or not all(isinstance(w, str) and w and len(w) <= 4096
                                                                   and "\0" not in w for w in v):
        p.add(path, f"must be a list of 1-64 non-empty strings, the command's words (run without a shell), e.g. {what} "
              f"(got {v!r})")
        return None
    return tuple(v)


def _ready(p: Problems, path: str, v: Any, kind: Kind) -> ReadySpec | None:
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in ("command", "url", "healthy"):
        p.add(path, "must be a table with one of: command = [...] (exits 0 in the guest), url = \"http://...\" "
              f"(answers 2xx/3xx to the node), healthy = true (compose healthchecks) (got {v!r})")
        return None
    key, value = next(iter(v.items()))
    if key == "command":
        argv = _argv(p, f"{path}.command", value, '["pg_isready", "-h", "127.0.0.1"]')
        return None if argv is None else ReadySpec(command=argv)
    if key == "url":
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", value):
            p.add(f"{path}.url", f"must be an http:// or https:// URL (got {value!r})")
            return None
        return ReadySpec(url=value)
    if value is not True or kind is not Kind.COMPOSE:
        p.add(f"{path}.healthy", "only `healthy = true`, and only for compose stacks (a systemd stack is ready when "
              "its units are active, which its start already waits for)")
        return None
    return ReadySpec(healthy=True)


def _strategies(p: Problems, path: str, item: Mapping[str, Any], kind: Kind) -> dict[str, Any] | None:
    """before_stop, ready, group and their bounds of one stack table (README: Per-stack strategies)."""
    before = len(p.items)
    out: dict[str, Any] = {}
    if "before_stop" in item:
        out["before_stop"] = _argv(p, f"{path}.before_stop", item["before_stop"],
                                   '["docker", "exec", "db-postgres-1", "psql", "-U", "postgres", "-c", "CHECKPOINT"]')
    if "before_stop_timeout" in item:
        out["before_stop_timeout"] = num(p, f"{path}.before_stop_timeout", item["before_stop_timeout"], lo=1, hi=3600)
        if "before_stop" not in item:
            p.add(f"{path}.before_stop_timeout", "without before_stop")
    if "ready" in item:
        out["ready"] = _ready(p, f"{path}.ready", item["ready"], kind)
    if "ready_timeout" in item:
        out["ready_timeout"] = num(p, f"{path}.ready_timeout", item["ready_timeout"], lo=1, hi=3600)
        if "ready" not in item:
            p.add(f"{path}.ready_timeout", "without ready")
    if "group" in item:
        g = num(p, f"{path}.group", item["group"], lo=1, hi=MAX_GROUP, integer=True)
        out["group"] = None if g is None else int(g)
    return out if len(p.items) == before else None
