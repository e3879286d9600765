"""The guest side of vzdump-hook (examples/guest/): deploy it over a guest's Transport, and tell whether
it is in place and current.

Deployed: the recovery program and its systemd service and timer (start what a marker lists after a
reboot or past its deadline, even if the node never comes back), the `command=` wrapper the node's SSH
key is restricted to, and the settings both read (/etc/vzdump-hook/guest.conf: marker path, VMID).
Installing is idempotent: a file is written only when its content or mode differs, and `dry_run`
shows the differences instead. The node's key is restricted last, after the wrapper was seen to work
in the guest, and checked over a new connection afterwards.

Through a restricted key the files can be checked (the wrapper's `status` verb) but not changed.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import posixpath
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Kind
from ..errors import HookError
from ..text import escape
from ..transports import open_transport
from ..transports.base import sh

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..transports.base import Transport

GUEST_ROOT_ENV = "VZDUMP_HOOK_GUEST_ROOT"  # tests and development: install under this directory of the guest
GUEST_FILES_ENV = "VZDUMP_HOOK_GUEST_FILES"  # where examples/guest/ is, when not next to the package
AUTHORIZED_KEYS = ".ssh/authorized_keys"  # relative: in the SSH user's home, as sshd's default
MAX_FILE = 1024 * 1024
TIMEOUT = 60.0


class InstallError(HookError):
    """The guest side cannot be installed (files missing on the node, restricted key, guest refused)."""


@dataclass(frozen=True)
class GuestFile:
    key: str  # the name the wrapper's `status` reports it under
    path: str  # in the guest, below the install root
    mode: int
    source: str | None  # file in examples/guest/; None: generated per guest


FILES = (
    GuestFile("recover", "/usr/local/sbin/vzdump-hook-recover", 0o755, "vzdump-hook-recover"),
    GuestFile("wrapper", "/usr/local/sbin/vzdump-hook-wrapper", 0o755, "vzdump-hook-wrapper"),
    GuestFile("service", "/etc/systemd/system/vzdump-hook-recover.service", 0o644, "vzdump-hook-recover.service"),
    GuestFile("timer", "/etc/systemd/system/vzdump-hook-recover.timer", 0o644, "vzdump-hook-recover.timer"),
    GuestFile("conf", "/etc/vzdump-hook/guest.conf", 0o644, None),
)
RECOVERY_FILES = ("recover", "service", "timer", "conf")


@dataclass(frozen=True)
class Layout:
    """Where the files go in the guest: `root` is "/" except in tests."""

    root: str = "/"

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> Layout:
        return cls(env.get(GUEST_ROOT_ENV) or "/")

    def path(self, key: str) -> str:
        f = next(f for f in FILES if f.key == key)
        return self.root.rstrip("/") + f.path

    @property
    def systemd(self) -> bool:
        return self.root == "/"

    @property
    def wrapper_command(self) -> str:
        """The `command=` of the node's key."""
        if self.systemd:
            return self.path("wrapper")
        return shlex.join([self.path("wrapper"), "--conf", self.path("conf")])


def _installed_from() -> str:
    """The local directory pip installed this package from (PEP 610 direct_url.json), or ""."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        text = metadata.distribution("vzdump-hook").read_text("direct_url.json") or ""
        url = urlparse(json.loads(text).get("url", "")) if text else None
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        return ""
    return unquote(url.path) if url is not None and url.scheme == "file" else ""


PACKAGED = "/usr/share/vzdump-hook"  # the Debian package's files: guest/ (examples/guest), node/ (examples/node)


def shipped_dirs(sub: str) -> list[str]:
    """Where examples/`sub` of this installation may be, most specific first: the checkout next to the
    package (editable install), the directory pip installed it from (scripts/install.sh), share/ of the
    prefix (a venv), the Debian package's /usr/share/vzdump-hook/`sub`."""
    import sys

    source = _installed_from()
    return [
        str(Path(__file__).resolve().parents[2] / "examples" / sub),
        os.path.join(source, "examples", sub) if source else "",
        os.path.join(sys.prefix, "share", "vzdump-hook", sub),
        os.path.join(PACKAGED, sub),
    ]


