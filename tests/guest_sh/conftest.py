"""Fixtures for the guest-side sh programs (examples/guest/): each test runs once under dash and once
under busybox sh. The busybox run gets a PATH of busybox applets only (plus the stand-in docker), so its
awk, sed, date, stat ... are busybox's too, as in a small guest without coreutils."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest_sh.fakedocker import FakeDocker

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "examples" / "guest"
RECOVER = GUEST_DIR / "vzdump-hook-recover"
WRAPPER = GUEST_DIR / "vzdump-hook-wrapper"
SHELLS = ("dash", "busybox")


@pytest.fixture(scope="session")
def busybox_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with one symlink per busybox applet."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not installed: run scripts/setup-test-host.sh")
    d = tmp_path_factory.mktemp("busybox-bin")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        (d / a).symlink_to(busybox)
    return d


@dataclass
class Guest:
    """A guest-side run environment: a shell, a stand-in docker, a settings file, a marker path."""

    shell: str
    sh: list[str]
    root: Path
    docker: FakeDocker
    path: str
    conf: Path
    marker: Path

    def argv(self, program: Path, *args: str) -> list[str]:
        return [*self.sh, str(program), *args]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": self.path, "HOME": str(self.root), "TMPDIR": str(self.root / "tmp"), **self.docker.env}
        env.update(extra or {})
        return env

    def run(self, program: Path, *args: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(program, *args), env=self.env(env), input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=timeout, cwd=str(self.root))

    def write_conf(self, **values: str) -> None:
        lines = ["# test settings"] + [f"{k}={v}" for k, v in values.items()]
        self.conf.write_text("\n".join(lines) + "\n")


def make_guest(shell: str, root: Path, busybox_bin: Path) -> Guest:
    if shutil.which(shell if shell == "dash" else "busybox") is None:
        pytest.skip(f"{shell} not installed: run scripts/setup-test-host.sh")
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    fake = FakeDocker.install(root, root / "fakebin")
    if shell == "dash":
        sh, path = ["dash"], f"{fake.bin_dir}:/usr/bin:/bin"
    else:
        sh, path = [str(busybox_bin / "sh")], f"{fake.bin_dir}:{busybox_bin}"
    g = Guest(shell, sh, root, fake, path, root / "guest.conf", root / "var" / "lib" / "vzdump-hook" / "marker.json")
    g.marker.parent.mkdir(parents=True)
    g.marker.parent.chmod(0o700)  # as the guest install makes it: root's, 0700
    return g


@pytest.fixture(params=SHELLS)
def guest(request: pytest.FixtureRequest, tmp_path: Path, busybox_bin: Path) -> Guest:
    return make_guest(str(request.param), tmp_path, busybox_bin)


def no_changing_calls(argvs: Sequence[Sequence[str]]) -> bool:
    """True when none of the recorded docker calls starts or stops anything."""
    for a in argvs:
        words = set(a)
        if words & {"start", "stop", "restart", "kill", "rm", "run", "exec", "down", "up"}:
            return False
    return True


__all__ = ["GUEST_DIR", "Guest", "RECOVER", "SHELLS", "WRAPPER", "make_guest", "no_changing_calls"]
