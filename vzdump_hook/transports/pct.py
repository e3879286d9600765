"""pct transport (LXC): commands run in the container through `pct exec VMID -- ...` on the node.

Needs no network and no credentials: the hook runs as root on the node that backs the container up.
File content goes through stdin, so the marker is written with the same atomic script as over SSH.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ConnectError, GuestFrozen
from .base import Transport, display
from .local import run_local

if TYPE_CHECKING:
    from ..config import GuestConfig

# pct sets PATH=/sbin:/bin:/usr/sbin:/usr/bin for lxc-attach; /usr/local (docker-compose v1) is added
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# Where a container's freezer state is. PVE names its cgroup lxc/VMID with the processes in lxc/VMID/ns
# (pve-container's PVE/LXC.pm: lxc.cgroup.dir.container, .inner); PVE::LXC::freeze freezes through lxc's
# command socket on cgroup v2 and writes the ns cgroup's freezer on v1. LXC's own default is
# lxc.payload.NAME (the test tier's containers are named by their VMID). Either level may be the one frozen.
CGROUP_DIRS = ("lxc/{vmid}/ns", "lxc/{vmid}", "lxc.payload.{vmid}")


def frozen(vmid: int) -> bool:
    """The container is frozen, or being frozen (vzdump's suspend mode, snapshot_create): a command
    sent into it would block until the thaw. False when no freezer file says so."""
    for d in CGROUP_DIRS:
        for path, states in ((f"/sys/fs/cgroup/{d}/cgroup.freeze", ("1",)),
                             (f"/sys/fs/cgroup/freezer/{d}/freezer.state", ("FROZEN", "FREEZING"))):
            try:
                with open(path.format(vmid=vmid)) as f:
                    if f.read().strip() in states:
                        return True
            except OSError:
                continue
    return False


class PctTransport(Transport):
    name = "pct"

    def __init__(self, vmid: int, pct: str = "/usr/sbin/pct") -> None:
        super().__init__(f"pct {vmid}")
        self.vmid = vmid
        self.pct = pct

    @classmethod
    def for_guest(cls, guest: GuestConfig) -> PctTransport:
        return cls(guest.vmid, guest.pct.path if guest.pct is not None else "/usr/sbin/pct")

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [self.pct, "exec", str(self.vmid), "--", "/usr/bin/env", f"PATH={GUEST_PATH}", *argv]

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        # never a command into a frozen CT: it would hang until the thaw (and hold the guest's lock)
        if frozen(self.vmid):
            raise GuestFrozen(f"{self.target}: the container is frozen (cgroup freezer): "
                              "nothing is sent into it until it is thawed", command=display(argv))
        return run_local(self.argv(argv), stdin, timeout, shown=display(argv), target=self.target)

    def connect(self, timeout: float) -> None:
        """The container runs commands; ConnectError (with pct's message) when it is stopped or absent."""
        r = self.run(["true"], timeout=timeout)
        if not r.ok:
            why = (r.stderr or r.stdout).strip().splitlines()
            raise ConnectError(f"{self.target}: container does not run commands "
                               f"({why[-1] if why else f'exit status {r.exit_status}'})",
                               command=f"pct exec {self.vmid} -- true", exit_status=r.exit_status)
