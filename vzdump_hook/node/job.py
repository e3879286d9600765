"""Job identity: which vzdump run a phase belongs to, and whether a run is provably over.

All phases of one vzdump job are children of the same worker process, so (node, boot, parent pid,
parent start time) names the job; the start time guards against a recycled pid, the boot id
against a reboot.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..resident.client import LAUNCHER_ENV, job_key, process_start, worker_pid

__all__ = ["LAUNCHER_ENV", "JobId", "node_name", "process_start"]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


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
        return job_key(self.pid, self.start)

    def __str__(self) -> str:
        return f"{self.node}/{self.pid}"

    @classmethod
    def current(cls) -> JobId:
        """The job of this process: its parent is the vzdump worker (or the shell of a manual run).
        Started by the launcher (examples/node/vzdump-hook), the worker is the launcher's parent,
        which the launcher passes in $VZDUMP_HOOK_LAUNCHER."""
        ppid = worker_pid()
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
