"""Contact many guests at once: one thread per guest, no pool, bounded by a deadline.

Each guest's work is itself bounded (connect and command timeouts, capped by the deadline), so a
pool would only make N guests cost N/pool_size timeouts. The threads are daemons: a guest that
overruns is reported as late and never waited for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_all(fn: Callable[[T], R], items: Sequence[T], deadline: float,
            on_done: Callable[[int, int], None] | None = None) -> list[R | None]:
    """fn(item) for every item at once. Returns the results in item order; None for an item whose
    call had not returned by `deadline` (monotonic). An exception in fn is raised here.
    `on_done(done, total)` is called as calls return (from their threads, one at a time)."""
    results: list[R | None] = [None] * len(items)
    errors: list[BaseException] = []
    done = threading.Condition()
    count = 0

    def one(i: int, item: T) -> None:
        nonlocal count
        try:
            r = fn(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            with done:
                errors.append(e)
                count += 1
                done.notify()
            return
        with done:
            results[i] = r
            count += 1
            if on_done is not None:
                on_done(count, len(items))
            done.notify()

    for i, item in enumerate(items):
        threading.Thread(target=one, args=(i, item), daemon=True, name=f"fanout-{i}").start()
    with done:
        while count < len(items) and not errors:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done.wait(left)
        if errors:
            raise errors[0]
        return list(results)


class Progress:
    """`contacting N guests: k answered` on one terminal line, rewritten in place (admin commands,
    only when their output is a terminal)."""

    def __init__(self, write: Callable[[str], None], what: str) -> None:
        self.write = write
        self.what = what
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        self.write(f"\r{self.what}: {done}/{total} answered")
        self.shown = True

    def end(self) -> None:
        if self.shown:
            self.write("\r\x1b[K")


def progress_for(items: Sequence[object], isatty: bool, write: Callable[[str], None], what: str,
                 few: int = 5) -> Progress | None:
    """A Progress when output is a terminal and more than `few` guests are contacted, else None."""
    return Progress(write, what) if isatty and len(items) > few else None
