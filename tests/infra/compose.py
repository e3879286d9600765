"""Real docker compose projects for integration tests, built from the local images of
``scripts/setup-test-host.sh`` (``vzdh/busybox:test``, ``vzdh/postgres:15``); no registry, no bridge.

A project lives in a directory named like the project (``vzdh-t-<pid>-<n>-<name>``), so ``docker
compose`` (v2) and ``docker-compose`` (v1) run in that directory without ``-p`` agree on its name, as
a hook that finds projects by their ``com.docker.compose.project.working_dir`` label will do.

Service kinds:
  ``sleeper``   busybox sh that exits 0 promptly on SIGTERM (a clean stop)
  ``stubborn``  ignores SIGTERM: ``stop -t N`` ends in SIGKILL, exit code 137
  ``postgres``  PostgreSQL 15, data in ``<project>/<svc>-data``, unix socket in ``<project>/<svc>-sock``,
                ``stop_signal: SIGINT`` (fast shutdown)
All services have ``restart: unless-stopped`` and ``network_mode: none``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.infra.guest import _pid_alive

__all__ = [
    "BUSYBOX_IMAGE",
    "POSTGRES_IMAGE",
    "PROJECT_PREFIX",
    "ComposeError",
    "ComposeProject",
    "cleanup_all",
    "compose_cmd",
    "container_exit_codes",
    "container_states",
    "down",
    "logs",
    "make_project",
    "pg_cluster_state",
    "psql",
    "running_services",
    "start",
    "stop",
    "up",
    "wait_pg_ready",
]

BUSYBOX_IMAGE = "vzdh/busybox:test"
POSTGRES_IMAGE = "vzdh/postgres:15"
PROJECT_PREFIX = "vzdh-t-"
PG_BIN = "/usr/lib/postgresql/15/bin"
LABEL_PROJECT = "com.docker.compose.project"
LABEL_SERVICE = "com.docker.compose.service"
Kind = Literal["sleeper", "stubborn", "postgres"]
ComposeVersion = Literal["v1", "v2"]
_counter = itertools.count()
_TEMP_PREFIX = "vzdh-c"
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
_SLEEPER_CMD = ["sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $$!; done"]
_STUBBORN_CMD = ["sh", "-c", "trap '' TERM INT; while :; do sleep 1; done"]


class ComposeError(RuntimeError):
    """A docker / compose command failed; the message has the command and its stderr tail."""


@dataclass(frozen=True)
class ComposeProject:
    """A compose project on disk: its name, directory, file, CLI flavour and service kinds."""

    name: str
    workdir: Path
    compose: ComposeVersion
    services: Mapping[str, str]
    temp_parent: Path | None = None  # the temp dir make_project created to hold workdir

    @property
    def file(self) -> Path:
        """The docker-compose.yml."""
        return self.workdir / "docker-compose.yml"

    @property
    def cli(self) -> list[str]:
        """argv prefix of the compose CLI: ``docker compose`` (v2) or ``docker-compose`` (v1)."""
        return ["docker", "compose"] if self.compose == "v2" else ["docker-compose"]

    def shell_command(self, *args: str) -> str:
        """A shell command line that runs the compose CLI with args in the project dir (for SSH)."""
        import shlex

        return f"cd {shlex.quote(str(self.workdir))} && " + shlex.join([*self.cli, *args])

    def postgres_service(self, service: str | None = None) -> str:
        """Name of the postgres service (the only one when service is None)."""
        pgs = [s for s, k in self.services.items() if k == "postgres"]
        if service is not None:
            if service not in pgs:
                raise ValueError(f"{service!r} is not a postgres service of {self.name}")
            return service
        if len(pgs) != 1:
            raise ValueError(f"{self.name} has {len(pgs)} postgres services; name one")
        return pgs[0]

    def socket_dir(self, service: str | None = None) -> Path:
        """Host directory with the postgres service's unix socket."""
        return self.workdir / f"{self.postgres_service(service)}-sock"

    def data_dir(self, service: str | None = None) -> Path:
        """Host directory with the postgres service's PGDATA."""
        return self.workdir / f"{self.postgres_service(service)}-data"


# ---------------------------------------------------------------------------------------- files


def _service_definition(service: str, kind: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "restart": "unless-stopped",
        "network_mode": "none",
        "labels": {"vzdh.test.kind": kind},
    }
    if kind == "sleeper":
        return {"image": BUSYBOX_IMAGE, "command": _SLEEPER_CMD, **common}
    if kind == "stubborn":
        return {"image": BUSYBOX_IMAGE, "command": _STUBBORN_CMD, **common}
    if kind == "postgres":
        return {
            "image": POSTGRES_IMAGE,
            **common,
            "stop_signal": "SIGINT",
            "stop_grace_period": "30s",
            "environment": {"PGDATA": "/var/lib/postgresql/data", "PGSOCKETDIR": "/run/postgresql"},
            "volumes": [f"./{service}-data:/var/lib/postgresql/data", f"./{service}-sock:/run/postgresql"],
        }
    raise ValueError(f"unknown service kind {kind!r} (sleeper, stubborn, postgres)")


