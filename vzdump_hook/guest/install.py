"""The guest side of vzdump-hook (examples/guest/): deploy it over a guest's Transport, and tell whether
it is in place and current.

Deployed: the recovery program and its systemd service and timer (start what a marker lists after a
reboot or past its deadline, even if the node never comes back), the `command=` wrapper the node's SSH
key is restricted to, and the settings both read (/etc/vzdump-hook/guest.conf: marker path, VMID).
Installing is idempotent: a file is written only when its content or mode differs, and `dry_run`
shows the differences instead. The node's key is restricted last, after the wrapper was seen to work
in the guest, and checked over a new connection afterwards.

Through a restricted key the files can be checked (the wrapper's `status` verb) but not changed.

This module deploys (`Installer`); the files shipped and where they go are in shipped.py, the look at
what a guest has in installed.py, the node key's authorized_keys line in node_key.py. Their public
names are importable from here too.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import HookError
from ..transports import open_transport
from ..transports.base import sh
from .installed import TIMEOUT, Setup, inspect
from .installed import describe as describe  # re-exported: the names callers import from here
from .node_key import AUTHORIZED_KEYS, node_public_key, restricted_keys
from .shipped import FILES, InstallError, Layout, desired
from .shipped import GUEST_FILES_ENV as GUEST_FILES_ENV
from .shipped import GUEST_ROOT_ENV as GUEST_ROOT_ENV
from .shipped import conf_text as conf_text
from .shipped import guest_files_dir as guest_files_dir
from .shipped import shipped_dirs as shipped_dirs

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..transports.base import Transport

MAX_FILE = 1024 * 1024


# Prints, per path, its mode in octal, or "missing".
_MODES_SCRIPT = r"""
for f; do
  if [ -f "$f" ]; then stat -c %a -- "$f" 2>/dev/null || echo unknown; else echo missing; fi
