"""The ledger of outstanding markers: which guests may hold a marker, so that job-start asks only those.

A node adds an entry for a guest *before* it writes that guest's marker, and removes it only once
the marker is known to be gone. So a marker without an entry cannot come from this version of the
hook; an entry without a marker (a crash between the two writes, a guest that recovered itself)
costs one extra contact at the next job-start, which then removes it.

On a PVE node the ledger lives on the cluster file system (`[hook] pve_dir`/priv/vzdump-hook/ledger,
root-only), so that the node a guest lives on now sees entries written by a node that died;
elsewhere under `[hook] state_dir`/ledger. pmxcfs has atomic rename but no hard links, so:

- every file is written under a temporary name and renamed into place;
- an entry is never rewritten: each write creates a new file `VMID.WRITER.json`, and a removal
  deletes only files the remover read before it contacted the guest. Two nodes working on the ledger
  at once cannot lose each other's entries; at worst a stale entry survives (an extra contact).

`known-NODE.json` lists the guests whose markers the ledger covers, written by NODE alone. A guest
in no node's list (upgrade from a version without the ledger, a new ledger location, an entry that
could not be written) is "unknown": job-start asks it once, then it is known.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import HookSettings
from ..errors import HookError
from . import safefile
from .job import JobId

log = logging.getLogger(__name__)

QUIESCE = "quiesce"  # written right before the marker
FOUND = "found"  # a sweep saw a marker it left (or could not ask): no marker write follows it
INCOMPLETE_FILE = "ledger-incomplete"  # in the local state_dir: an entry could not be written


class LedgerError(HookError):
    """The ledger could not be written."""


def ledger_dir(settings: HookSettings) -> str:
    """`[hook] ledger_dir`, else the cluster file system on a PVE node, else under state_dir."""
    if settings.ledger_dir:
        return settings.ledger_dir
    if os.path.isdir(os.path.join(settings.pve_dir, "nodes")):
        return os.path.join(settings.pve_dir, "priv", "vzdump-hook", "ledger")
    return os.path.join(settings.state_dir, "ledger")


@dataclass(frozen=True)
class Entry:
    """One ledger file. `settles_at`: wall time after which the writer's phase is surely over (its
    marker write done or never to happen)."""

    vmid: int
    name: str  # the file name
    kind: str = FOUND
    vmtype: str = ""
    job: JobId | None = None
    written_at: float = 0.0
    settles_at: float = 0.0
    guest_table: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def settled(self, job: JobId) -> bool:
        """Whether removing this entry after finding no marker is safe for `job` (which holds the
        guest's lock): no marker write of its writer can still follow."""
        if self.kind != QUIESCE or self.job == job:
            return True
        if self.job is not None and self.job.is_over() is True:
            return True
        return time.time() > self.settles_at

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.written_at)) if self.written_at else "?"
        who = f"job {self.job}" if self.job is not None else "unreadable entry"
        return f"{self.kind} by {who} at {when}"


