"""What every stack kind shares: the outcome of a stop, and the interface of a driver."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..guest.marker import StackRecord
    from . import Kind
    from .table import StackSpec


@dataclass(frozen=True)
class StopOutcome:
    name: str
    seconds: float
    killed: tuple[str, ...]  # containers / units that did not stop in time and were killed
    error: str = ""

    @property
    def clean(self) -> bool:
        return not self.killed and not self.error


@dataclass(frozen=True)
class Absent:
    """A name the config gives that the guest does not have at all (not one that exists and is
    stopped: that is left alone): a typo, a container removed, a unit not installed."""

    stack: str  # the stack it belongs to
    key: str  # its key in the stack's table: "containers[1]", "label", "units[0]", "name"
    what: str  # quoted: "docker container 'accc-typo' does not exist", "label 'app=x' selects no container"


def timed_stop(name: str, timeout: float, stop: Callable[[float], tuple[tuple[str, ...], str]]) -> StopOutcome:
    """The outcome of `stop(deadline)`, which returns (killed, error), with the seconds it took. An
    exception it raises (transport errors included) becomes the outcome's error: a stop never raises,
    so that the caller can apply the guest's policy."""
    start = time.monotonic()
    try:
        killed, error = stop(start + timeout)
    except Exception as e:  # the outcome is what matters here
        return StopOutcome(name, time.monotonic() - start, (), str(e))
    return StopOutcome(name, time.monotonic() - start, killed, error)


class KindDriver(Protocol):
    """One stack kind in one guest: the class `Driver` of stacks/KIND.py, built as Driver(transport, guest,
    job) (each takes what it needs of them). A driver that subclasses this has its defaults."""

    kind: Kind

    def running(self, specs: tuple[StackSpec, ...], timeout: float) -> dict[str, StackRecord]:
        """The stacks of the kind with something up, by name, given the guest's listed stacks (`specs`,
        () for "auto"): each as a record of what runs, not stopped yet."""

    def stop_bound(self, rec: StackRecord, stop_timeout: float) -> float:
        """How long stopping `rec` may take with `stop_timeout`, before the transport's own margin."""
        return stop_timeout

    def stop(self, rec: StackRecord, stop_timeout: float, timeout: float) -> StopOutcome:
        """Stop the stack; never raises (the outcome carries the error)."""

    def start(self, rec: StackRecord, timeout: float) -> float:
        """Start what `rec` records; seconds taken. Raises HookError when it is not up afterwards."""

    def is_up(self, rec: StackRecord, timeout: float) -> bool:
        """Everything `rec` records runs."""

    def absent(self) -> list[Absent]:
        """The names of the listed stacks that the last running() found do not exist in the guest."""
        return []
