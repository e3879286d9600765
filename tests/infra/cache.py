"""Build artefacts of the test set-up cached under /var/cache/vzdh-test/, keyed by their recipe.

A recipe is any JSON-serialisable value that names everything the artefact is made from (command
lines, package lists, versions of inputs). Its hash is part of the file name, so a changed recipe
makes a new artefact and the old ones of the same name are removed. Builds are serialised with a lock
file per cache directory and written to ``<name>.part`` first, so a killed build leaves nothing that
looks finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CACHE_ROOT", "cached", "recipe_key"]

CACHE_ROOT = Path("/var/cache/vzdh-test")


def recipe_key(recipe: Any) -> str:
    """In: a JSON-serialisable recipe. Out: 16 hex digits of its SHA-256 (stable across runs)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cached(directory: Path, name: str, suffix: str, recipe: Any, build: Callable[[Path], None]) -> Path:
    """Return ``directory/<name>-<key><suffix>``, made by ``build(tmp_path)`` when it does not exist.

    In: the cache directory, the artefact's name and suffix (``.tar``, or ``""`` for a directory), its
    recipe, and a builder that writes the artefact at the path it is given (a file or a directory).
    Out: the path of the finished artefact. Older artefacts ``<name>-<other key><suffix>`` are removed
    once it is in place. Raises whatever ``build`` raises (the partial artefact is removed).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{name}-{recipe_key(recipe)}{suffix}"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            return final
        tmp = final.with_name(final.name + ".part")
        _remove(tmp)
        try:
            build(tmp)
        except BaseException:
            _remove(tmp)
            raise
        tmp.rename(final)
        for old in directory.glob(f"{name}-*{suffix}"):
            if old != final and re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{16}}{re.escape(suffix)}(\.part)?",
                                             old.name):
                _remove(old)
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