def _atomic_write(path: str, text: str) -> None:
    """Write `text` to `path` by rename from a temporary name (no hard link: pmxcfs has none)."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")  # no predictable name, no link followed
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Ledger:
    """The ledger under `directory`, used by `node`; `state_dir` keeps the local "incomplete" flag."""

    def __init__(self, directory: str, node: str, state_dir: str, settle: float) -> None:
        self.dir = directory
        self.node = node
        self.state_dir = state_dir
        self.settle = settle  # seconds after a write by which its phase is over

    @classmethod
    def for_settings(cls, settings: HookSettings, node: str, settle: float) -> Ledger:
        return cls(ledger_dir(settings), node, settings.state_dir, settle)

    # -- entries -------------------------------------------------------------------------------

    def entries(self) -> dict[int, list[Entry]]:
        """Every entry, by VMID. An unreadable file still counts: its guest is asked."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise LedgerError(f"ledger {self.dir} unreadable: {e}") from None
        out: dict[int, list[Entry]] = {}
        for name in sorted(names):
            vmid = _vmid_of(name)
            if vmid is not None:
                entry = self._read(vmid, name)
                if entry is not None:
                    out.setdefault(vmid, []).append(entry)
        return out

    def of(self, vmid: int) -> list[Entry]:
        """The entries of guest `vmid`."""
        return self.entries().get(vmid, [])

    def _read(self, vmid: int, name: str) -> Entry | None:
        try:
            with open(os.path.join(self.dir, name)) as f:
                d = json.load(f)
            j = d["job"]
            job = JobId(str(j["node"]), str(j["boot"]), int(j["pid"]), int(j["start"])) if j else None
            return Entry(vmid, name, str(d["kind"]), str(d.get("vmtype", "")), job, float(d["written_at"]),
                         float(d["settles_at"]), dict(d.get("guest", {})))
        except FileNotFoundError:
            return None  # removed since the listing
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return Entry(vmid, name)

    def add(self, vmid: int, kind: str, job: JobId | None, guest_table: Mapping[str, Any], vmtype: str = "") -> Entry:
        """A new entry for guest `vmid`. Raises LedgerError."""
        now = time.time()
        name = f"{vmid}.{self.node}-{os.getpid()}-{time.time_ns()}.json"
        entry = Entry(vmid, name, kind, vmtype, job, now, now + self.settle, dict(guest_table))
        data = {"vmid": vmid, "kind": kind, "vmtype": vmtype, "job": job.to_dict() if job else None,
                "written_at": now, "settles_at": entry.settles_at, "guest": dict(guest_table)}
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            _atomic_write(os.path.join(self.dir, name), json.dumps(data))
        except OSError as err:
            raise LedgerError(f"ledger {self.dir}: entry for {vmid} not written: {err}") from None
        return entry

    def clear(self, seen: Iterable[Entry], job: JobId) -> list[Entry]:
        """Remove the entries in `seen` (read before the guest was found without a marker) that are
        settled for `job`. Returns those kept. Never raises: a kept entry costs one more contact."""
        kept = []
        for e in seen:
            if not e.settled(job):
                kept.append(e)
                continue
            try:
                os.unlink(os.path.join(self.dir, e.name))
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("ledger %s: entry %s not removed (%s): its guest is asked once more", self.dir, e.name, err)
                kept.append(e)
        return kept

    # -- which guests the ledger covers ---------------------------------------------------------

    def _known_path(self, node: str) -> str:
        return os.path.join(self.dir, f"known-{node}.json")

    def _uncovered(self) -> set[int]:
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            with open(os.path.join(self.state_dir, INCOMPLETE_FILE)) as f:
                return {int(v) for v in json.load(f)}
        return set()

    def known(self) -> set[int]:
        """Guests whose markers the ledger covers: in any node's list, and not among those this node
        could not write an entry for (the local "incomplete" list)."""
        out: set[int] = set()
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name.startswith("known-") and name.endswith(".json"):
                    with contextlib.suppress(OSError, ValueError, TypeError):
                        with open(os.path.join(self.dir, name)) as f:
                            out.update(int(v) for v in json.load(f))
        return out - self._uncovered()

    def mark_known(self, vmids: Iterable[int]) -> None:
        """Add `vmids` (asked, and any marker found has an entry) to this node's list. Raises LedgerError."""
        new = set(vmids)
        path = self._known_path(self.node)
        have: set[int] = set()
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(path) as f:
                have = {int(v) for v in json.load(f)}
        try:
            if not new <= have:
                os.makedirs(self.dir, mode=0o700, exist_ok=True)
                _atomic_write(path, json.dumps(sorted(have | new)))
            uncovered = self._uncovered()
            if uncovered & new:
                _atomic_write(os.path.join(self.state_dir, INCOMPLETE_FILE), json.dumps(sorted(uncovered - new)))
        except OSError as err:
            raise LedgerError(f"ledger {self.dir}: known guests not written: {err}") from None

    def mark_uncovered(self, vmid: int) -> None:
        """No entry could be written for `vmid`: it is unknown until a job-start has asked it. Kept
        locally (state_dir): the ledger itself may be what failed. Raises OSError."""
        safefile.private_dir(self.state_dir)
        _atomic_write(os.path.join(self.state_dir, INCOMPLETE_FILE), json.dumps(sorted(self._uncovered() | {vmid})))


def _vmid_of(name: str) -> int | None:
    head, _, rest = name.partition(".")
    return int(head) if head.isdigit() and rest.endswith(".json") else None
