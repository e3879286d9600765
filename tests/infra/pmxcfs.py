"""A directory that plays /etc/pve (pmxcfs) for in-process tests, with the rules the ledger relies on.

pmxcfs, the Proxmox cluster file system, renames atomically but has no hard links (and no symlinks
outside its own); whatever a node writes there must appear whole, so files are written under a
temporary name and renamed. `ClusterFs` makes `os.link`/`os.symlink` fail with EPERM inside the
directory (as pmxcfs does) and records every file opened for writing and every rename there, so a
test can check that final names only ever appear by rename.
"""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass
class ClusterFs:
    root: Path
    opened_for_write: list[str] = field(default_factory=list)  # paths relative to root
    renamed: list[tuple[str, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # link/symlink attempts

    def inside(self, path: Any) -> bool:
        try:
            p = os.path.abspath(os.fspath(path))
        except TypeError:
            return False
        return p == str(self.root) or p.startswith(str(self.root) + os.sep)

    def rel(self, path: Any) -> str:
        return os.path.relpath(os.path.abspath(os.fspath(path)), self.root)

    def files(self) -> list[str]:
        """Every regular file now in the directory, relative paths, sorted."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def written_in_place(self) -> list[str]:
        """Files that were opened for writing under their final name (not a temporary one renamed
        into place): a reader on another node could see them half-written."""
        finals = {dst for _, dst in self.renamed}
        temps = {src for src, _ in self.renamed}
        return sorted({p for p in self.opened_for_write if p not in temps} | (finals & set(self.opened_for_write)))


@contextmanager
def cluster_fs(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ClusterFs]:
    """Apply the pmxcfs rules to `root` (created) for the rest of the test."""
    root.mkdir(parents=True, exist_ok=True)
    fs = ClusterFs(root.resolve())
    real_open, real_replace, real_rename = builtins.open, os.replace, os.rename
    real_link, real_symlink = os.link, os.symlink

    def no_link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if fs.inside(src) or fs.inside(dst):
            fs.refused.append(fs.rel(dst))
            raise OSError(errno.EPERM, "Operation not permitted (pmxcfs has no hard links)", os.fspath(dst))
        real_link(src, dst, *args, **kwargs)

    def no_symlink(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if fs.inside(dst):
            fs.refused.append(fs.rel(dst))
            raise OSError(errno.EPERM, "Operation not permitted (pmxcfs)", os.fspath(dst))
        real_symlink(src, dst, *args, **kwargs)

    def recording_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and fs.inside(file):
            fs.opened_for_write.append(fs.rel(file))
        return real_open(file, mode, *args, **kwargs)

    def recording(real: Any) -> Any:
        def move(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            real(src, dst, *args, **kwargs)
            if fs.inside(dst):
                fs.renamed.append((fs.rel(src), fs.rel(dst)))

        return move

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "symlink", no_symlink)
    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(os, "replace", recording(real_replace))
    monkeypatch.setattr(os, "rename", recording(real_rename))
    yield fs
