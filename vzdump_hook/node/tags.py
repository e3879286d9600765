"""Which guests the hook handles: those with a config table, and those opted in by a PVE tag.

A guest tagged `vzdump-hook` (`[hook] tag`) is handled with [defaults] even without a table of its
own, over the transport that needs no per-guest setup: `pct` for containers, `agent` for VMs. A
[guests.VMID] table always wins over the tag (also `enabled = false`). Tags are read from the guest
configs under /etc/pve/nodes/NODE/{lxc,qemu-server}/VMID.conf (a file read, no `pvesh` call: every
vzdump phase pays for this).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..config import TAG_TRANSPORTS, Config, GuestConfig, tagged_guest

_KINDS = {"lxc": "lxc", "qemu-server": "qemu"}
_SPLIT = re.compile(r"[;,\s]+")
MAX_CONF = 1024 * 1024  # a guest config larger than this is not read


@dataclass(frozen=True)
class PveGuest:
    vmid: int
    vmtype: str  # "lxc" | "qemu"
    node: str
    tags: frozenset[str]


@dataclass(frozen=True)
class Member:
    """A guest the hook knows of, whether it handles it (`guest` is None: left alone) and why."""

    vmid: int
    guest: GuestConfig | None
    why: str


def read_tags(path: str) -> frozenset[str]:
    """The tags of a PVE guest config file (its current section, not snapshots); empty if unreadable."""
    for line in _current_section(path):
        if line.startswith("tags:"):
            return frozenset(t.lower() for t in _SPLIT.split(line[5:]) if t)
    return frozenset()


def _current_section(path: str) -> list[str]:
    """The lines of a PVE guest config file before its first [snapshot]/[PENDING] section; [] if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONF)
    except OSError:
        return []
    lines = []
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if line.startswith("["):
            break
        lines.append(line)
    return lines


def agent_enabled(path: str) -> bool:
    """Whether a VM config enables the QEMU guest agent (`agent: 1` or `agent: enabled=1,...`)."""
    for line in _current_section(path):
        if line.startswith("agent:"):
            first = line[6:].strip().split(",")[0]
            return first.removeprefix("enabled=") in ("1", "true", "yes", "on")
    return False


def _nodes(pve_dir: str) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(pve_dir, "nodes")))
    except OSError:
        return []


def find_guest(pve_dir: str, vmid: int) -> PveGuest | None:
    """Guest `vmid` as the cluster config has it (node, type, tags), or None (not a PVE node, no such guest)."""
    for node in _nodes(pve_dir):
        for kind, vmtype in _KINDS.items():
            path = os.path.join(pve_dir, "nodes", node, kind, f"{vmid}.conf")
            if os.path.isfile(path):
                return PveGuest(vmid, vmtype, node, read_tags(path))
    return None


def all_guests(pve_dir: str, node: str | None = None) -> list[PveGuest]:
    """Every guest of the cluster (or of `node`), sorted by VMID."""
    found = []
    for n in _nodes(pve_dir) if node is None else [node]:
        for kind, vmtype in _KINDS.items():
            try:
                names = os.listdir(os.path.join(pve_dir, "nodes", n, kind))
            except OSError:
                continue
            for name in names:
                stem = name.removesuffix(".conf")
                if name.endswith(".conf") and stem.isdigit():
                    found.append(PveGuest(int(stem), vmtype, n,
                                          read_tags(os.path.join(pve_dir, "nodes", n, kind, name))))
    return sorted(found, key=lambda g: g.vmid)


def _tagged(cfg: Config, g: PveGuest) -> Member:
    guest = tagged_guest(cfg, g.vmid, g.vmtype)
    if guest is None:
        return Member(g.vmid, None, f"tagged {cfg.hook.tag}, but [defaults] do not make a valid guest: left alone")
    return Member(g.vmid, guest,
                  f"tag {cfg.hook.tag} ({g.vmtype} on {g.node}): [defaults], transport {TAG_TRANSPORTS[g.vmtype]}")


def guest_config(cfg: Config, vmid: int) -> GuestConfig | None:
    """The settings to handle guest `vmid` with: its config table (if enabled), else the tag's, else None."""
    if vmid in cfg.guests:
        return cfg.guest(vmid)
    if not cfg.hook.tag:
        return None
    g = find_guest(cfg.hook.pve_dir, vmid)
    if g is None or cfg.hook.tag not in g.tags:
        return None
    return _tagged(cfg, g).guest


def members(cfg: Config, node: str | None = None) -> list[Member]:
    """Every guest with a config table, and every tagged guest (of `node`, if given), sorted by VMID."""
    found = {vmid: Member(vmid, g if g.enabled else None,
                          "config table" if g.enabled else "config table with enabled = false: left alone")
             for vmid, g in cfg.guests.items()}
    if cfg.hook.tag:
        for g in all_guests(cfg.hook.pve_dir, node):
            if cfg.hook.tag not in g.tags:
                continue
            if g.vmid in found:
                m = found[g.vmid]
                found[g.vmid] = Member(g.vmid, m.guest, f"{m.why} (wins over its tag {cfg.hook.tag})")
            else:
                found[g.vmid] = _tagged(cfg, g)
    return [found[v] for v in sorted(found)]


def conf_path(pve_dir: str, g: PveGuest) -> str:
    return os.path.join(pve_dir, "nodes", g.node, "qemu-server" if g.vmtype == "qemu" else "lxc", f"{g.vmid}.conf")


def warnings(cfg: Config) -> list[str]:
    """Guests handled over the guest agent whose VM config does not enable it (their stacks would
    never be stopped): `check` and `job-start` say so."""
    out = []
    for m in members(cfg):
        if m.guest is None or m.guest.transport != "agent":
            continue
        g = find_guest(cfg.hook.pve_dir, m.vmid)
        if g is not None and g.vmtype == "qemu" and not agent_enabled(conf_path(cfg.hook.pve_dir, g)):
            out.append(f"{m.vmid}: {m.why}: its VM config has no `agent: 1`, so nothing can be stopped in it: "
                       f"qm set {m.vmid} --agent enabled=1 (then restart the VM), "
                       "and run qemu-guest-agent in the guest")
    return out
