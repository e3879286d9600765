"""What a guest has of the guest side, looked at over its Transport: each file current, outdated,
missing or unknown (its sha256 against what shipped.py says it should be), the recovery timer's state,
whether the key in use is restricted to the wrapper, and whether the marker's directory is the SSH
user's alone. Through a restricted key the wrapper's `status` verb answers; else a shell looks. The
`check` line (`describe`), and what `vzdump-hook guest install` (install.py) starts from.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import HookError
from ..text import escape
from ..transports.base import sh
from .shipped import FILES, RECOVERY_FILES, InstallError, Layout, desired

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..transports.base import Transport

TIMEOUT = 60.0  # seconds for one command in the guest

# Prints, per path, its sha256 (or missing/unknown), then the timer's state ($1: check systemd or not),
# then whether the marker's directory ($2) is this user's alone, as the wrapper's `status` does.
_HASH_SCRIPT = r"""
systemd=$1 mdir=$2; shift 2
for f; do
  if [ ! -f "$f" ]; then echo missing
  elif command -v sha256sum >/dev/null 2>&1; then sha256sum < "$f" | cut -d ' ' -f 1
  else echo unknown; fi
done
if [ "$systemd" != yes ]; then echo "timer not-checked"
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  echo "timer $(systemctl is-enabled vzdump-hook-recover.timer 2>/dev/null || echo disabled) $(systemctl is-active vzdump-hook-recover.timer 2>/dev/null)"
else echo "timer no-systemd"; fi
if [ -L "$mdir" ]; then echo "marker-dir INSECURE: $mdir is a symlink"
elif [ ! -d "$mdir" ]; then echo "marker-dir missing"
else
  s=$(stat -c '%u %a' -- "$mdir" 2>/dev/null)
  if [ "${s% *}" != "$(id -u)" ]; then echo "marker-dir INSECURE: $mdir is owned by uid ${s% *}, not by uid $(id -u)"
  else case ${s#* } in *00) echo "marker-dir ok" ;; *) echo "marker-dir INSECURE: $mdir has mode ${s#* }: others than its owner may use it" ;; esac
  fi
fi
"""  # noqa: E501


@dataclass(frozen=True)
class Setup:
    """What a guest has: per file current/outdated/missing/unknown, whether the key in use is restricted."""

    files: dict[str, str] = field(default_factory=dict)
    restricted: bool | None = None
    timer: str = "unknown"
    error: str = ""
    marker_dir: str = "unknown"  # ok, missing (made at the first backup), INSECURE: why

    def _state(self, keys: tuple[str, ...]) -> str:
        states = [self.files.get(k, "unknown") for k in keys]
        if all(s == "current" for s in states):
            return "current"
        if all(s == "missing" for s in states):
            return "NOT INSTALLED"
        if "unknown" in states and not any(s in ("outdated", "missing") for s in states):
            return "unknown"
        bad = [os.path.basename(next(f.path for f in FILES if f.key == k))
               for k, s in zip(keys, states, strict=True) if s != "current"]
        return f"OUTDATED ({', '.join(bad)})"

    @property
    def recovery(self) -> str:
        return self._state(RECOVERY_FILES)

    @property
    def wrapper(self) -> str:
        return self._state(("wrapper",))

    @property
    def timer_ok(self) -> bool:
        t = self.timer
        return t.startswith("enabled") and t.endswith("active") and not t.endswith("inactive")

    @property
    def complete(self) -> bool:
        return (self.recovery == "current" and self.wrapper == "current"
                and (self.timer_ok or self.timer in ("not-checked", "no-systemd")))

    def line(self, vmid: int, transport: str = "ssh") -> str:
        """One line for `check`."""
        if self.error:
            return f"guest side: unknown ({self.error})"
        timer = {"not-checked": "", "no-systemd": ", no systemd: run it at boot and every minute by other means"}.get(
            self.timer, "" if self.timer_ok else f", timer NOT ACTIVE ({self.timer})")
        rec = f"recovery {self.recovery}{timer if self.recovery != 'NOT INSTALLED' else ''}"
        if transport != "ssh":
            key = f"no SSH key to restrict (transport {transport})"
        elif self.restricted:
            key = f"node key restricted to the wrapper ({self.wrapper})"
        elif self.restricted is False:
            key = "node key NOT restricted (it may run any command)"
        else:
            key = "node key: unknown"
        todo = ""
        if not self.complete or (self.restricted is False and transport == "ssh"):
            todo = f": `vzdump-hook guest install {vmid}`" + (
                " with an unrestricted key (--identity-file)" if self.restricted else "")
        mdir = (f"; marker directory {self.marker_dir} (make it the SSH user's, mode 0700)"
                if self.marker_dir.startswith("INSECURE") else "")
        return f"guest side: {rec}; {key}{mdir}{todo}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _marker_dir(text: str) -> str:
    return next((escape(ln[len("marker-dir ") :].strip()) for ln in text.splitlines() if ln.startswith("marker-dir ")),
                "unknown")


def _parse_status(text: str) -> tuple[dict[str, str], bool | None, str]:
    shas: dict[str, str] = {}
    restricted: bool | None = None
    timer = "unknown"
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if parts[0] == "restricted" and len(parts) == 2:
            restricted = parts[1] == "yes"
        elif parts[0] == "file" and len(parts) == 3:
            shas[parts[1]] = parts[2].strip()
        elif parts[0] == "timer":
            timer = line[len("timer ") :].strip()
    return shas, restricted, timer


def _compare(shas: dict[str, str], want: dict[str, bytes]) -> dict[str, str]:
    out = {}
    for key, data in want.items():
        got = shas.get(key, "unknown")
        out[key] = "current" if got == _sha(data) else got if got in ("missing", "unknown") else "outdated"
    return out


def inspect(t: Transport, guest: GuestConfig, layout: Layout, deadline: float) -> Setup:
    """What the guest has. Asks the wrapper first (the only way through a restricted key), else looks
    at the files with a shell. Raises HookError when the guest does not answer."""
    want = desired(guest, layout)
    left = max(0.1, min(TIMEOUT, deadline - time.monotonic()))
    r = t.run([layout.path("wrapper"), "status", layout.path("conf")], timeout=left)
    if r.ok:
        shas, restricted, timer = _parse_status(r.stdout)
        if restricted:
            return Setup(_compare(shas, want), True, timer, marker_dir=_marker_dir(r.stdout))
    elif "vzdump-hook-wrapper: refused" in r.stderr:
        return Setup({}, True, "unknown", "the wrapper does not know `status` (an older version?)")
    paths = [layout.path(f.key) for f in FILES]
    mdir = posixpath.dirname(guest.marker_path)
    r = t.run(sh(_HASH_SCRIPT, "yes" if layout.systemd else "no", mdir, *paths),
              timeout=max(0.1, min(TIMEOUT, deadline - time.monotonic())))
    if not r.ok:
        raise InstallError(f"cannot look at the guest's files: {(r.stderr or r.stdout).strip()[-200:]}")
    lines = r.stdout.splitlines()
    shas = {f.key: line.strip() for f, line in zip(FILES, lines, strict=False)}
    timer = next((ln[len("timer ") :].strip() for ln in lines if ln.startswith("timer ")), "unknown")
    return Setup(_compare(shas, want), False, timer, marker_dir=_marker_dir(r.stdout))


def describe(t: Transport, guest: GuestConfig, deadline: float) -> str:
    """The `check` line for this guest's guest side; never raises."""
    try:
        return inspect(t, guest, Layout.from_env(), deadline).line(guest.vmid, guest.transport)
    except (HookError, OSError) as e:
        return f"guest side: unknown ({e})"
