"""Job identity: which vzdump run a phase belongs to, and whether a run is provably over.

All phases of one vzdump job are children of the same worker process, so (node, boot, parent pid,
parent start time) names the job; the start time guards against a recycled pid, the boot id
against a reboot.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

LAUNCHER_ENV = "VZDUMP_HOOK_LAUNCHER"  # set by the sh launcher: the pid of its parent, the vzdump worker


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot, or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[19])


def node_name() -> str:
    """This node's name. Not $HOSTNAME: vzdump sets that to the guest's name."""
    return socket.gethostname().split(".")[0]


@dataclass(frozen=True)
class JobId:
    node: str
    boot: str
    pid: int
    start: int

    @property
    def key(self) -> str:
        return f"{self.pid}-{self.start}"

    def __str__(self) -> str:
        return f"{self.node}/{self.pid}"

    @classmethod
    def current(cls) -> JobId:
        """The job of this process: its parent is the vzdump worker (or the shell of a manual run).
        Started by the launcher (examples/node/vzdump-hook), the worker is the launcher's parent,
        which the launcher passes in $VZDUMP_HOOK_LAUNCHER."""
        ppid = os.getppid()
        launcher = os.environ.get(LAUNCHER_ENV, "")
        if launcher.isdigit() and int(launcher) > 1:
            ppid = int(launcher)
        return cls(node_name(), _boot_id(), ppid, process_start(ppid) or 0)

    def is_over(self) -> bool | None:
        """True when this job's worker is gone (same node only), False when it runs, None when it is
        another node's job (this node cannot tell)."""
        if self.node != node_name():
            return None
        if self.boot != _boot_id():
            return True
        return process_start(self.pid) != self.start

    def directory(self, run_dir: str) -> str:
        """This job's directory under `run_dir` (host records, the residents' files)."""
        return os.path.join(run_dir, "jobs", self.key)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> JobId:
        return cls(str(d["node"]), str(d["boot"]), int(str(d["pid"])), int(str(d["start"])))

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "boot": self.boot, "pid": self.pid, "start": self.start}