def guest_files_dir() -> Path:
    """examples/guest/ of this installation: $VZDUMP_HOOK_GUEST_FILES, else the first of shipped_dirs("guest")
    that has every file. Raises InstallError when none has the files."""
    for c in [os.environ.get(GUEST_FILES_ENV, ""), *shipped_dirs("guest")]:
        if c and all(os.path.isfile(os.path.join(c, f.source)) for f in FILES if f.source):
            return Path(c)
    raise InstallError(f"the guest-side files (examples/guest/ of the vzdump-hook sources) are not found; set {GUEST_FILES_ENV}=/path/to/vzdump-hook/examples/guest")


def conf_text(guest: GuestConfig, layout: Layout) -> bytes:
    """The guest's settings file: the same for a guest whichever node writes it."""
    return (
        "# vzdump-hook guest-side settings, written by `vzdump-hook guest install` (KEY=VALUE lines; read, not run,\n"
        "# by vzdump-hook-recover and vzdump-hook-wrapper). Changes here are undone by the next install.\n"
        f"VMID={guest.vmid}\n"
        f"MARKER={guest.marker_path}\n"
        "# seconds added to the marker's deadline before the guest acts (the node's and the guest's clocks differ)\n"
        "DEADLINE_GRACE=60\n"
        "# seconds to wait for the docker engine at boot\n"
        "WAIT_DOCKER=120\n"
        "# where the wrapper logs each call: syslog (tag vzdump-hook-wrapper, facility auth) or a file\n"
        "LOG=syslog\n"
        f"ROOT={layout.root}\n"
        "# the stack kinds the node may act on through the wrapper, and the service units of its systemd stacks\n"
        f"KINDS={' '.join(k.value for k in kinds_of(guest))}\n"
        f"UNITS={' '.join(u for spec in guest.stacks or () if not spec.user for u in spec.units)}\n"
        "# the user whose --user units USER_UNITS are (systemd stacks with `user`)\n"
        f"SYSTEMD_USER={next((spec.user for spec in guest.stacks or () if spec.user), '')}\n"
        f"USER_UNITS={' '.join(u for spec in guest.stacks or () if spec.user for u in spec.units)}\n"
        "# the containers of its container stacks: by name, and those carrying one of these labels\n"
        f"CONTAINERS={' '.join(c for spec in guest.stacks or () for c in spec.containers)}\n"
        f"CONTAINER_LABELS={' '.join(spec.label for spec in guest.stacks or () if spec.label)}\n"
        "# the command of the guest's own controller (a controller stack with `command`): the wrapper passes its `signal` messages\n"
        f"CONTROLLER={' '.join(next((spec.controller.command for spec in guest.stacks or () if spec.controller and spec.controller.command), ()))}\n"
    ).encode()


def kinds_of(guest: GuestConfig) -> tuple[Kind, ...]:
    """The stack kinds the guest's config uses, in a fixed order ("auto" is compose)."""
    used = {Kind.COMPOSE} if guest.stacks is None else {s.kind for s in guest.stacks}
    return tuple(k for k in Kind if k in used)


