"""What the Docker engine does with a restart policy when the hook stops a container (compose `stop` and
`docker stop` both end in the engine's stop): the container stays down for the whole window, whatever
its policy, while the same policy does restart it after a crash. Checked on the real engine, with a
plain container (`docker run`, no compose labels).

Found here and documented in docs/configuration.md: `docker stop` marks the container as stopped by hand, and the
engine's restart manager leaves such a container alone (`always` brings it back only when dockerd
itself starts again; `unless-stopped` not even then). The same through the hook's `container` kind,
on docker and podman: tests/integration/test_container_kind.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.integration

IMAGE = "vzdh/busybox:test"  # built by scripts/setup-test-host.sh
WINDOW = 3.0  # seconds watched after the stop: the engine's first restart delay is 100 ms, doubling


def docker(*args: str, timeout: float = 60) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"docker {' '.join(args)}: {r.stderr}"
    return r.stdout.strip()


def state(name: str) -> tuple[bool, int, int]:
    """(running, restart count, main pid); running is false while the engine waits to restart it (it says
    Running and Restarting then)."""
    running, restarting, count, pid = docker("inspect", "--format",
                                             "{{.State.Running}} {{.State.Restarting}} {{.RestartCount}} "
                                             "{{.State.Pid}}", name).split()
    return running == "true" and restarting == "false", int(count), int(pid)


@pytest.fixture(params=["always", "unless-stopped", "on-failure"])
def container(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"vzdh-rp-{os.getpid()}-{request.param}"
    docker("run", "-d", "--name", name, "--network", "none", f"--restart={request.param}", IMAGE, "sleep", "3600")
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def test_a_stopped_container_stays_down_for_the_window_though_its_policy_restarts_it_after_a_crash(
        container: str) -> None:
    running, count, pid = state(container)
    assert running and count == 0
    os.kill(pid, 9)  # a crash: the policy applies (on-failure too: exit status 137)
    until = time.monotonic() + 20
    while state(container)[1] == 0:
        assert time.monotonic() < until, "the engine did not restart a crashed container: the policy is not in force"
        time.sleep(0.05)
    until = time.monotonic() + 20
    while not state(container)[0]:
        assert time.monotonic() < until
        time.sleep(0.05)
    docker("stop", "-t", "1", container)
    stopped = time.monotonic()
    while time.monotonic() - stopped < WINDOW:
        running, count, _ = state(container)
        assert not running and count == 1, (f"restarted during the window ({time.monotonic() - stopped:.2f} s "
                                            "after the stop)")
        time.sleep(0.1)
