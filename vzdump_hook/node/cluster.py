"""Which nodes of a cluster have the hook, read from the cluster file system alone (no SSH between
nodes): every node writes what it runs to /etc/pve/nodes/NODE/vzdump-hook.json at each `job-start`
and `check`; `check --cluster` reads them all. A node that never wrote one has not run the hook since
it was installed, or does not have it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

FILE = "vzdump-hook.json"
STALE = 8 * 86400.0  # a report older than this may no longer be true


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("vzdump-hook")
    except PackageNotFoundError:
        return "unknown"


def vzdump_script(path: str = "/etc/vzdump.conf") -> str | None:
    """The hook script this node's vzdump.conf names, or None."""
    from ..admin.enable import script_lines

    try:
        with open(path) as f:
            found = script_lines(f.read().splitlines())
    except OSError:
        return None
    return found[0][1] if found else None


def report(pve_dir: str, node: str, vzdump_conf: str = "/etc/vzdump.conf", version: str | None = None) -> None:
    """Write this node's report (only on a PVE node: its directory under nodes/ exists). Raises OSError."""
    d = os.path.join(pve_dir, "nodes", node)
    if not os.path.isdir(d):
        return
    data = {"version": version or installed_version(), "script": vzdump_script(vzdump_conf), "at": round(time.time())}
    path = os.path.join(d, FILE)
    try:
        with open(path) as f:
            old = json.load(f)
        if ({k: old.get(k) for k in ("version", "script")} == {k: data[k] for k in ("version", "script")}
                and time.time() - old.get("at", 0) < STALE / 4):
            return  # unchanged and recent: no write to the cluster file system
    except (OSError, ValueError, AttributeError):
        pass
    from .state import write_atomic

    write_atomic(path, json.dumps(data))  # the cluster file system renames atomically (no hard links)


@dataclass(frozen=True)
class NodeState:
    node: str
    version: str | None  # None: no report
    script: str | None
    at: float | None

    def problem(self, mine: str, now: float) -> str | None:
        if self.version is None:
            return "no report: vzdump-hook not installed, or it has not run a job or `check` since"
        if self.version != mine:
            return f"runs vzdump-hook {self.version}, this node {mine}"
        if self.at is not None and now - self.at > STALE:
            return f"last report {int((now - self.at) // 86400)} days old"
        return None


def nodes(pve_dir: str) -> list[NodeState]:
    """Every node under pve_dir/nodes/ with its report."""
    try:
        names = sorted(os.listdir(os.path.join(pve_dir, "nodes")))
    except OSError:
        return []
    out = []
    for n in names:
        try:
            with open(os.path.join(pve_dir, "nodes", n, FILE)) as f:
                d = json.load(f)
            out.append(NodeState(n, str(d["version"]), d.get("script"), float(d["at"])))
        except (OSError, ValueError, KeyError, TypeError):
            out.append(NodeState(n, None, None, None))
    return out
