"""Compose projects inside the test VM (its own Docker engine), written as tests/infra/compose.py
writes them and driven over ssh. A project's ``workdir`` is its directory in the VM
(``/srv/vzdh/<project>``); PostgreSQL's socket and data are under it, read with the VM's own client."""

from __future__ import annotations

import json
import shlex
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.infra import compose
from tests.infra.compose import ComposeProject
from tests.infra.vm import TestVm, VmError

__all__ = ["make", "pg_cluster_state", "psql", "remove", "running_services", "up", "wait_pg_ready"]

ROOT = "/srv/vzdh"
PG_BIN = "/usr/lib/postgresql/15/bin"

def make(vm: TestVm, name: str, services: Mapping[str, str | Mapping[str, Any]]) -> ComposeProject:
    """Write the project on the host (compose.make_project), copy it to ROOT in the VM. Out: the
    project with its VM directory as ``workdir``. Raises VmError."""
    with tempfile.TemporaryDirectory(prefix="vzdh-vmc.") as tmp:
        p = compose.make_project(name, services, workdir=tmp)
        tar = subprocess.run(["tar", "-C", tmp, "-c", p.name], capture_output=True, check=True).stdout
        r = subprocess.run(vm.ssh_argv(f"mkdir -p {ROOT} && tar -C {ROOT} -x"), input=tar, capture_output=True,
                           timeout=60)
        if r.returncode != 0:
            raise VmError(f"copy {p.name} into the VM: {r.stderr.decode(errors='replace')}")
    return ComposeProject(name=p.name, workdir=Path(ROOT) / p.name, compose=p.compose, services=p.services)

def up(vm: TestVm, p: ComposeProject) -> None:
    vm.ok(p.shell_command("up", "-d"), timeout=300)

def container_states(vm: TestVm, p: ComposeProject) -> dict[str, str]:
    """service -> state of its container in the VM."""
    out = vm.ok(f"ids=$(docker ps -aq --filter label={compose.LABEL_PROJECT}={shlex.quote(p.name)}); "
                "[ -z \"$ids\" ] && echo '[]' || docker inspect $ids")
    return {c["Config"]["Labels"][compose.LABEL_SERVICE]: c["State"]["Status"] for c in json.loads(out)}

def started_at(vm: TestVm, p: ComposeProject) -> dict[str, float]:
    """service -> when its container last started, by the VM's clock (epoch seconds)."""
    out = vm.ok(f"docker inspect -f '{{{{index .Config.Labels \"{compose.LABEL_SERVICE}\"}}}} "
                f"{{{{.State.StartedAt}}}}' "
                f"$(docker ps -aq --filter label={compose.LABEL_PROJECT}={shlex.quote(p.name)})")
    result = {}
    for line in out.splitlines():
        service, stamp = line.split()
        result[service] = float(vm.ok(f"date -d {shlex.quote(stamp)} +%s.%N"))
    return result


def running_services(vm: TestVm, p: ComposeProject) -> set[str]:
    return {s for s, st in container_states(vm, p).items() if st == "running"}

def wait_pg_ready(vm: TestVm, p: ComposeProject, timeout: float = 120) -> None:
    """Raises VmError when PostgreSQL does not accept connections within timeout seconds."""
    sock = shlex.quote(str(p.socket_dir()))
    vm.ok(f"for i in $(seq {int(timeout * 5)}); do {PG_BIN}/pg_isready -q -h {sock} -U postgres -t 1 && exit 0; "
          "sleep 0.2; done; exit 1", timeout=timeout + 30)

def psql(vm: TestVm, p: ComposeProject, sql: str) -> str:
    """sql through the VM's psql on the service's socket. Out: unaligned output. Raises VmError."""
    argv = [f"{PG_BIN}/psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", str(p.socket_dir()), "-U", "postgres", "-c", sql]
    return vm.ok(shlex.join(argv)).strip()

def pg_cluster_state(data_dir: Path) -> str:
    """``Database cluster state`` of a PGDATA on the host (e.g. a mounted copy of the VM's disk)."""
    out = subprocess.run([f"{PG_BIN}/pg_controldata", str(data_dir)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    raise VmError(f"no cluster state for {data_dir}")

def remove(vm: TestVm, p: ComposeProject) -> None:
    """Remove the project's containers and directory in the VM (best effort)."""
    vm.ssh(f"{p.shell_command('down', '-v', '-t', '0')}; rm -rf {shlex.quote(str(p.workdir))}", timeout=120)

