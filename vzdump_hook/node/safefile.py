"""Files the program writes as root, written so that no other user can redirect or read them.

Every write goes through `write_atomic`: the directory is opened once without following a symlink and
must belong to root (or to this process's user) with no group or other write permission; the data is
written to a new file of a random name, created exclusively inside that directory (O_EXCL|O_NOFOLLOW
relative to the directory's descriptor), fsynced and renamed over the target in the same directory.
A user who may write the directory, or swap it for another (the parent of node_exporter's textfile
directory belongs to the `prometheus` user on Debian), cannot make root write through a link: a
planted link at the temporary name cannot exist (the name is random and created exclusively), one at
the target is replaced, not followed, and a swapped directory is someone else's and refused.

`private_dir` makes the program's own directories (state, run, ledger) 0700 and fixes an older, more
open one: they hold job records and settings that no other local user needs to read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

from ..errors import HookError


class UnsafePath(HookError):
    """A path the program will not write as root: its directory may be changed by another user."""


def directory_problem(st: os.stat_result, path: str) -> str | None:
    """Why root must not write in the directory `st` describes, or None."""
    owner_ok = st.st_uid in (0, os.geteuid())
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if not owner_ok:
        return (f"{path} belongs to uid {st.st_uid}, who may replace what root writes there: chown root {path}, "
                "or choose a directory of root's")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} may be written by other users (mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w {path}, "
                "or choose a directory of root's")
    return None


def _open_dir(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        if os.path.islink(path):
            raise UnsafePath(f"{path} is a symbolic link: "
                             "vzdump-hook writes only into a real directory of root's") from None
        raise


def write_atomic(path: str, data: str | bytes, mode: int = 0o600) -> None:
    """Replace the file at `path` with `data` (a reader sees the old file or the new one, never a part).

    The new file has `mode` whatever the umask. Raises UnsafePath when the directory is a link or may
    be written by another user, OSError when it cannot be written."""
    directory, name = os.path.split(path)
    directory = directory or "."
    blob = data.encode() if isinstance(data, str) else data
    dfd = _open_dir(directory)
    try:
        problem = directory_problem(os.fstat(dfd), directory)
        if problem:
            raise UnsafePath(f"not writing {path}: {problem}")
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def private_dir(path: str) -> None:
    """Make `path` (and missing parents) a directory only its owner may enter; an existing directory of
    root's that others may read (an older install's 0755) is made 0700. A link or another user's
    directory is refused (UnsafePath)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    dfd = _open_dir(path)
    try:
        st = os.fstat(dfd)
        problem = directory_problem(st, path)
        if problem and st.st_uid not in (0, os.geteuid()):
            raise UnsafePath(problem)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(dfd, 0o700)
    finally:
        os.close(dfd)


__all__ = ["UnsafePath", "directory_problem", "private_dir", "write_atomic"]