def desired(guest: GuestConfig, layout: Layout) -> dict[str, bytes]:
    """key -> the content the guest should have."""
    d = guest_files_dir()
    return {f.key: (d / f.source).read_bytes() if f.source else conf_text(guest, layout) for f in FILES}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- inspecting -----------------------------------------------------------------------------------------

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
"""


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
        bad = [os.path.basename(next(f.path for f in FILES if f.key == k)) for k, s in zip(keys, states, strict=True) if s != "current"]
        return f"OUTDATED ({', '.join(bad)})"

    @property
    def recovery(self) -> str:
        return self._state(RECOVERY_FILES)

    @property
    def wrapper(self) -> str:
        return self._state(("wrapper",))

    @property
    def timer_ok(self) -> bool:
        return self.timer.startswith("enabled") and self.timer.endswith("active") and not self.timer.endswith("inactive")

    @property
    def complete(self) -> bool:
        return self.recovery == "current" and self.wrapper == "current" and (self.timer_ok or self.timer in ("not-checked", "no-systemd"))

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
            todo = f": `vzdump-hook guest install {vmid}`" + (" with an unrestricted key (--identity-file)" if self.restricted else "")
        mdir = f"; marker directory {self.marker_dir} (make it the SSH user's, mode 0700)" if self.marker_dir.startswith("INSECURE") else ""
        return f"guest side: {rec}; {key}{mdir}{todo}"


def _marker_dir(text: str) -> str:
    return next((escape(ln[len("marker-dir ") :].strip()) for ln in text.splitlines() if ln.startswith("marker-dir ")), "unknown")


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
    r = t.run(sh(_HASH_SCRIPT, "yes" if layout.systemd else "no", mdir, *paths), timeout=max(0.1, min(TIMEOUT, deadline - time.monotonic())))
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


# -- installing -----------------------------------------------------------------------------------------

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
"""

_KEY_TYPE = re.compile(r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp\d+|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)(-cert-v01@openssh\.com)?")


def node_public_key(guest: GuestConfig) -> tuple[str, str]:
    """(type, base64 blob) of the key the node uses for `guest`. Raises InstallError."""
    assert guest.ssh is not None
    path = guest.ssh.identity_file
    try:
        fields = Path(path + ".pub").read_text().split()
        if len(fields) >= 2 and _KEY_TYPE.fullmatch(fields[0]):
            return fields[0], fields[1]
    except OSError:
        pass
    try:
        import paramiko

        key = paramiko.PKey.from_path(path)
        return key.get_name(), key.get_base64()
    except Exception as e:  # paramiko raises several kinds
        raise InstallError(f"cannot read the node's public key ({path}.pub, or from {path}): {e}") from None


def _split_options(line: str) -> tuple[list[str], str]:
    """(options, "type blob [comment]") of an authorized_keys line."""
    first = line.split(None, 1)[0] if line.split() else ""
    if _KEY_TYPE.fullmatch(first):
        return [], line.strip()
    opts: list[str] = []
    cur, quoted, i = "", False, 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quoted and i + 1 < len(line):
            cur += line[i : i + 2]
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            opts.append(cur)
            cur = ""
            i += 1
            continue
        elif c in " \t" and not quoted:
            break
        cur += c
        i += 1
    opts.append(cur)
    return [o for o in opts if o], line[i:].strip()


def restricted_keys(text: str, key_type: str, blob: str, command: str) -> str:
    """authorized_keys `text` with the node's key restricted to `command` (its line replaced, or added).
    A `from=` option already on the line is kept; other lines are left as they are."""
    want_opts = [f'command="{command}"', "restrict"]
    lines = text.splitlines()
    found = False
    out = []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#") and blob in line.split():
            opts, rest = _split_options(line)
            keep = [o for o in opts if o.lower().startswith("from=")]
            if not found:
                out.append(",".join(want_opts + keep) + " " + rest)
            found = True  # later duplicates of the key are dropped: sshd would use the first anyway
            continue
        out.append(line)
    if not found:
        out.append(",".join(want_opts) + f" {key_type} {blob} vzdump-hook")
    return "\n".join(out) + "\n"


