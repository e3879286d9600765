"""An in-memory guest and a Transport that talks to it: the unit tests mock at the transport boundary.

`FakeGuest` holds what matters inside a guest: docker compose projects (working dir, files, containers
by 64-hex id with running / restarting / exit code), files (the marker) and behaviour knobs.
`FakeTransport` implements `Transport._exec` by interpreting exactly the argv the package sends:

    ["true"]                                               connect
    ["sh", "-c", SCRIPT, "sh", *args]                      SCRIPT is one of transports.base._WRITE_SCRIPT,
                                                           _READ_SCRIPT, _REMOVE_SCRIPT, stacks.compose._DETECT,
                                                           _IN_DIR (args: workdir, compose argv)
    ["docker", "ps", "--no-trunc", "--filter", "label=com.docker.compose.project", "--filter", "status=running",
     "--format", FMT]
    ["docker", "ps", "-a", "--no-trunc", "--filter", "label=com.docker.compose.project", "--format", FMT]
    ["docker", "inspect", "--format", FMT, *ids]
    ["docker", "stop", "-t", N, *ids]
    ["docker", "start", *ids]

Anything else exits 127 with a message on stderr, so a test notices an unexpected command. Every
call is recorded in `FakeGuest.calls` as (verb, detail) so that tests can assert order.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vzdump_hook.errors import CommandTimeout, ConnectError
from vzdump_hook.stacks import compose as compose_mod
from vzdump_hook.transports import base
from vzdump_hook.transports.base import Transport, shell_join

PS_PREFIX = ["docker", "ps", "--no-trunc", "--filter", "label=com.docker.compose.project", "--filter", "status=running",
             "--format"]
PS_ALL_PREFIX = ["docker", "ps", "-a", "--no-trunc", "--filter", "label=com.docker.compose.project", "--format"]
COMPOSE_COMMANDS = {"docker compose": ("docker", "compose"), "docker-compose": ("docker-compose",)}
_TOKEN = re.compile(r"\{\{\s*(\.[A-Za-z.]+)\s*(?:\"([^\"]*)\")?\s*\}\}")


def container_id(project: str, n: int) -> str:
    """A deterministic 64-hex container id."""
    return hashlib.sha256(f"{project}/{n}".encode()).hexdigest()


@dataclass
class FakeContainer:
    id: str
    service: str
    running: bool = True
    exit_code: int = 0
    restarting: bool = False  # in a restart loop: docker says running, but it is not up


@dataclass
class FakeProject:
    name: str
    workdir: str
    files: tuple[str, ...]
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    stubborn: bool = False  # ignores SIGTERM: a stop ends with exit 137 (killed at the stop timeout)
    start_fails: bool = False  # compose start and docker start fail, the containers stay down
    stop_hangs: bool = False  # compose stop never returns (CommandTimeout)
    compose_broken: bool = False  # compose cannot load the project (file edited/gone): docker fallback
    restart_loop: bool = False  # after a start the containers keep restarting

    @property
    def running(self) -> bool:
        return any(c.running for c in self.containers.values())

    @property
    def all_running(self) -> bool:
        return bool(self.containers) and all(c.running and not c.restarting for c in self.containers.values())

    @property
    def ids(self) -> list[str]:
        return list(self.containers)


class FakeGuest:
    """A guest with docker inside, in memory. Thread-safe (the controller stops stacks in parallel)."""

    def __init__(self, compose: str = "docker compose") -> None:
        self.projects: dict[str, FakeProject] = {}
        self.files: dict[str, bytes] = {}
        self.compose = compose  # what `docker compose version` / `command -v docker-compose` find; "none"
        # guest-wide knobs
        self.unreachable = False  # every call raises ConnectError
        self.hang = False  # every call raises CommandTimeout
        self.hang_sleeps = False  # a hang (guest-wide or stop_hangs) first sleeps the whole timeout
        self.docker_down = False  # docker ps fails
        self.fail_writes = False  # writing a file fails (disk full)
        self.stop_delay = 0.0  # seconds every compose stop takes
        self.on_call: Callable[[str, str], None] | None = None  # may raise, to break one call
        self.extra_ps_lines: list[str] = []  # raw lines added to `docker ps` output
        # records
        self.calls: list[tuple[str, str]] = []
        self.timed: list[tuple[str, str, float, float]] = []  # (verb, detail, timeout, monotonic at call)
        self.argvs: list[list[str]] = []
        self.writes: list[tuple[str, bytes]] = []
        self.refused = 0  # calls made while unreachable
        self.transports_opened = 0
        self.max_parallel_stops = 0
        self._active_stops = 0
        self._lock = threading.RLock()

    # -- setup -----------------------------------------------------------------------------------

    def add_project(
        self,
        name: str,
        containers: int = 1,
        *,
        workdir: str | None = None,
        files: Sequence[str] | None = None,
        running: bool = True,
        **knobs: bool,
    ) -> FakeProject:
        workdir = workdir or f"/srv/{name}"
        files = tuple(files) if files is not None else (f"{workdir}/compose.yaml",)
        p = FakeProject(name, workdir, files)
        for knob, value in knobs.items():
            if knob not in ("stubborn", "start_fails", "stop_hangs", "compose_broken", "restart_loop"):
                raise TypeError(f"unknown project knob {knob!r}")
            setattr(p, knob, value)
        for i in range(containers):
            cid = container_id(name, i)
            p.containers[cid] = FakeContainer(cid, f"svc{i}", running=running)
        self.projects[name] = p
        return p

    # -- inspection for tests --------------------------------------------------------------------

    def running_stacks(self) -> list[str]:
        """Names of the projects with every container up, sorted."""
        return sorted(n for n, p in self.projects.items() if p.all_running)

    def down_stacks(self) -> list[str]:
        return sorted(n for n, p in self.projects.items() if not p.running)

    def verbs(self, verb: str) -> list[str]:
        """Details of every call of `verb`, in order."""
        return [d for v, d in self.calls if v == verb]

    def first(self, verb: str, detail: str | None = None) -> int:
        """Index of the first call of `verb` (with `detail`), or -1."""
        for i, (v, d) in enumerate(self.calls):
            if v == verb and (detail is None or d == detail):
                return i
        return -1

    def starts(self) -> list[str]:
        """Names of the projects started with compose, in order."""
        return self.verbs("compose-start")

    def stops(self) -> list[str]:
        return self.verbs("compose-stop")

    def _container(self, cid: str) -> tuple[FakeProject, FakeContainer] | None:
        for p in self.projects.values():
            if cid in p.containers:
                return p, p.containers[cid]
        return None

    # -- the guest side of a command -------------------------------------------------------------

    def execute(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        argv = [str(a) for a in argv]
        verb, detail, handler = self._classify(argv)
        with self._lock:
            self.calls.append((verb, detail))
            self.timed.append((verb, detail, timeout, time.monotonic()))
            self.argvs.append(argv)
        if self.on_call is not None:
            self.on_call(verb, detail)
        if self.unreachable:
            with self._lock:
                self.refused += 1
            raise ConnectError("fake guest: connection refused", command=shell_join(argv))
        if self.hang:
            if self.hang_sleeps:
                time.sleep(timeout)
            raise CommandTimeout(f"no answer within {timeout:.1f} s", command=shell_join(argv))
        return handler(argv, stdin or b"", timeout)

    def _classify(self, argv: list[str]) -> tuple[str, str,
                                                  Callable[[list[str], bytes, float], tuple[int, bytes, bytes]]]:
        if argv == ["true"]:
            return "connect", "", lambda a, s, t: (0, b"", b"")
        if len(argv) >= 4 and argv[:2] == ["sh", "-c"] and argv[3] == "sh":
            script, args = argv[2], argv[4:]
            if script == base._WRITE_SCRIPT and len(args) == 1:
                return "write", args[0], self._write
            if script == base._READ_SCRIPT and len(args) == 2 and args[1].isdigit():
                return "read", args[0], self._read
            if script == base._REMOVE_SCRIPT and len(args) == 1:
                return "remove", args[0], self._remove
            if script == compose_mod._DETECT and not args:
                return "detect", "", self._detect
            if script == compose_mod._IN_DIR:
                parsed = self._parse_compose(args)
                if parsed is not None:
                    verb, name = parsed
                    return verb, name, self._compose
        if argv[: len(PS_PREFIX)] == PS_PREFIX and len(argv) == len(PS_PREFIX) + 1:
            return "ps", "", self._ps
        if argv[: len(PS_ALL_PREFIX)] == PS_ALL_PREFIX and len(argv) == len(PS_ALL_PREFIX) + 1:
            return "ps-all", "", self._ps
        if (
            argv[:3] == ["docker", "ps", "--filter"]
            and argv[3].startswith("label=com.docker.compose.project=")
            and argv[4:7] == ["--filter", "status=running", "--format"]
            and len(argv) == 8
        ):
            return "ps-project", argv[3].partition("=")[2].partition("=")[2], self._ps_project
        if argv[:3] == ["docker", "inspect", "--format"] and len(argv) >= 5:
            return "inspect", " ".join(c[:12] for c in argv[4:]), self._inspect
        if argv[:3] == ["docker", "stop", "-t"] and len(argv) >= 5 and argv[3].isdigit():
            return "docker-stop", " ".join(c[:12] for c in argv[4:]), self._docker_stop
        if argv[:2] == ["docker", "start"] and len(argv) >= 3:
            return "docker-start", " ".join(c[:12] for c in argv[2:]), self._docker_start
        return "unknown", shell_join(argv), lambda a, s, t: (127, b"",
                                                             f"fake guest: unknown command: {shell_join(a)}\n".encode())

    @staticmethod
    def _parse_compose(args: list[str]) -> tuple[str, str] | None:
        """(verb, project) for `WORKDIR COMPOSE -p NAME [-f FILE]... stop -t N | start`, else None."""
        if len(args) < 2:
            return None
        rest = args[1:]
        for cmd in COMPOSE_COMMANDS.values():
            if tuple(rest[: len(cmd)]) == cmd:
                rest = rest[len(cmd) :]
                break
        else:
            return None
        if len(rest) < 3 or rest[0] != "-p":
            return None
        name, rest = rest[1], rest[2:]
        while len(rest) >= 2 and rest[0] == "-f":
            rest = rest[2:]
        if rest[:1] == ["start"]:
            return "compose-start", name
        if len(rest) == 3 and rest[:2] == ["stop", "-t"] and rest[2].isdigit():
            return "compose-stop", name
        return None

    # handlers: (argv, stdin, timeout) -> (status, stdout, stderr)

    def _write(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        if self.fail_writes:
            return 1, b"", b"cat: write error: No space left on device\n"
        with self._lock:
            self.files[argv[4]] = bytes(stdin)
            self.writes.append((argv[4], bytes(stdin)))
        return 0, b"", b""

    def _read(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        with self._lock:
            data = self.files.get(argv[4])
        if data is None:
            return 3, b"", b""
        return 0, data[: int(argv[5])], b""

    def _remove(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        with self._lock:
            self.files.pop(argv[4], None)
        return 0, b"", b""

    def _detect(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        return 0, f"{self.compose}\n".encode(), b""

    @staticmethod
    def _render(fmt: str, values: Callable[[str, str | None], str | None]) -> str | None:
        """A Go template with only {{.Field}} / {{.Label "x"}} tokens; None for an unknown token."""
        out, pos = [], 0
        for m in _TOKEN.finditer(fmt):
            v = values(m.group(1), m.group(2))
            if v is None:
                return None
            out += [fmt[pos : m.start()], v]
            pos = m.end()
        return "".join(out) + fmt[pos:]

    def _ps_project(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        """`docker ps --filter label=com.docker.compose.project=NAME --filter status=running`: service labels."""
        name = argv[3].partition("=")[2].partition("=")[2]
        with self._lock:
            p = self.projects.get(name)
            services = [c.service for c in p.containers.values() if c.running and not c.restarting] if p else []
        return 0, "".join(f"{s}\n" for s in services).encode(), b""

    def _ps(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        if self.docker_down:
            return 1, b"", (b"Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                            b"Is the docker daemon running?\n")
        lines = []
        with self._lock:
            for p in self.projects.values():
                for c in p.containers.values():
                    # status=running (not with -a): docker leaves out restarting ones
                    if argv[2] != "-a" and (not c.running or c.restarting):
                        continue
                    labels = {
                        "com.docker.compose.project": p.name,
                        "com.docker.compose.project.working_dir": p.workdir,
                        "com.docker.compose.project.config_files": ",".join(p.files),
                        "com.docker.compose.service": c.service,
                    }

                    def value(field_: str, arg: str | None, c: FakeContainer = c,
                              labels: dict[str, str] = labels) -> str | None:
                        if field_ == ".ID" and arg is None:
                            return c.id
                        if field_ == ".Label" and arg is not None:
                            return labels.get(arg, "")
                        return None

                    line = self._render(argv[-1], value)
                    if line is None:
                        return 1, b"", f"template: unknown field in {argv[-1]!r}\n".encode()
                    lines.append(line)
        lines += self.extra_ps_lines
        return 0, "".join(line + "\n" for line in lines).encode(), b""

    def _inspect(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        out, err, status = [], [], 0
        with self._lock:
            for cid in argv[4:]:
                found = self._container(cid)
                if found is None:
                    err.append(f"Error: No such object: {cid}")
                    status = 1
                    continue
                c = found[1]
                fields = {
                    ".Id": c.id,
                    ".State.Running": "true" if c.running else "false",
                    ".State.Restarting": "true" if c.restarting else "false",
                    ".State.ExitCode": str(c.exit_code),
                }

                def value(field_: str, arg: str | None, fields: dict[str, str] = fields) -> str | None:
                    return fields.get(field_) if arg is None else None

                line = self._render(argv[3], value)
                if line is None:
                    return 1, b"", f"template: unknown field in {argv[3]!r}\n".encode()
                out.append(line)
        return status, "".join(x + "\n" for x in out).encode(), "".join(x + "\n" for x in err).encode()

    def _stop_container(self, p: FakeProject, c: FakeContainer) -> None:
        if c.running:
            c.running, c.restarting = False, False
            c.exit_code = compose_mod.KILLED if p.stubborn else 0

    def _start_container(self, p: FakeProject, c: FakeContainer) -> None:
        c.running, c.exit_code = True, 0
        c.restarting = p.restart_loop

    def _compose(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        verb, name = self._parse_compose(argv[4:]) or ("", "")
        cmd = tuple(argv[5 : 5 + len(COMPOSE_COMMANDS.get(self.compose, ("?",)))])
        if COMPOSE_COMMANDS.get(self.compose) != cmd:
            return 127, b"", f"sh: 1: {' '.join(cmd)}: not found\n".encode()
        p = self.projects.get(name)
        if p is not None and p.compose_broken:
            return 1, b"", f"open {p.files[0] if p.files else p.workdir}: no such file or directory\n".encode()
        if verb == "compose-stop":
            if p is None:
                return 0, b"", b""
            if p.stop_hangs:
                if self.hang_sleeps:
                    time.sleep(timeout)
                raise CommandTimeout(f"no answer within {timeout:.1f} s", command=shell_join(argv))
            with self._lock:
                self._active_stops += 1
                self.max_parallel_stops = max(self.max_parallel_stops, self._active_stops)
            try:
                if self.stop_delay:
                    time.sleep(self.stop_delay)
                with self._lock:
                    for c in p.containers.values():
                        self._stop_container(p, c)
            finally:
                with self._lock:
                    self._active_stops -= 1
            return 0, b"", b"".join(f" Container {name}-{c.service}-1  Stopped\n".encode()
                                    for c in p.containers.values())
        # compose start [SERVICE...]: like docker compose, starts the existing containers of the
        # services named, or of every service when none is named
        if p is None or not p.containers:
            return 1, b"", b"no containers to start\n"
        if p.start_fails:
            return 1, b"", (b"Error response from daemon: driver failed programming external connectivity: "
                            b"port is already allocated\n")
        services = set(argv[argv.index("start") + 1 :])
        with self._lock:
            for c in p.containers.values():
                if not c.running and (not services or c.service in services):
                    self._start_container(p, c)
        return 0, b"", b""

    def _docker_stop(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        out, err, status = [], [], 0
        with self._lock:
            for cid in argv[4:]:
                found = self._container(cid)
                if found is None:
                    err.append(f"Error response from daemon: No such container: {cid}")
                    status = 1
                    continue
                self._stop_container(*found)
                out.append(cid)
        return status, "".join(x + "\n" for x in out).encode(), "".join(x + "\n" for x in err).encode()

    def _docker_start(self, argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        out, err, status = [], [], 0
        with self._lock:
            for cid in argv[2:]:
                found = self._container(cid)
                if found is None:
                    err.append(f"Error response from daemon: No such container: {cid}")
                    status = 1
                    continue
                p, c = found
                if p.start_fails:
                    err.append(f"Error response from daemon: failed to start container {cid[:12]}")
                    status = 1
                    continue
                self._start_container(p, c)
                out.append(cid)
        return status, "".join(x + "\n" for x in out).encode(), "".join(x + "\n" for x in err).encode()


class FakeTransport(Transport):
    """A Transport whose commands run in a FakeGuest."""

    name = "fake"

    def __init__(self, guest: FakeGuest, target: str = "fake guest") -> None:
        super().__init__(target)
        self.guest = guest
        self.closed = 0
        with guest._lock:
            guest.transports_opened += 1

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        assert timeout > 0, f"a command was sent with timeout {timeout}"
        return self.guest.execute(argv, stdin, timeout)

    def close(self) -> None:
        self.closed += 1


def transport_factory(guests: dict[int, FakeGuest]) -> Callable[[object], FakeTransport]:
    """A stand-in for vzdump_hook.guest.session.open_transport: one FakeTransport per call, on the
    FakeGuest of the guest config's vmid."""

    def open_transport(guest_cfg: object) -> FakeTransport:
        vmid = guest_cfg.vmid  # type: ignore[attr-defined]
        return FakeTransport(guests[vmid], f"fake {vmid}")

    return open_transport