def _yaml(value: Any, indent: int = 0) -> str:
    """Render dicts/lists/scalars as block YAML; scalars as JSON (valid YAML flow scalars)."""
    pad = "  " * indent
    if isinstance(value, Mapping):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            key = str(k)
            if not _PLAIN_KEY.match(key) or key.lower() in _YAML_WORDS:
                key = json.dumps(key)
            if isinstance(v, (Mapping, list)) and v:
                out.append(f"{pad}{key}:\n{_yaml(v, indent + 1)}")
            else:
                out.append(f"{pad}{key}: {_yaml(v).strip()}\n")
        return "".join(out)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        out = []
        for v in value:
            if isinstance(v, (Mapping, list)) and v:
                body = _yaml(v, indent + 1)
                out.append(f"{pad}- {body.lstrip()}")
            else:
                out.append(f"{pad}- {_yaml(v).strip()}\n")
        return "".join(out)
    return pad + json.dumps(value) + "\n"


def _sanitize(name: str) -> str:
    clean = re.sub(r"[^a-z0-9_-]", "", name.lower().replace(" ", "-"))
    return clean or "p"


def make_project(name: str, services: Mapping[str, str | Mapping[str, Any]],
                 compose: ComposeVersion = "v2", workdir: str | Path | None = None) -> ComposeProject:
    """Write a compose project ``vzdh-t-<pid>-<n>-<name>`` into a new directory of that name.

    services maps a service name to a kind (``sleeper``/``stubborn``/``postgres``) or to a dict with
    a ``kind`` key plus compose keys that override the defaults (e.g. ``depends_on``).
    The directory is created under workdir (default: a new temp dir under /tmp, short enough for
    the postgres socket path). Raises ValueError for an unknown kind or too long a socket path.
    """
    if compose not in ("v1", "v2"):
        raise ValueError(f"compose must be 'v1' or 'v2', not {compose!r}")
    project = f"{PROJECT_PREFIX}{os.getpid()}-{next(_counter)}-{_sanitize(name)}"
    if workdir is not None:
        parent, temp_parent = Path(workdir), None
    else:
        parent = temp_parent = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir="/tmp"))
    root = parent / project
    kinds: dict[str, str] = {}
    definitions: dict[str, Any] = {}
    for svc, spec in services.items():
        if isinstance(spec, str):
            kind, extra = spec, {}
        else:
            extra = dict(spec)
            kind = str(extra.pop("kind"))
        definition = _service_definition(svc, kind)
        definition.update(extra)
        definitions[svc] = definition
        kinds[svc] = kind
        if kind == "postgres":
            sock = root / f"{svc}-sock" / ".s.PGSQL.5432"
            if len(str(sock)) > _MAX_SOCKET_PATH:
                raise ValueError(f"socket path too long for a unix socket: {sock}")
    root.mkdir(parents=True)
    for svc, kind in kinds.items():
        if kind == "postgres":
            (root / f"{svc}-data").mkdir()
            (root / f"{svc}-sock").mkdir()
    doc: dict[str, Any] = {}
    if compose == "v1":
        doc["version"] = "2.4"
    doc["services"] = definitions
    (root / "docker-compose.yml").write_text(
        f"# written by tests/infra/compose.py for compose {compose}\n" + _yaml(doc))
    return ComposeProject(name=project, workdir=root, compose=compose, services=kinds,
                          temp_parent=temp_parent)


# ---------------------------------------------------------------------------------------- commands


