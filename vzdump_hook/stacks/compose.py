"""Docker compose projects as stacks (compose v2 `docker compose` or v1 `docker-compose`).

Projects are found through the labels compose puts on its containers, so no compose file has to be
known in advance; the working directory and files recorded there are used to stop and start the
project with compose (dependency order), and container ids are kept as a fallback (`docker stop` /
`docker start`) for containers compose no longer knows (file edited or gone since `up`).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from ..errors import ControllerError
from ..guest.marker import StackRecord
from ..transports.base import Transport, sh
from . import Kind
from .base import Absent, KindDriver, StopOutcome, timed_stop
from .compose_table import ALLOWED_COMPOSE, SERVICE
from .table import StackSpec, valid_stack_name

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..node.job import JobId

KILLED = 137  # 128 + SIGKILL: compose's stop timeout ran out and docker killed the container
_ID = re.compile(r"[0-9a-f]{64}")
_LIST_FORMAT = (
    '{{.ID}}\t{{.Label "com.docker.compose.project"}}\t{{.Label "com.docker.compose.project.working_dir"}}'
    '\t{{.Label "com.docker.compose.project.config_files"}}\t{{.Label "com.docker.compose.service"}}'
)
_DETECT = r"""
if docker compose version >/dev/null 2>&1; then echo "docker compose"
elif command -v docker-compose >/dev/null 2>&1; then echo "docker-compose"
else echo none; fi
"""
_IN_DIR = 'cd -- "$1" 2>/dev/null || cd /; shift; exec "$@"'


HEALTH_FORMAT = "{{.Id}} {{.State.Running}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}"


class ComposeDriver(KindDriver):
    """Compose stacks in one guest, reached through `transport`, with `compose` (else the guest's
    compose_command, else detected)."""

    kind = Kind.COMPOSE

    def __init__(self, transport: Transport, guest: GuestConfig | None = None, job: JobId | None = None, *,
                 compose: tuple[str, ...] | None = None) -> None:
        self.t = transport
        self.compose = compose if compose is not None or guest is None else guest.compose_command
        self._absent: list[Absent] = []

    def absent(self) -> list[Absent]:
        return list(self._absent)

    def detect(self, timeout: float) -> tuple[str, ...]:
        """The compose command to use: the configured one, else v2 if it answers, else v1."""
        if self.compose is None:
            out = self.t.run(sh(_DETECT), timeout=timeout).check("cannot look for docker compose").stdout.strip()
            if out == "none":
                raise ControllerError(f"{self.t.target}: neither `docker compose` nor `docker-compose` "
                                      "found in the guest's PATH")
            self.compose = tuple(out.split())
        return self.compose

    def running(self, specs: tuple[StackSpec, ...], timeout: float) -> dict[str, StackRecord]:
        """Running compose projects by name, each with the ids of its running containers: every one,
        listed or not (the guest's selection picks), but those named as a listed stack of another kind
        (names are unique in the config)."""
        other = {s.name for s in specs if s.kind is not Kind.COMPOSE}
        start = time.monotonic()
        # status=running leaves out containers in a restart loop: a stack that was not up is not ours to stop
        argv = ["docker", "ps", "--no-trunc", "--filter", "label=com.docker.compose.project",
                "--filter", "status=running", "--format", _LIST_FORMAT]
        res = self.t.run(argv, timeout=timeout)
        res.check("cannot list containers (is docker running, and may this user use it?)")
        compose = self.detect(timeout - (time.monotonic() - start))
        found: dict[str, StackRecord] = {}
        for line in res.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) != 5:
                continue
            cid, name, workdir, files, service = parts
            if (not _ID.fullmatch(cid) or not valid_stack_name(name) or name in other or not workdir.startswith("/")
                    or not re.fullmatch(SERVICE, service)):
                continue
            prev = found.get(name)
            containers = (prev.containers if prev else ()) + (cid,)
            services = ((prev.services if prev else ())
                        + ((service,) if not prev or service not in prev.services else ()))
            found[name] = StackRecord(name, compose, workdir, tuple(f for f in files.split(",") if f), containers,
                                      services=services)
        self._absent = self._not_existing([s.name for s in specs if s.kind is Kind.COMPOSE and s.name not in found],
                                          timeout - (time.monotonic() - start))
        return found

    def _not_existing(self, idle: list[str], timeout: float) -> list[Absent]:
        """Those of the listed projects `idle` (none of them running) that have no container at all:
        asked only when a listed project does not run (the common case costs no second listing)."""
        if not idle:
            return []
        argv = ["docker", "ps", "-a", "--no-trunc", "--filter", "label=com.docker.compose.project",
                "--format", _LIST_FORMAT]
        res = self.t.run(argv, timeout=timeout).check("cannot list containers (is docker running?)")
        projects = {parts[1] for line in res.stdout.splitlines() if len(parts := line.split("\t")) == 5}
        return [Absent(n, "name", f"compose project {n!r} has no container") for n in idle if n not in projects]

    def _compose(self, rec: StackRecord, *args: str) -> list[str]:
        if rec.compose not in ALLOWED_COMPOSE:
            raise ControllerError(f"stack {rec.name}: compose command {rec.compose!r} not allowed")
        argv = [*rec.compose, "-p", rec.name]
        for f in rec.files:
            argv += ["-f", f]
        return sh(_IN_DIR, rec.workdir, *argv, *args)

    def _states(self, rec: StackRecord, timeout: float) -> dict[str, tuple[bool, int]]:
        """container id -> (running and not restarting, exit code) for the containers recorded;
        containers that no longer exist are left out."""
        if not rec.containers:
            return {}
        res = self.t.run(["docker", "inspect", "--format",
                          "{{.Id}} {{.State.Running}} {{.State.Restarting}} {{.State.ExitCode}}", *rec.containers],
                         timeout=timeout)
        states: dict[str, tuple[bool, int]] = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] in rec.containers and parts[3].lstrip("-").isdigit():
                # a container in a restart loop is not up
                states[parts[0]] = (parts[1] == "true" and parts[2] == "false", int(parts[3]))
        return states

    def stop(self, rec: StackRecord, stop_timeout: float, timeout: float) -> StopOutcome:
        """Stop the project; report containers that had to be killed. Never raises for a failed stop:
        the outcome carries the error, so the caller can apply the guest's policy."""
        return timed_stop(rec.name, timeout, lambda deadline: self._stop(rec, str(int(max(1, stop_timeout))), deadline))

    def _stop(self, rec: StackRecord, t: str, deadline: float) -> tuple[tuple[str, ...], str]:
        res = self.t.run(self._compose(rec, "stop", "-t", t), timeout=deadline - time.monotonic())
        states = self._states(rec, deadline - time.monotonic())
        still = [c for c, (running, _) in states.items() if running]
        if still:  # containers compose does not know any more (file edited since `up`)
            self.t.run(["docker", "stop", "-t", t, *still], timeout=deadline - time.monotonic())
            states = self._states(rec, deadline - time.monotonic())
            still = [c for c, (running, _) in states.items() if running]
        killed = tuple(c[:12] for c, (running, code) in states.items() if not running and code == KILLED)
        error = ""
        if still:
            error = (f"still running after stop: {', '.join(c[:12] for c in still)}"
                     + (f" ({res.stderr.strip()[-200:]})" if not res.ok else ""))
        return killed, error

    def start(self, rec: StackRecord, timeout: float) -> float:
        """Start the project again and check its recorded containers run; seconds taken.
        Raises ControllerError / TransportError when it is not up."""
        start = time.monotonic()
        deadline = start + timeout
        # only the services that were running: a one-shot or hand-stopped service stays down
        res = self.t.run(self._compose(rec, "start", *rec.services), timeout=timeout)
        states = self._states(rec, deadline - time.monotonic())
        down = [c for c, (running, _) in states.items() if not running]
        if down:  # compose could not (file gone or edited): start the very containers we stopped
            self.t.run(["docker", "start", *down], timeout=deadline - time.monotonic())
            states = self._states(rec, deadline - time.monotonic())
            down = [c for c, (running, _) in states.items() if not running]
        gone = [c for c in rec.containers if c not in states]  # removed meanwhile: recreated, or `compose down`?
        if gone and not down and self._services_up(rec, deadline - time.monotonic()):
            gone = []  # recreated (new ids), and every service that ran before runs again
        if down or gone or (not res.ok and not rec.containers):
            detail = res.stderr.strip()[-300:] if not res.ok else ""
            what = (", ".join([c[:12] for c in down] + [f"{c[:12]} (no longer exists)" for c in gone])
                    or "compose failed")
            raise ControllerError(f"stack {rec.name}: not running after start: {what}"
                                  + (f" ({detail})" if detail else ""))
        return time.monotonic() - start

    def _services_up(self, rec: StackRecord, timeout: float) -> bool:
        """Every service recorded (or, for a record without services, any) runs in the project now."""
        argv = ["docker", "ps", "--filter", f"label=com.docker.compose.project={rec.name}",
                "--filter", "status=running", "--format", '{{.Label "com.docker.compose.service"}}']
        res = self.t.run(argv, timeout=timeout)
        running = set(res.stdout.split()) if res.ok else set()
        return set(rec.services) <= running if rec.services else bool(running)

    def healthy(self, rec: StackRecord, timeout: float) -> bool:
        """Every recorded container with a healthcheck reports healthy (`ready = { healthy = true }`);
        a container without one counts once it runs."""
        if not rec.containers:
            return self._services_up(rec, timeout)
        res = self.t.run(["docker", "inspect", "--format", HEALTH_FORMAT, *rec.containers], timeout=timeout)
        seen = [line.split() for line in res.stdout.splitlines()]
        return res.ok and len(seen) == len(rec.containers) and all(
            len(w) == 3 and w[1] == "true" and w[2] in ("healthy", "none") for w in seen)

    def is_up(self, rec: StackRecord, timeout: float) -> bool:
        states = self._states(rec, timeout)
        return bool(states) and all(running for running, _ in states.values())


Driver = ComposeDriver  # the name every stacks/KIND.py defines (stacks/__init__.py)
