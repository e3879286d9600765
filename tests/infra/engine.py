"""Turns on the host's Docker engine, which every test worker of a parallel run (pytest-xdist) shares.

A guest configured with ``stacks = "auto"`` (or no ``stacks`` key) makes the hook stop every running
compose project the guest's engine has: in a test guest, the host's engine, where the tests of the other
workers keep theirs. Such a test holds the engine alone (``@pytest.mark.engine_alone``); every test with
compose projects (the ``compose_project`` fixture) holds it shared. Both are ``flock`` locks on files
in /run, so they bind every process of the run and end with the process that held them.

A gate keeps a waiting exclusive holder from starving: it is taken (exclusively) by everyone on the
way in and held by an exclusive taker until it holds the engine, so no shared holder gets in meanwhile.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = Path("/run/vzdh-test-engine.lock")
GATE = Path("/run/vzdh-test-engine.gate")
_held: bool | None = None  # the turn this process holds now: True alone, False shared, None none


@contextmanager
def turn(exclusive: bool) -> Iterator[float]:
    """Hold the engine (alone when `exclusive`) for the block; yields the seconds spent waiting."""
    global _held
    if _held is not None:
        raise RuntimeError("this process already holds a turn on the engine (one turn a test)")
    start = time.monotonic()
    with open(GATE, "a") as gate, open(LOCK, "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        _held = exclusive
        try:
            yield time.monotonic() - start
        finally:
            _held = None
            fcntl.flock(lock, fcntl.LOCK_UN)


def held_alone() -> bool:
    """This process holds the engine alone now."""
    return _held is True
