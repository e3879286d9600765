"""The systemd units of examples/guest/ and examples/node/, checked by systemd itself
(`systemd-analyze verify` in a scratch root holding the units, the programs they run and the
distribution's units they refer to)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = {
    "vzdump-hook-recover.service": REPO / "examples" / "guest" / "vzdump-hook-recover.service",
    "vzdump-hook-recover.timer": REPO / "examples" / "guest" / "vzdump-hook-recover.timer",
    "vzdump-hook-boot-recover.service": REPO / "examples" / "node" / "vzdump-hook-boot-recover.service",
}


def unit_values(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(f"{key}=")]


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, src in UNITS.items():
        shutil.copy(src, root / "etc/systemd/system" / name)
        for cmd in unit_values(src, "ExecStart"):
            exe = root / shlex.split(cmd)[0].lstrip("/")
            exe.parent.mkdir(parents=True, exist_ok=True)
            exe.write_text("#!/bin/sh\n")
            exe.chmod(0o755)
    return root


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_accepts_the_unit(name: str, scratch_root: Path) -> None:
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={scratch_root}",
                        str(scratch_root / "etc/systemd/system" / name)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stdout + p.stderr


def test_what_the_units_run() -> None:
    guest_svc, timer, node = (UNITS["vzdump-hook-recover.service"], UNITS["vzdump-hook-recover.timer"],
                              UNITS["vzdump-hook-boot-recover.service"])
    assert unit_values(guest_svc, "ExecStart") == ["/usr/local/sbin/vzdump-hook-recover --quiet"]
    assert unit_values(guest_svc, "Type") == ["oneshot"] and unit_values(guest_svc, "WantedBy") == ["multi-user.target"]
    assert "docker.service" in unit_values(guest_svc, "After")[0]
    assert unit_values(timer, "OnUnitInactiveSec") == ["1min"] and unit_values(timer, "WantedBy") == ["timers.target"]
    # the node: once at boot, before the scheduler can start a new backup job
    assert unit_values(node, "ExecStart") == ["/usr/local/bin/vzdump-hook recover --all"]
    assert unit_values(node, "Before") == ["pvescheduler.service"] and unit_values(node, "Type") == ["oneshot"]