done
"""

# Writes stdin to $1 atomically with mode $2; with $3 = keep, an existing file keeps owner and mode.
_PUT_SCRIPT = r"""
set -eu
dir=$(dirname -- "$1")
[ -d "$dir" ] || mkdir -p -m 0755 -- "$dir"
tmp="$1.vzdump-hook.$$"
trap 'rm -f -- "$tmp"' EXIT
if [ "${3:-}" = keep ] && [ -e "$1" ]; then cp -p -- "$1" "$tmp"; cat > "$tmp"
else (umask 077; cat > "$tmp"); chmod "$2" "$tmp"; fi
sync -- "$tmp" 2>/dev/null || sync
mv -f -- "$tmp" "$1"
trap - EXIT
"""

# Resolves the authorized_keys path ($1; relative: in $HOME) and prints it, then the file (if any).
_READ_KEYS_SCRIPT = r"""
case $1 in /*) p=$1 ;; *) p=$HOME/$1 ;; esac
if [ -e "$p" ]; then echo "present $p"; head -c 1048577 -- "$p"; else echo "missing $p"; fi
"""

# Makes the directory of the authorized_keys file (0700, as sshd's StrictModes wants it).
_KEYS_DIR_SCRIPT = r"""
d=$(dirname -- "$1"); [ -d "$d" ] || mkdir -p -m 0700 -- "$d"
"""

# The wrapper run as sshd would run it, before the node's key is restricted to it ($1 wrapper, $2 conf).
_SELFTEST_SCRIPT = r"""
SSH_ORIGINAL_COMMAND=true "$1" --conf "$2" || exit 1
SSH_ORIGINAL_COMMAND="vzdump-hook-wrapper status" "$1" --conf "$2"
"""

_SYSTEMD_SCRIPT = r"""
if ! [ -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; then echo no-systemd; exit 0; fi
systemctl daemon-reload
systemctl enable vzdump-hook-recover.service >/dev/null 2>&1
systemctl enable --now vzdump-hook-recover.timer >/dev/null 2>&1
echo "$(systemctl is-enabled vzdump-hook-recover.timer 2>/dev/null) $(systemctl is-active vzdump-hook-recover.timer 2>/dev/null)"
"""  # noqa: E501


def _diff(old: bytes | None, new: bytes, path: str, limit: int = 40) -> list[str]:
    try:
        a = (old or b"").decode().splitlines()
        b = new.decode().splitlines()
    except UnicodeDecodeError:
        return ["    (binary content differs)"]
    lines = list(difflib.unified_diff(a, b, fromfile=f"{path} (guest)" if old is not None else "/dev/null",
                                      tofile=f"{path} (new)", lineterm="", n=1))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    return ["    " + ln for ln in lines]


@dataclass
class Installer:
    """One `vzdump-hook guest install` run. `say` gets every output line."""

    guest: GuestConfig
    layout: Layout
    say: Callable[[str], None]
    dry_run: bool = False
    restrict: bool = True
    authorized_keys: str = AUTHORIZED_KEYS
    identity_file: str | None = None  # connect with this key instead of the node's (which may be restricted)
    opener: Callable[[GuestConfig], Transport] = open_transport
    changed: list[str] = field(default_factory=list)

    def _connect_as(self) -> GuestConfig:
        if self.identity_file and self.guest.ssh is not None:
            return replace(self.guest, ssh=replace(self.guest.ssh, identity_file=self.identity_file))
        return self.guest

    def run(self) -> bool:
        """Install (or with dry_run, show); True when the guest side is complete afterwards."""
        deadline = time.monotonic() + 5 * TIMEOUT
        want = desired(self.guest, self.layout)
        t = self.opener(self._connect_as())
        try:
            t.connect(TIMEOUT)
            setup = inspect(t, self.guest, self.layout, deadline)
            if setup.restricted:
                if setup.complete:
                    self.say(f"{self.guest.vmid}: everything current; the key used is restricted to the wrapper: "
                             "nothing to do")
                    return True
                raise InstallError(
                    f"{self.guest.vmid}: the key used is restricted to the wrapper ({setup.line(self.guest.vmid)}); "
                    "files cannot be changed through it: run again with --identity-file KEY (a key with a shell in "
                    "the guest), or over pct/agent")
            self._files(t, want)
            self._systemd(t, setup)
            if self.restrict:
                self._restrict(t)
        finally:
            t.close()
        return True

    def _files(self, t: Transport, want: dict[str, bytes]) -> None:
        paths = [self.layout.path(f.key) for f in FILES]
        r = t.run(sh(_MODES_SCRIPT, *paths), timeout=TIMEOUT).check("cannot look at the guest's files")
        modes = r.stdout.split()
        verb = "would " if self.dry_run else ""
        for f, path, mode in zip(FILES, paths, modes, strict=True):
            old = None if mode == "missing" else t.read_file(path, limit=MAX_FILE, timeout=TIMEOUT)
            new = want[f.key]
            if old == new and mode == f"{f.mode:o}":
                self.say(f"  {path}: unchanged")
                continue
            if old is None:
                self.say(f"  {path}: {verb}create (mode {f.mode:04o})")
            elif old == new:
                self.say(f"  {path}: {verb}set mode {f.mode:04o} (was {mode})")
            else:
                self.say(f"  {path}: {verb}update")
                if self.dry_run:
                    for line in _diff(old, new, path):
                        self.say(line)
            self.changed.append(path)
            if not self.dry_run:
                t.run(sh(_PUT_SCRIPT, path, f"{f.mode:04o}"), stdin=new, timeout=TIMEOUT).check(
                    f"cannot write {path}")

    def _systemd(self, t: Transport, setup: Setup) -> None:
        if not self.layout.systemd:
            self.say(f"  systemd: not used (installed under {self.layout.root})")
            return
        if not self.changed and setup.timer_ok:
            self.say(f"  systemd: timer {setup.timer}: unchanged")
            return
        if self.dry_run:
            self.say("  systemd: would reload, enable vzdump-hook-recover.service, enable and start "
                     "vzdump-hook-recover.timer")
            return
        out = t.run(sh(_SYSTEMD_SCRIPT), timeout=TIMEOUT).check("systemctl failed").stdout.strip()
        if out == "no-systemd":
            self.say("  systemd: not running in the guest: run /usr/local/sbin/vzdump-hook-recover at boot and every "
                     "minute (e.g. cron `* * * * * /usr/local/sbin/vzdump-hook-recover --quiet`, and from the boot "
                     "scripts)")
        else:
            self.say(f"  systemd: vzdump-hook-recover.service enabled, timer {out}")

    def _restrict(self, t: Transport) -> None:
        if self.guest.transport != "ssh" or self.guest.ssh is None:
            self.say(f"  node key: transport {self.guest.transport} uses no SSH key: nothing to restrict")
            return
        key_type, blob = node_public_key(self.guest)
        r = t.run(sh(_READ_KEYS_SCRIPT, self.authorized_keys), timeout=TIMEOUT).check(
            "cannot read authorized_keys")
        head, _, body = r.stdout.partition("\n")
        state, _, path = head.partition(" ")
        old = body if state == "present" else ""
        new = restricted_keys(old, key_type, blob, self.layout.wrapper_command)
        if new == old:
            self.say(f"  {path}: node key already restricted to the wrapper: unchanged")
            return
        self.say(f"  {path}: {'would restrict' if self.dry_run else 'restricting'} the node's key ({key_type}) "
                 f"to {self.layout.wrapper_command}")
        if self.dry_run:
            for line in _diff(old.encode() if state == "present" else None, new.encode(), path):
                self.say(line)
            return
        # never lock the node out: the wrapper must answer as sshd will run it before the key is bound to it
        test = t.run(sh(_SELFTEST_SCRIPT, self.layout.path("wrapper"), self.layout.path("conf")), timeout=TIMEOUT)
        if not test.ok or "restricted yes" not in test.stdout:
            raise InstallError("the wrapper does not work in the guest, the key is left unrestricted: "
                               f"{(test.stderr or test.stdout).strip()[-300:]}")
        t.run(sh(_KEYS_DIR_SCRIPT, path), timeout=TIMEOUT).check(f"cannot make the directory of {path}")
        t.run(sh(_PUT_SCRIPT, path, "0600", "keep"), stdin=new.encode(), timeout=TIMEOUT).check(
            f"cannot write {path}")
        self.changed.append(path)
        self._verify()

    def _verify(self) -> None:
        """A new connection with the node's own key must now land in the wrapper."""
        t = self.opener(self.guest)
        try:
            s = inspect(t, self.guest, self.layout, time.monotonic() + TIMEOUT)
        except HookError as e:
            self.say(f"  WARNING: the node's key does not work after restricting it: {e}")
            raise InstallError(f"the node's key does not work after restricting it: {e}") from e
        finally:
            t.close()
        if not s.restricted:
            self.say("  WARNING: a new connection with the node's key is not restricted (another authorized_keys "
                     "file, or an earlier line with the same key?)")
            raise InstallError("the node's key is not restricted after install")
        self.say("  checked: a new connection with the node's key runs only vzdump-hook's commands")


__all__ = [
    "AUTHORIZED_KEYS", "FILES", "GUEST_FILES_ENV", "GUEST_ROOT_ENV", "Installer", "InstallError", "Layout", "Setup",
    "conf_text", "describe", "guest_files_dir", "inspect", "node_public_key", "restricted_keys", "shipped_dirs",
]
