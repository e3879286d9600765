"""pytest fixtures for integration tests with real peers (load with
``pytest_plugins = ["tests.infra.fixtures"]``).

- ``guest_factory`` (session): ``make() -> TestGuest``; all guests closed at session end.
- ``test_guest``: a fresh TestGuest (sshd in its own netns) per test.
- ``docker_engine`` (session): a working Docker engine with compose v1 and v2 and the local images.
- ``compose_project``: ``make(name, services, compose="v2") -> ComposeProject``; taken down after the test.

Fixtures skip (with the reason) only where the machine cannot run them: not root, no ``ip netns``,
no Docker engine or images (then the fix is ``scripts/setup-test-host.sh``). Anything else fails.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose as compose_mod
from tests.infra import engine
from tests.infra.compose import BUSYBOX_IMAGE, POSTGRES_IMAGE, ComposeProject, ComposeVersion
from tests.infra.guest import TestGuest, cleanup_stale, guest_support_problem

__all__ = ["DockerEngine", "compose_project", "docker_engine", "engine_turn", "guest_factory", "test_guest"]

SETUP_HINT = "run scripts/setup-test-host.sh as root"
GuestFactory = Callable[..., TestGuest]
ProjectFactory = Callable[..., ComposeProject]


@dataclass(frozen=True)
class DockerEngine:
    """Versions of what docker_engine checked."""

    server_version: str
    compose_v2_version: str
    compose_v1_version: str


def _out(argv: list[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, (proc.stdout.strip() or proc.stderr.strip())


@pytest.fixture(scope="session")
def guest_factory() -> Iterator[GuestFactory]:
    """Session-wide factory of TestGuest; skips when this machine cannot host one."""
    problem = guest_support_problem()
    if problem:
        pytest.skip(f"test guest unavailable: {problem}")
    cleanup_stale()
    made: list[TestGuest] = []

    def make(**kwargs: Any) -> TestGuest:
        guest = TestGuest(**kwargs)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.close()


@pytest.fixture
def test_guest(guest_factory: GuestFactory) -> Iterator[TestGuest]:
    """A fresh guest (sshd in a netns) for one test, closed afterwards."""
    guest = guest_factory()
    yield guest
    guest.close()


@pytest.fixture(scope="session")
def docker_engine() -> DockerEngine:
    """Check the Docker engine, compose v1 and v2 and the vzdh images; skip with the fix if not."""
    if shutil.which("docker") is None:
        pytest.skip(f"docker CLI not found: {SETUP_HINT}")
    rc, server = _out(["docker", "info", "--format", "{{.ServerVersion}}"])
    if rc != 0:
        pytest.skip(f"'docker info' fails ({server[-200:]}): {SETUP_HINT}")
    rc, v2 = _out(["docker", "compose", "version", "--short"])
    if rc != 0:
        pytest.skip(f"'docker compose version' fails ({v2[-200:]}): {SETUP_HINT}")
    rc, v1 = _out(["docker-compose", "version", "--short"])
    if rc != 0:
        pytest.skip(f"'docker-compose version' fails ({v1[-200:]}): {SETUP_HINT}")
    for image in (BUSYBOX_IMAGE, POSTGRES_IMAGE):
        rc, _ = _out(["docker", "image", "inspect", "-f", "{{.Id}}", image])
        if rc != 0:
            pytest.skip(f"docker image {image} missing: {SETUP_HINT}")
    compose_mod.cleanup_all(only_stale=True)
    return DockerEngine(server_version=server, compose_v2_version=v2, compose_v1_version=v1)


@pytest.fixture(autouse=True)
def engine_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test's turn on the shared Docker engine (tests/infra/engine.py): alone for a test marked
    ``engine_alone``, shared for one with compose projects, none for the rest. Autouse: taken before the
    test's other fixtures make anything, given back after they took it down."""
    alone = request.node.get_closest_marker("engine_alone") is not None
    if not alone and "compose_project" not in request.fixturenames:
        yield
        return
    with engine.turn(exclusive=alone):
        yield


@pytest.fixture
def compose_project(docker_engine: DockerEngine) -> Iterator[ProjectFactory]:
    """Factory ``make(name, services, compose="v2", workdir=None) -> ComposeProject``; every
    project made is taken down (containers, volumes) and its directory removed after the test."""
    made: list[ComposeProject] = []

    def make(name: str, services: Mapping[str, str | Mapping[str, Any]],
             compose: ComposeVersion = "v2", workdir: str | Path | None = None) -> ComposeProject:
        project = compose_mod.make_project(name, services, compose=compose, workdir=workdir)
        made.append(project)
        return project

    yield make
    for project in made:
        compose_mod.down(project, remove_dir=True)
