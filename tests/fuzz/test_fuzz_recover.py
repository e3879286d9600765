"""Fuzzing the guest's recovery program (vzdump-hook-recover, dash and busybox sh) with random markers
of the shape the node's key could write: whatever a marker lists, every docker call that starts
something is of a project as docker's labels give it (name, working directory, compose files, its own
containers), with no compose file in the marker's directory; and every container of a container stack
started is one the settings allow, by its id, never a container whose name a marker gives as an id."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.profile import budget
from tests.guest_sh.conftest import RECOVER, SHELLS, Guest, make_guest
from tests.guest_sh.fakedocker import cid

CHANGING = {"start", "stop", "restart", "kill", "rm", "run", "exec", "down", "up", "create"}
# container stacks: db's app by name, web's containers by a label; VICTIM is the NAME (64 hex digits) of a
# container that is neither, which the engine takes for it where no container has that id
CONTAINERS, LABEL = "db-app-1", "com.docker.compose.project=web"
VICTIM = cid("victim-name", 0)
ALLOWED = {cid("db", 0), cid("web", 0)}


def _projects(g: Guest) -> dict[str, dict[str, Any]]:
    mdir = g.marker.parent
    srv = g.root / "srv"
    return {
        "db": {"workdir": f"{srv}/db", "files": [f"{srv}/db/compose.yaml"], "services": ("app", "worker")},
        "web": {"workdir": f"{srv}/web", "files": [f"{srv}/web/compose.yaml", f"{srv}/web/over ride.yaml"],
                "services": ("app",)},
        "other": {"workdir": f"{srv}/other", "files": [f"{srv}/other/compose.yaml"], "services": ("app",)},
        "inmarker": {"workdir": f"{srv}/inmarker", "files": [f"{mdir}/compose.yaml"], "services": ("app",)},
    }


@st.composite
def stacks(draw: st.DrawFn, projects: dict[str, dict[str, Any]], mdir: str) -> dict[str, Any]:
    names = [*projects, "evil", "gone"]
    name = draw(st.sampled_from(names))
    workdirs = [p["workdir"] for p in projects.values()] + ["/tmp/evil", mdir, "/"]
    files = ([f for p in projects.values() for f in p["files"]]
             + ["/tmp/evil/compose.yaml", f"{mdir}/marker.json", "/etc/passwd"])
    ids = [cid(n, i) for n in projects for i in range(2)] + [cid("nope", 0), "ab" * 32, VICTIM]
    real = projects.get(name)
    exact = real is not None and draw(st.integers(0, 3)) > 0  # mostly the stack as docker has it, else anything
    return {
        "name": name,
        "driver": "compose",
        "compose": draw(st.sampled_from([["docker", "compose"], ["docker-compose"]])),
        "workdir": real["workdir"] if exact and real else draw(st.sampled_from(workdirs)),
        "files": list(real["files"]) if exact and real else draw(st.lists(st.sampled_from(files), max_size=3)),
        "containers": [cid(name, i) for i in range(len(real["services"]))] if exact and real and draw(st.booleans())
        else draw(st.lists(st.sampled_from(ids), max_size=3, unique=True)),
        "stopped": True,
        "services": draw(st.lists(st.sampled_from(["app", "worker", "db"]), max_size=2, unique=True)),
    }


@st.composite
def container_stacks(draw: st.DrawFn, projects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    choices = [cid(n, i) for n in projects for i in range(2)] + [cid("nope", 0), VICTIM]
    ids = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3, unique=True))
    return {"name": draw(st.sampled_from(["app", "db", "web"])), "driver": "container",
            "engine": draw(st.sampled_from(["docker", "podman"])), "names": [f"c{i}" for i in range(len(ids))],
            "containers": ids, "stopped": True}


def _marker(stack_list: list[dict[str, Any]]) -> bytes:
    head = {"schema": 1, "tool": "vzdump-hook", "job": {"node": "pve1", "boot": "b", "pid": 1, "start": 2}, "vmid": 101,
            "vmtype": "qemu", "mode": "snapshot", "written_at": 1700000000, "deadline": 1700000600, "state": "stopped",
            "stacks": stack_list}
    return json.dumps(head, indent=1).encode()


def _boot_time() -> float:
    with open("/proc/uptime") as f:
        return time.time() - float(f.read().split()[0])


def check_calls(calls: list[dict[str, Any]], projects: dict[str, dict[str, Any]], mdir: str) -> None:
    """Every starting call is of one project as its labels say; `docker start` only of the project compose
    was last asked to start."""
    current: str | None = None
    for c in calls:
        argv, cwd = c["argv"], c["cwd"]
        if not CHANGING & set(argv):
            continue
        if argv[0] == "docker-compose" or argv[:2] == ["docker", "compose"]:
            rest = argv[1:] if argv[0] == "docker-compose" else argv[2:]
            assert rest[0] == "-p", argv
            name = rest[1]
            files = [rest[i + 1] for i in range(2, len(rest) - 1) if rest[i] == "-f"]
            p = projects[name]
            assert files == p["files"] and cwd in (p["workdir"], "/"), (argv, cwd)
            assert not any(f.startswith(mdir + "/") for f in files), argv
            verb = [w for w in rest[2:] if w not in ("-f", *files)]
            assert verb[0] == "start", argv
            current = name
        elif argv[:2] == ["docker", "start"]:
            assert current is not None, argv
            own = [cid(current, i) for i in range(len(projects[current]["services"]))]
            assert all(any(o.startswith(i) for o in own) for i in argv[2:]), (argv, current)
        elif argv[0] in ("docker", "podman") and argv[1:3] == ["container", "start"]:
            assert len(argv) == 4 and argv[3] in ALLOWED, argv  # an allowed container, by its id
        else:
            raise AssertionError(f"unexpected changing call {argv}")


@pytest.mark.parametrize("shell", SHELLS)
def test_recovery_starts_nothing_outside_the_validated_project(shell: str, tmp_path_factory: pytest.TempPathFactory,
                                                               busybox_bin: Path) -> None:
    g = make_guest(shell, tmp_path_factory.mktemp(f"recover-{shell}"), busybox_bin)
    projects = _projects(g)
    for p in projects.values():
        Path(p["workdir"]).mkdir(parents=True)
    g.write_conf(MARKER=str(g.marker), VMID="101", DEADLINE_GRACE="0", WAIT_DOCKER="1", CONTAINERS=CONTAINERS,
                 CONTAINER_LABELS=LABEL)
    mdir = str(g.marker.parent)
    outcomes: dict[int, int] = {}

    db = projects["db"]
    as_written = {"name": "db", "driver": "compose", "compose": ["docker", "compose"], "workdir": db["workdir"],
                  "files": db["files"], "containers": [cid("db", 0), cid("db", 1)], "stopped": True,
                  "services": ["app", "worker"]}

    victim = {"name": "app", "driver": "container", "engine": "docker", "names": ["c0", "c1"],
              "containers": [cid("db", 0), VICTIM], "stopped": True}

    @budget(10)
    @example([as_written])  # (a control: a marker that is used)
    @example([victim])  # issue 20: a container's name given as an id
    @given(st.lists(stacks(projects, mdir) | container_stacks(projects), min_size=1, max_size=3))
    def nothing_else(stack_list: list[dict[str, Any]]) -> None:
        g.docker.save({"projects": {}})
        for name, spec in projects.items():
            g.docker.add_project(name, spec["services"], workdir=spec["workdir"], files=spec["files"], running=False)
        g.docker.add_project("victim", ("app",), names=(VICTIM,), running=False)
        g.docker.log.write_text("")
        g.marker.write_bytes(_marker(stack_list))
        g.marker.chmod(0o600)
        before = _boot_time() - 600
        os.utime(g.marker, (before, before))
        p = g.run(RECOVER, "--conf", str(g.conf))
        outcomes[p.returncode] = outcomes.get(p.returncode, 0) + 1
        assert p.returncode in (0, 1, 2), p
        check_calls(g.docker.calls(), projects, mdir)

    nothing_else()
    assert outcomes.get(2, 0) >= 2 and outcomes.get(0, 0) + outcomes.get(1, 0) >= 1, outcomes  # (a control)
