"""Helpers for tests that run the installed `vzdump-hook` against a real test guest."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.infra import compose, engine
from tests.infra.compose import ComposeProject
from tests.infra.guest import TestGuest


def installed_hook() -> str:
    """The console script installed next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name("vzdump-hook")
    if here.exists():
        return str(here)
    found = shutil.which("vzdump-hook")
    if found is None:
        raise RuntimeError("vzdump-hook is not installed: run scripts/venv.sh (pip install -e .)")
    return found


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


@dataclass
class HookSetup:
    """A config for one or more test guests plus the env vars a test run needs."""

    tmp: Path
    guests: dict[int, TestGuest] = field(default_factory=dict)
    hook_table: dict[str, Any] = field(default_factory=dict)
    markers: dict[int, Path] = field(default_factory=dict)  # marker paths set by a guest's table

    @property
    def config(self) -> Path:
        return self.tmp / "config.toml"

    @property
    def env(self) -> dict[str, str]:
        # the one deviation from vzdump's environment: where the config and state live in a test
        return {
            "VZDUMP_HOOK_CONFIG": str(self.config),
            "VZDUMP_HOOK_RUN_DIR": str(self.tmp / "run"),
            "VZDUMP_HOOK_STATE_DIR": str(self.tmp / "state"),
        }

    def marker_path(self, vmid: int) -> Path:
        return self.markers.get(vmid, self.guests[vmid].workdir / "marker.json")

    def write(self, guests: Mapping[int, tuple[TestGuest, Mapping[str, Any]]]) -> Path:
        lines = []
        if self.hook_table:
            lines.append("[hook]")
            lines += [f"{k} = {toml_value(v)}" for k, v in self.hook_table.items()]
        for vmid, (g, table) in guests.items():
            # "auto" stops every compose project on the engine the test guest reaches: the host's, which the
            # other workers of a parallel run share (tests/infra/engine.py)
            if table.get("stacks", "auto") == "auto" and not engine.held_alone():
                raise AssertionError(f"guest {vmid} stops every compose project on the shared Docker engine "
                                     "(stacks = \"auto\"): mark the test @pytest.mark.engine_alone")
            self.guests[vmid] = g
            lines.append(f"[guests.{vmid}]")
            ssh = {"host": g.host, "port": g.port, "user": g.user, "identity_file": g.identity_file,
                   "known_hosts": g.known_hosts_file, "connect_timeout": 5}
            ssh.update(table.get("ssh", {}))
            lines.append(f"ssh = {toml_value(ssh)}")
            if "marker_path" in table:
                self.markers[vmid] = Path(table["marker_path"])
            lines.append(f"marker_path = {toml_value(str(self.marker_path(vmid)))}")
            for k, v in table.items():
                if k not in ("ssh", "marker_path"):
                    lines.append(f"{k} = {toml_value(v)}")
        self.config.write_text("\n".join(lines) + "\n")
        return self.config


def running(projects: Sequence[ComposeProject]) -> dict[str, bool]:
    """project name -> every service of it runs."""
    return {p.name: compose.running_services(p) == set(p.services) for p in projects}


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