def _docker(args: list[str], *, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return _exec(["docker", *args], timeout=timeout, check=check)


def _exec(argv: list[str], *, cwd: Path | None = None, timeout: float = 60.0,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ComposeError(f"timed out after {timeout} s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise ComposeError(f"{' '.join(argv)} -> exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc


def compose_cmd(project: ComposeProject, *args: str, timeout: float = 120.0,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the project's compose CLI with args in its directory, on the host."""
    return _exec([*project.cli, *args], cwd=project.workdir, timeout=timeout, check=check)


def up(project: ComposeProject, timeout: float = 120.0) -> None:
    """``up -d`` the project (does not wait for postgres: see wait_pg_ready)."""
    compose_cmd(project, "up", "-d", timeout=timeout)


def stop(project: ComposeProject, *services: str, stop_timeout: int | None = None) -> None:
    """``stop`` (optionally ``-t stop_timeout``) the project or some of its services."""
    args = ["stop"] + (["-t", str(stop_timeout)] if stop_timeout is not None else []) + list(services)
    compose_cmd(project, *args)


def start(project: ComposeProject, *services: str) -> None:
    """``start`` the project or some of its services."""
    compose_cmd(project, "start", *services)


def _container_ids(project_name: str, all_: bool = True) -> list[str]:
    args = ["ps", "-q", "--no-trunc", "--filter", f"label={LABEL_PROJECT}={project_name}"]
    return _docker(args + (["-a"] if all_ else [])).stdout.split()


def down(project: ComposeProject, remove_dir: bool = False) -> None:
    """Kill and remove the project's containers, then ``down -v`` for networks and volumes; with
    remove_dir also delete its directory (and the temp dir make_project made for it)."""
    ids = _container_ids(project.name)
    if ids:
        _docker(["rm", "-f", "-v", *ids], check=False)
    if project.workdir.exists():
        compose_cmd(project, "down", "-v", "--remove-orphans", "-t", "0", check=False)
    if remove_dir:
        shutil.rmtree(project.temp_parent or project.workdir, ignore_errors=True)


def _inspect(project: ComposeProject) -> list[dict[str, Any]]:
    ids = _container_ids(project.name)
    if not ids:
        return []
    data: list[dict[str, Any]] = json.loads(_docker(["inspect", *ids]).stdout)
    return data


def container_states(project: ComposeProject) -> dict[str, str]:
    """Service name -> container state (``running``, ``exited``, ``restarting`` ...)."""
    return {c["Config"]["Labels"][LABEL_SERVICE]: c["State"]["Status"] for c in _inspect(project)}


def running_services(project: ComposeProject) -> set[str]:
    """Names of the project's services whose container is running."""
    return {s for s, state in container_states(project).items() if state == "running"}


def container_exit_codes(project: ComposeProject) -> dict[str, int]:
    """Service name -> exit code of its container (0 for one still running or never stopped)."""
    return {c["Config"]["Labels"][LABEL_SERVICE]: int(c["State"]["ExitCode"]) for c in _inspect(project)}


def logs(project: ComposeProject, service: str) -> str:
    """The container log (stdout and stderr) of a service."""
    ids = [c["Id"] for c in _inspect(project) if c["Config"]["Labels"][LABEL_SERVICE] == service]
    if not ids:
        raise ComposeError(f"{project.name}: no container for service {service!r}")
    proc = _docker(["logs", ids[0]])
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------- postgres


def wait_pg_ready(project: ComposeProject, timeout: float = 30.0, service: str | None = None) -> None:
    """Wait until the postgres service accepts connections on its socket; raise TimeoutError."""
    sock = str(project.socket_dir(service))
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", sock, "-U", "postgres", "-t", "1"],
                              stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{project.name}: postgres not ready on {sock} after {timeout} s")
        time.sleep(0.1)


def psql(project: ComposeProject, sql: str, service: str | None = None, timeout: float = 30.0,
         database: str = "postgres") -> str:
    """Run sql with the host's psql over the service's unix socket; return its unaligned output."""
    argv = [f"{PG_BIN}/psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", str(project.socket_dir(service)), "-U", "postgres", "-d", database, "-c", sql]
    return _exec(argv, timeout=timeout).stdout.strip()


def pg_cluster_state(project: ComposeProject, service: str | None = None) -> str:
    """``Database cluster state`` from pg_controldata (e.g. ``shut down``, ``in production``)."""
    out = _exec([f"{PG_BIN}/pg_controldata", str(project.data_dir(service))]).stdout
    for line in out.splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    raise ComposeError(f"no cluster state in pg_controldata output for {project.data_dir(service)}")


# ---------------------------------------------------------------------------------------- cleanup


def cleanup_all(only_stale: bool = False) -> list[str]:
    """Force-remove the containers, networks and volumes of every ``vzdh-t-*`` project, and the
    ``/tmp/vzdh-c<pid>-*`` dirs of other processes; with only_stale, only those whose creating process
    (``vzdh-t-<pid>-...``) is gone. Returns the project names cleaned."""
    out = _docker(["ps", "-a", "--no-trunc", "--filter", f"label={LABEL_PROJECT}",
                   "--format", '{{.ID}} {{.Label "' + LABEL_PROJECT + '"}}'], check=False).stdout
    by_project: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith(PROJECT_PREFIX):
            by_project.setdefault(parts[1], []).append(parts[0])

    def wanted(name: str) -> bool:
        if not name.startswith(PROJECT_PREFIX):
            return False
        if not only_stale:
            return True
        m = re.match(re.escape(PROJECT_PREFIX) + r"(\d+)-", name)
        return m is None or not _pid_alive(int(m.group(1)))

    for path in Path("/tmp").glob(f"{_TEMP_PREFIX}*-*"):
        m = re.match(re.escape(_TEMP_PREFIX) + r"(\d+)-", path.name)
        if m and path.is_dir() and (not only_stale or not _pid_alive(int(m.group(1)))):
            if int(m.group(1)) != os.getpid():
                shutil.rmtree(path, ignore_errors=True)
    cleaned = [p for p in by_project if wanted(p)]
    ids = [i for p in cleaned for i in by_project[p]]
    if ids:
        _docker(["rm", "-f", "-v", *ids], check=False)
    for kind in ("network", "volume"):
        names = _docker([kind, "ls", "-q", "--filter", f"label={LABEL_PROJECT}"], check=False).stdout.split()
        for n in names:
            fmt = '{{index .Labels "' + LABEL_PROJECT + '"}}'
            proj = _docker([kind, "inspect", "-f", fmt, n], check=False).stdout.strip()
            if wanted(proj):
                _docker([kind, "rm", n], check=False)
                if proj not in cleaned:
                    cleaned.append(proj)
    return cleaned
