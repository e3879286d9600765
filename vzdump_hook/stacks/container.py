"""Plain containers as stacks (kind "container"): docker or podman containers listed by name, or the
running containers that carry a label, stopped and started one by one with the engine's CLI.

Only the containers that run are recorded (name and id), stopped in the given order (label matches
in the order of their names) and started again in reverse, by id: the very containers stopped. A
container the engine had to kill (the stop timeout ran out: exit code 137; or OOMKilled) makes the
stop unclean, and the guest's policy applies. `docker stop` / `podman stop` mark a container as
stopped by hand: its restart policy does not start it again during the window
(tests/integration/test_container_kind.py checks this against the real engines).

Ids are ids: docker and podman take a container's name where no container has the id given, and a name
may be 64 hex digits. So a stop or start acts only on a recorded id that the engine, asked for it,
answers with the container of exactly that id (`.Id`); a record from a marker whose "id" is another
container's name is an error naming the stack and the id, and nothing is stopped or started for it.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

from ..errors import ControllerError
from ..guest.marker import StackRecord
from ..transports.base import Transport, sh
from . import Kind, of_kind
from .base import Absent, KindDriver, StopOutcome, timed_stop
from .compose import KILLED
from .container_table import ENGINES, Table, valid_container_name
from .table import StackSpec

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..node.job import JobId

log = logging.getLogger(__name__)

_ID = re.compile(r"[0-9a-f]{64}")
# the formats and the detection script the hook sends; the restricted wrapper accepts these exactly
LIST_FORMAT = "{{.ID}}\t{{.Names}}"
INSPECT_FORMAT = "{{.Id}} {{.State.Running}} {{.State.Restarting}} {{.State.ExitCode}} {{.State.OOMKilled}}"
DETECT = ('for e in docker podman; do if command -v "$e" >/dev/null 2>&1 && "$e" container ls -q >/dev/null 2>&1; '
          'then echo "$e"; exit 0; fi; done; echo none')


# container id -> (running and not restarting, killed: exit code 137 or OOMKilled)
States = dict[str, tuple[bool, bool]]


def list_argv(engine: str, label: str = "", every: bool = False) -> list[str]:
    """The running containers (id, name), all of them or those carrying `label`; with `every`, also
    those that exist and do not run (to tell a stopped container from one that does not exist)."""
    which = ["-a"] if every else []
    running = [] if every else ["--filter", "status=running"]
    return [engine, "container", "ls", *which, "--no-trunc", *running,
            *(["--filter", f"label={label}"] if label else []), "--format", LIST_FORMAT]


class ContainerDriver(KindDriver):
    """Plain container stacks in one guest, reached through `transport`."""

    kind = Kind.CONTAINER

    def __init__(self, transport: Transport, guest: GuestConfig | None = None, job: JobId | None = None) -> None:
        self.t = transport
        self.detected: str | None = None
        self._absent: list[Absent] = []

    def absent(self) -> list[Absent]:
        return list(self._absent)

    def engine(self, table: Table, timeout: float) -> str:
        """The stack's configured engine, else the one the guest has (docker first). Raises ControllerError."""
        if table.engine:
            return table.engine
        if self.detected is None:
            out = self.t.run(sh(DETECT), timeout=timeout).check("cannot look for docker or podman").stdout.strip()
            if out not in ENGINES:
                raise ControllerError(f"{self.t.target}: neither docker nor podman answers in the guest "
                                      "(container stacks)")
            self.detected = out
        return self.detected

    def _list(self, engine: str, label: str, timeout: float, every: bool = False) -> list[tuple[str, str]]:
        """(id, name) of the running containers (carrying `label`; with `every` those that exist),
        sorted by name. Raises TransportError."""
        res = self.t.run(list_argv(engine, label, every), timeout=timeout).check(
            f"cannot list containers (is {engine} running?)")
        found: list[tuple[str, str]] = []
        for line in res.stdout.splitlines():
            cid, _, name = line.partition("\t")
            if _ID.fullmatch(cid) and valid_container_name(name):
                found.append((cid, name))
        return sorted(found, key=lambda c: c[1])

    def running(self, specs: tuple[StackSpec, ...], timeout: float) -> dict[str, StackRecord]:
        """The container stacks of `specs` with a running container: each with the names and ids of
        those that run, in stop order. A container already in an earlier stack is left to that one."""
        deadline = time.monotonic() + timeout
        found: dict[str, StackRecord] = {}
        by_name: dict[str, dict[str, str]] = {}  # engine -> name -> id of every running container
        taken: set[str] = set()
        self._absent = []
        for s, t in of_kind(specs, Table):
            engine = self.engine(t, deadline - time.monotonic())
            if t.label:
                matches = self._list(engine, t.label, deadline - time.monotonic())
                if not matches and not self._list(engine, t.label, deadline - time.monotonic(), every=True):
                    self._absent.append(Absent(s.name, "label", f"label {t.label!r} selects no container"))
            else:
                if engine not in by_name:
                    by_name[engine] = {n: c for c, n in self._list(engine, "", deadline - time.monotonic())}
                matches = [(by_name[engine][n], n) for n in t.containers if n in by_name[engine]]
                self._absent += self._not_existing(s.name, engine, t.containers, by_name[engine], deadline)
            for cid, n in matches:
                if cid in taken:
                    log.warning("container %s: %s is in an earlier stack: left to that one", s.name, n)
            matches = [(c, n) for c, n in matches if c not in taken]
            taken.update(c for c, _ in matches)
            if matches:
                found[s.name] = StackRecord.container(s.name, engine, tuple(n for _, n in matches),
                                                      tuple(c for c, _ in matches))
        return found

    def _not_existing(self, stack: str, engine: str, names: tuple[str, ...], running: dict[str, str],
                      deadline: float) -> list[Absent]:
        """Those of `names` (none of them running) that no container of `engine` has: asked only
        when some listed container does not run (the common case costs no second listing)."""
        idle = [(i, n) for i, n in enumerate(names) if n not in running]
        if not idle:
            return []
        every = {n for _, n in self._list(engine, "", deadline - time.monotonic(), every=True)}
        return [Absent(stack, f"containers[{i}]", f"{engine} container {n!r} does not exist")
                for i, n in idle if n not in every]

    def stop_bound(self, rec: StackRecord, stop_timeout: float) -> float:
        """The containers stop one at a time, each within the stop timeout."""
        return stop_timeout * len(rec.containers)

    def _inspect(self, rec: StackRecord, ids: tuple[str, ...], timeout: float) -> tuple[States, bool]:
        """The states of those of `ids` the engine gives by that very id (`.Id`); containers that no
        longer exist are left out. And whether the engine answered with anything else (then it took an
        id for a name)."""
        res = self.t.run([rec.engine, "container", "inspect", "--format", INSPECT_FORMAT, *ids], timeout=timeout)
        states: States = {}
        lines = res.stdout.splitlines()
        for line in lines:
            parts = line.split()
            if len(parts) == 5 and parts[0] in ids:
                killed = parts[3] == str(KILLED) or parts[4] == "true"
                states[parts[0]] = (parts[1] == "true" and parts[2] == "false", killed)
        return states, len(lines) != len(states)

    def _states(self, rec: StackRecord, timeout: float) -> States:
        return self._inspect(rec, rec.containers, timeout)[0]

    def _verified(self, rec: StackRecord, deadline: float) -> tuple[States, list[str]]:
        """The states of the recorded containers the engine gives by their ids, the only ones to act on;
        and, for each recorded id the engine takes for another container (a name that looks like an
        id), what it is. Raises TransportError."""
        states, other = self._inspect(rec, rec.containers, deadline - time.monotonic())
        wrong: list[str] = []
        if other:  # which ids: asked one by one
            for cid in rec.containers:
                if cid in states:
                    continue
                argv = [rec.engine, "container", "inspect", "--format", INSPECT_FORMAT, cid]
                word = (self.t.run(argv, timeout=deadline - time.monotonic()).stdout.split() or [""])[0]
                if word != cid and _ID.fullmatch(word):
                    wrong.append(f"{cid} is not the id of a container in the guest ({rec.engine} gives the container "
                                 f"{word[:12]} for it: a name, not an id), nothing done for it")
        return states, wrong

    def _each(self, rec: StackRecord, verb: list[str], ids: tuple[str, ...], deadline: float) -> list[str]:
        """`ENGINE container VERB ID` for each id in turn (the order is the point); the errors."""
        errors: list[str] = []
        for cid in ids:
            res = self.t.run([rec.engine, "container", *verb, cid], timeout=deadline - time.monotonic())
            if not res.ok:
                errors.append(f"{self._named(rec, cid)}: {res.stderr.strip()[-200:]}")
        return errors

    @staticmethod
    def _named(rec: StackRecord, cid: str) -> str:
        return dict(zip(rec.containers, rec.names, strict=False)).get(cid, cid[:12])

    def stop(self, rec: StackRecord, stop_timeout: float, timeout: float) -> StopOutcome:
        """Stop the recorded containers in order, one at a time; report those killed. Never raises:
        the outcome carries the error."""
        return timed_stop(rec.name, timeout, lambda deadline: self._stop(rec, stop_timeout, deadline))

    def _stop(self, rec: StackRecord, stop_timeout: float, deadline: float) -> tuple[tuple[str, ...], str]:
        found, wrong = self._verified(rec, deadline)
        ids = tuple(c for c in rec.containers if c in found)
        errors = self._each(rec, ["stop", "-t", str(int(max(1, stop_timeout)))], ids, deadline)
        states = self._inspect(rec, ids, deadline - time.monotonic())[0] if ids else {}
        still = [self._named(rec, c) for c, (running, _) in states.items() if running]
        killed = tuple(self._named(rec, c) for c, (running, k) in states.items() if not running and k)
        problems = [f"container {w}" for w in wrong]
        if still:
            detail = f" ({'; '.join(errors)})" if errors else ""
            problems.append(f"still running after stop: {', '.join(still)}{detail}")
        return killed, "; ".join(problems)

    def start(self, rec: StackRecord, timeout: float) -> float:
        """Start the recorded containers, last stopped first, and check each runs; seconds taken.
        Raises ControllerError / TransportError when one is not up."""
        start = time.monotonic()
        deadline = start + timeout
        found, wrong = self._verified(rec, deadline)
        errors = self._each(rec, ["start"], tuple(c for c in reversed(rec.containers) if c in found), deadline)
        states = self._states(rec, deadline - time.monotonic())
        down = [self._named(rec, c) + ("" if c in states else " (no longer exists)") for c in rec.containers
                if not states.get(c, (False,))[0]]
        problems = [f"container {w}" for w in wrong]
        if down:
            detail = f" ({'; '.join(errors)})" if errors else ""
            problems.append(f"not running after start: {', '.join(down)}{detail}")
        if problems:
            raise ControllerError(f"stack {rec.name}: {'; '.join(problems)}")
        return time.monotonic() - start

    def is_up(self, rec: StackRecord, timeout: float) -> bool:
        states = self._states(rec, timeout)
        return all(states.get(c, (False,))[0] for c in rec.containers)


Driver = ContainerDriver  # the name every stacks/KIND.py defines (stacks/__init__.py)
