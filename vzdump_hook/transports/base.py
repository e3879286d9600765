"""The transport interface: run a command in a guest, with a timeout and stdin; write/read small files.

A transport only moves argv lists and bytes. Quoting for a remote shell is done once, here
(`shell_join`), so nothing read from a guest or the config ever reaches a shell unquoted.
"""

from __future__ import annotations

import logging
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CommandTimeout, TransportError

log = logging.getLogger(__name__)

MAX_OUTPUT = 4 * 1024 * 1024  # bytes kept per stream; a guest cannot make the hook eat memory

# Writes stdin to $1 atomically: a temp file of unpredictable name (mktemp) in the same directory,
# fsync, rename, fsync the directory. A new directory is made 0700; a symlinked path is refused.
# `sync FILE` is coreutils >= 8.24; busybox and older guests fall back to a global sync.
_WRITE_SCRIPT = r"""
set -eu
umask 077
dir=$(dirname -- "$1")
[ -d "$dir" ] || mkdir -p -m 0700 -- "$dir"
if [ -L "$dir" ] || [ -L "$1" ]; then echo "$1: a symlink: refused" >&2; exit 1; fi
tmp=$(mktemp "$1.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
cat > "$tmp"
sync -- "$tmp" 2>/dev/null || sync
mv -f -- "$tmp" "$1"
trap - EXIT
sync -- "$dir" 2>/dev/null || sync
"""

# Prints the file, at most $2 bytes plus one (so that an oversized file is noticed); exit 3 when absent.
_READ_SCRIPT = r"""
[ -e "$1" ] || exit 3
head -c "$2" -- "$1"
"""

_REMOVE_SCRIPT = r"""
rm -f -- "$1"
sync -- "$(dirname -- "$1")" 2>/dev/null || sync
"""


def shell_join(argv: Sequence[str]) -> str:
    """One shell command line for argv, every word quoted."""
    return shlex.join(argv)


def display(argv: Sequence[str]) -> str:
    """argv for messages, on one line: an inline `sh -c` script is shortened to its first command."""
    if len(argv) >= 3 and argv[0] == "sh" and argv[1] == "-c":
        first = next((ln.strip() for ln in argv[2].splitlines()
                      if ln.strip() and not ln.strip().startswith(("set ", "#"))), "")
        short = first if len(first) <= 40 else first[:37] + "..."
        return f"sh -c '{short} ...' " + shlex.join(argv[4:])
    return shlex.join(argv)


def sh(script: str, *args: str) -> list[str]:
    """argv running `script` with `sh -c`, the arguments passed as $1.. (never spliced into the script)."""
    return ["sh", "-c", script, "sh", *args]


@dataclass(frozen=True)
class Result:
    """What a command did: its argv as a shell line, exit status, decoded output, wall time."""

    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self, what: str = "") -> Result:
        """self if the command succeeded; else raise TransportError carrying command, status, stderr."""
        if not self.ok:
            raise TransportError(what or "command failed", command=self.command, exit_status=self.exit_status,
                                 stderr=self.stderr or self.stdout)
        return self


class Transport(ABC):
    """Runs commands in one guest. Subclasses supply `_exec`; the file helpers build on it."""

    name = "base"

    def __init__(self, target: str) -> None:
        self.target = target  # for messages: "ssh root@10.0.0.5:22", "pct 101"

    @abstractmethod
    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        """Run argv; return (exit status, stdout, stderr). Raise CommandTimeout, ConnectError."""

    def connect(self, timeout: float) -> None:
        """Make sure the guest can be reached within `timeout` seconds; raises ConnectError."""
        self.run(["true"], timeout=timeout).check("guest does not run commands")

    def close(self) -> None:
        """Release connections. Safe to call twice."""

    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None) -> Result:
        """Run argv in the guest within `timeout` seconds (> 0). Non-zero exit is returned, not raised."""
        if timeout <= 0:
            raise CommandTimeout("no time left in this phase", command=display(argv))
        start = time.monotonic()
        status, out, err = self._exec(argv, stdin, timeout)
        result = Result(
            display(argv),
            status,
            out[:MAX_OUTPUT].decode("utf-8", "replace"),
            err[:MAX_OUTPUT].decode("utf-8", "replace"),
            time.monotonic() - start,
        )
        log.debug("%s: %s -> %d in %.0f ms", self.target, result.command, status, result.duration * 1000)
        return result

    def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        """Write `data` to `path` atomically (temp file, fsync, rename). Raises TransportError."""
        self.run(sh(_WRITE_SCRIPT, path), timeout=timeout, stdin=data).check(f"cannot write {path}")

    def read_file(self, path: str, *, limit: int, timeout: float) -> bytes | None:
        """Contents of `path` (at most limit+1 bytes), or None when it does not exist."""
        argv = sh(_READ_SCRIPT, path, str(limit + 1))
        if timeout <= 0:
            raise CommandTimeout("no time left in this phase", command=display(argv))
        status, out, err = self._exec(argv, None, timeout)
        if status == 3:
            return None
        if status != 0:
            raise TransportError(f"cannot read {path}", command=display(argv), exit_status=status,
                                 stderr=err.decode("utf-8", "replace"))
        return out

    def remove_file(self, path: str, *, timeout: float) -> None:
        self.run(sh(_REMOVE_SCRIPT, path), timeout=timeout).check(f"cannot remove {path}")

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
