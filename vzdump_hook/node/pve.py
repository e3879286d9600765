"""Facts about the Proxmox node, read from files (no `qm`/`pct` call: they cost a second each).

Every function answers None when this is not a PVE node (a test machine, the demo): callers then
assume a single node on which every configured guest lives and runs.
"""

from __future__ import annotations

import os


def _is_pve(pve_dir: str) -> bool:
    return os.path.isdir(os.path.join(pve_dir, "nodes"))


def guest_is_local(pve_dir: str, node: str, vmid: int) -> bool | None:
    """Whether guest `vmid` lives on `node` (its config is under /etc/pve/nodes/NODE/)."""
    if not _is_pve(pve_dir):
        return None
    base = os.path.join(pve_dir, "nodes", node)
    return any(os.path.exists(os.path.join(base, kind, f"{vmid}.conf")) for kind in ("qemu-server", "lxc"))


def local_type(pve_dir: str, node: str, vmid: int) -> str | None:
    """"qemu" or "lxc" for a guest that lives on `node`; None when it does not (or not a PVE node)."""
    if not _is_pve(pve_dir):
        return None
    base = os.path.join(pve_dir, "nodes", node)
    for kind, vmtype in (("qemu-server", "qemu"), ("lxc", "lxc")):
        if os.path.exists(os.path.join(base, kind, f"{vmid}.conf")):
            return vmtype
    return None


def guest_running(vmtype: str, vmid: int, pve_dir: str = "/etc/pve",
                  qemu_run_dir: str = "/var/run/qemu-server") -> bool | None:
    """Whether the guest runs: a QEMU process from its pid file (in qemu-server's run directory,
    `[hook] qmp_dir`), or a container's cgroup."""
    if not _is_pve(pve_dir):
        return None
    if vmtype == "qemu":
        try:
            with open(os.path.join(qemu_run_dir, f"{vmid}.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return False
        return os.path.exists(f"/proc/{pid}")
    return any(os.path.isdir(p) for p in (f"/sys/fs/cgroup/lxc/{vmid}", f"/sys/fs/cgroup/lxc.payload.{vmid}"))
