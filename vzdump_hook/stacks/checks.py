"""The checks of a config's values that every table uses (config.py's and the stack kinds'): each problem
is collected as `key.path: message`, so that all of them are reported at once."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Set
from typing import Any

from ..errors import ConfigError


class Problems:
    """The problems found so far, as `key.path: message` lines."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def extend(self, items: list[str]) -> None:
        self.items.extend(items)

    def raise_any(self) -> None:
        """Raise ConfigError listing the problems, if there are any."""
        if self.items:
            raise ConfigError(self.items)


def num(p: Problems, path: str, v: Any, *, lo: float, hi: float, integer: bool = False) -> float | None:
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        p.add(path, f"must be {'an integer' if integer else 'a number'} (got {v!r})")
        return None
    if not lo <= v <= hi:
        p.add(path, f"must be {lo:g}-{hi:g} (got {v!r})")
        return None
    return float(v)


def string(p: Problems, path: str, v: Any, *, absolute: bool = False, choices: tuple[str, ...] = ()) -> str | None:
    if not isinstance(v, str) or not v:
        p.add(path, f"must be a non-empty string (got {v!r})")
        return None
    if absolute and not v.startswith("/"):
        p.add(path, f"must be an absolute path (got {v!r}): vzdump runs the hook with no working directory or HOME "
              "to resolve it")
        return None
    if choices and v not in choices:
        p.add(path, f"must be one of {', '.join(repr(c) for c in choices)} (got {v!r})")
        return None
    return v


def boolean(p: Problems, path: str, v: Any) -> bool | None:
    if not isinstance(v, bool):
        p.add(path, f"must be true or false (got {v!r})")
        return None
    return v


def unknown(p: Problems, path: str, table: Mapping[str, Any], known: Set[str]) -> None:
    for key in table:
        if key not in known:
            p.add(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(known))})")


def distinct(p: Problems, path: str, v: Any, most: int, ok: Callable[[str], bool], items: str, item: str,
             one: str) -> tuple[str, ...] | None:
    """A list of 1 to `most` distinct strings that `ok` accepts (`items`, each `item`); None after a problem."""
    if not isinstance(v, list) or not v or len(v) > most:
        p.add(path, f"must be a list of 1-{most} {items} (got {v!r})")
        return None
    for i, u in enumerate(v):
        if not isinstance(u, str) or not ok(u):
            p.add(f"{path}[{i}]", f"not {item}: {u!r}")
            return None
    if len(set(v)) != len(v):
        p.add(path, f"{one} is listed twice")
        return None
    return tuple(v)


def token_file_problem(path: str) -> str | None:
    """Why the API token file at `path` must not be used (absent, not a file, not root's alone), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist (put the API token's secret in it: install -m 600 -o root /dev/stdin {path})"
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != 0:
        return f"{path} must be owned by root (owner uid {st.st_uid}): chown root {path}"
    if st.st_mode & 0o077:
        return f"{path} must be readable by root alone (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}"
    return None