def _diff(old: bytes | None, new: bytes, path: str, limit: int = 40) -> list[str]:
    try:
        a = (old or b"").decode().splitlines()
        b = new.decode().splitlines()
    except UnicodeDecodeError:
        return ["    (binary content differs)"]
    lines = list(difflib.unified_diff(a, b, fromfile=f"{path} (guest)" if old is not None else "/dev/null", tofile=f"{path} (new)", lineterm="", n=1))
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
                    self.say(f"{self.guest.vmid}: everything current; the key used is restricted to the wrapper: nothing to do")
                    return True
                raise InstallError(
                    f"{self.guest.vmid}: the key used is restricted to the wrapper ({setup.line(self.guest.vmid)}); files cannot be changed "
                    "through it: run again with --identity-file KEY (a key with a shell in the guest), or over pct/agent")
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
                t.run(sh(_PUT_SCRIPT, path, f"{f.mode:04o}"), stdin=new, timeout=TIMEOUT).check(f"cannot write {path}")

    def _systemd(self, t: Transport, setup: Setup) -> None:
        if not self.layout.systemd:
            self.say(f"  systemd: not used (installed under {self.layout.root})")
            return
        if not self.changed and setup.timer_ok:
            self.say(f"  systemd: timer {setup.timer}: unchanged")
            return
        if self.dry_run:
            self.say("  systemd: would reload, enable vzdump-hook-recover.service, enable and start vzdump-hook-recover.timer")
            return
        out = t.run(sh(_SYSTEMD_SCRIPT), timeout=TIMEOUT).check("systemctl failed").stdout.strip()
        if out == "no-systemd":
            self.say("  systemd: not running in the guest: run /usr/local/sbin/vzdump-hook-recover at boot and every minute"
                     " (e.g. cron `* * * * * /usr/local/sbin/vzdump-hook-recover --quiet`, and from the boot scripts)")
        else:
            self.say(f"  systemd: vzdump-hook-recover.service enabled, timer {out}")

    def _restrict(self, t: Transport) -> None:
        if self.guest.transport != "ssh" or self.guest.ssh is None:
            self.say(f"  node key: transport {self.guest.transport} uses no SSH key: nothing to restrict")
            return
        key_type, blob = node_public_key(self.guest)
        r = t.run(sh(_READ_KEYS_SCRIPT, self.authorized_keys), timeout=TIMEOUT).check("cannot read authorized_keys")
        head, _, body = r.stdout.partition("\n")
        state, _, path = head.partition(" ")
        old = body if state == "present" else ""
        new = restricted_keys(old, key_type, blob, self.layout.wrapper_command)
        if new == old:
            self.say(f"  {path}: node key already restricted to the wrapper: unchanged")
            return
        self.say(f"  {path}: {'would restrict' if self.dry_run else 'restricting'} the node's key ({key_type}) to {self.layout.wrapper_command}")
        if self.dry_run:
            for line in _diff(old.encode() if state == "present" else None, new.encode(), path):
                self.say(line)
            return
        # never lock the node out: the wrapper must answer as sshd will run it before the key is bound to it
        test = t.run(sh(_SELFTEST_SCRIPT, self.layout.path("wrapper"), self.layout.path("conf")), timeout=TIMEOUT)
        if not test.ok or "restricted yes" not in test.stdout:
            raise InstallError(f"the wrapper does not work in the guest, the key is left unrestricted: {(test.stderr or test.stdout).strip()[-300:]}")
        t.run(sh(_KEYS_DIR_SCRIPT, path), timeout=TIMEOUT).check(f"cannot make the directory of {path}")
        t.run(sh(_PUT_SCRIPT, path, "0600", "keep"), stdin=new.encode(), timeout=TIMEOUT).check(f"cannot write {path}")
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
            self.say("  WARNING: a new connection with the node's key is not restricted (another authorized_keys file, or an earlier line with the same key?)")
            raise InstallError("the node's key is not restricted after install")
        self.say("  checked: a new connection with the node's key runs only vzdump-hook's commands")


__all__ = ["FILES", "GUEST_ROOT_ENV", "Installer", "InstallError", "Layout", "Setup", "describe", "inspect", "restricted_keys"]
