"""The turns on the shared Docker engine (tests/infra/engine.py), between real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a process that takes a turn, says when it holds it, and holds it until its stdin closes
HOLDER = """
import sys
from tests.infra import engine
with engine.turn(exclusive=sys.argv[1] == "alone"):
    print("holds", flush=True)
    sys.stdin.read()
"""


def holder(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLDER, mode], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def holds(p: subprocess.Popen[str], within: float) -> bool:
    """`p` says it holds its turn within `within` seconds (False: it waits)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        return bool(sel.select(within)) and p.stdout.readline().strip() == "holds"  # type: ignore[union-attr]


def release(p: subprocess.Popen[str]) -> None:
    p.stdin.close()  # type: ignore[union-attr]
    p.wait(10)


def test_shared_turns_overlap_and_one_alone_waits_for_them_and_goes_before_later_ones() -> None:
    first, second = holder("shared"), holder("shared")
    alone = later = None
    try:
        assert holds(first, 10) and holds(second, 10)  # shared turns overlap
        alone = holder("alone")
        assert not holds(alone, 1.0)  # waits while any shared turn is held
        later = holder("shared")
        assert not holds(later, 1.0)  # a shared turn asked after it waits behind it: no starvation
        release(first)
        assert not holds(alone, 0.5)
        release(second)
        assert holds(alone, 10)
        assert not holds(later, 0.5)  # nobody shares the engine with the one alone
        release(alone)
        assert holds(later, 10)
    finally:
        for p in (first, second, alone, later):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_one_turn_a_process() -> None:
    from tests.infra import engine

    with engine.turn(exclusive=False):
        try:
            with engine.turn(exclusive=True):
                raise AssertionError("a second turn in the same process was granted")
        except RuntimeError as e:
            assert "already holds a turn" in str(e)
    start = time.monotonic()
    with engine.turn(exclusive=True) as waited:  # given back: free again
        assert engine.held_alone() and waited < 10 and time.monotonic() - start < 10
    assert not engine.held_alone()
