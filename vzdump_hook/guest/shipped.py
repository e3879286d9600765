"""The guest side as this installation ships it, and what a guest should have of it: the files of
examples/guest/ (found next to the package, where pip installed it from, under the prefix's share/ or
the Debian package's /usr/share/vzdump-hook), where each goes in the guest (`Layout`), and the
guest's settings file, generated from its config. Read by `vzdump-hook guest install` (install.py)
and by the check of whether a guest's side is current (installed.py).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HookError
from ..stacks import Kind

if TYPE_CHECKING:
    from ..config import GuestConfig

GUEST_ROOT_ENV = "VZDUMP_HOOK_GUEST_ROOT"  # tests and development: install under this directory of the guest
GUEST_FILES_ENV = "VZDUMP_HOOK_GUEST_FILES"  # where examples/guest/ is, when not next to the package
PACKAGED = "/usr/share/vzdump-hook"  # the Debian package's files: guest/ (examples/guest), node/ (examples/node)


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
    raise InstallError("the guest-side files (examples/guest/ of the vzdump-hook sources) are not found; "
                       f"set {GUEST_FILES_ENV}=/path/to/vzdump-hook/examples/guest")


def conf_text(guest: GuestConfig, layout: Layout) -> bytes:
    """The guest's settings file: the same for a guest whichever node writes it."""
    stacks = guest.stacks or ()
    controller = next((s.controller.command for s in stacks if s.controller and s.controller.command), ())
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
        f"UNITS={' '.join(u for spec in stacks if not spec.user for u in spec.units)}\n"
        "# the user whose --user units USER_UNITS are (systemd stacks with `user`)\n"
        f"SYSTEMD_USER={next((spec.user for spec in stacks if spec.user), '')}\n"
        f"USER_UNITS={' '.join(u for spec in stacks if spec.user for u in spec.units)}\n"
        "# the containers of its container stacks: by name, and those carrying one of these labels\n"
        f"CONTAINERS={' '.join(c for spec in stacks for c in spec.containers)}\n"
        f"CONTAINER_LABELS={' '.join(spec.label for spec in stacks if spec.label)}\n"
        "# the command of the guest's own controller (a controller stack with `command`): "
        "the wrapper passes its `signal` messages\n"
        f"CONTROLLER={' '.join(controller)}\n"
    ).encode()


def kinds_of(guest: GuestConfig) -> tuple[Kind, ...]:
    """The stack kinds the guest's config uses, in a fixed order ("auto" is compose)."""
    used = {Kind.COMPOSE} if guest.stacks is None else {s.kind for s in guest.stacks}
    return tuple(k for k in Kind if k in used)


def desired(guest: GuestConfig, layout: Layout) -> dict[str, bytes]:
    """key -> the content the guest should have."""
    d = guest_files_dir()
    return {f.key: (d / f.source).read_bytes() if f.source else conf_text(guest, layout) for f in FILES}
