"""Runs a program on the node itself (`pct`, `pvesh`) with stdin, a hard timeout and capped output.

Shared by the transports that reach a guest through a node-side command. The program gets its own
process group, so that a timeout kills it together with whatever it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from ..errors import CommandTimeout, ConnectError
from .base import MAX_OUTPUT

# vzdump empties the environment: programs get a fixed PATH (and nothing from the hook's caller)
NODE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def _pump(stream: IO[bytes], into: bytearray) -> None:
    while chunk := stream.read(65536):
        if len(into) < MAX_OUTPUT:
            into += chunk[: MAX_OUTPUT - len(into)]


def _feed(stream: IO[bytes], data: bytes) -> None:
    try:
        stream.write(data)
    except (BrokenPipeError, OSError):
        pass  # the program did not read all of it: its exit status tells
    finally:
        try:
            stream.close()
        except OSError:
            pass


def run_local(argv: Sequence[str], stdin: bytes | None, timeout: float, *, shown: str, target: str,
              env: Mapping[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """Run argv on this node; (exit status, stdout, stderr). A status of -N means killed by signal N.

    Raises ConnectError when the program cannot be started, CommandTimeout (after killing its process
    group) when it does not finish within `timeout` seconds."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env if env is not None else NODE_ENV),
            cwd="/",
            start_new_session=True,
        )
    except OSError as e:
        raise ConnectError(f"{target}: cannot run {argv[0]}: {e.strerror or e}", command=shown) from None
    out, err = bytearray(), bytearray()
    assert proc.stdout is not None and proc.stderr is not None
    threads = [threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, err), daemon=True)]
    if stdin is not None:
        assert proc.stdin is not None
        threads.append(threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise CommandTimeout(f"{target}: no answer within {timeout:.1f} s (killed)", command=shown,
                             stderr=bytes(err).decode("utf-8", "replace")) from None
    for t in threads:  # output left in the pipes; a child that keeps them open is not waited for
        t.join(max(0.0, min(1.0, deadline - time.monotonic())))
    return status, bytes(out), bytes(err)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
