"""`vzdump-hook trust VMID`: fetch a guest's SSH host key, show its fingerprint next to the command
that prints the same fingerprint in the guest, and add it to the guest's known_hosts only once the
admin has compared them (check before trust, unlike `ssh-keyscan >> known_hosts`)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from ..errors import ConnectError, HookError
from ..transports.ssh import _import_paramiko, _known_hosts_name, fingerprint
from ..transports.tables import SshConfig


@dataclass(frozen=True)
class HostKey:
    name: str  # the known_hosts name: host, or [host]:port
    key: Any  # paramiko.PKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    @property
    def guest_command(self) -> str:
        """The command that prints this key's fingerprint in the guest."""
        kind = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(self.key.get_name(), "ecdsa")
        return f"ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub"

    @property
    def line(self) -> str:
        return f"{self.name} {self.key.get_name()} {self.key.get_base64()}\n"


def fetch(cfg: SshConfig, timeout: float) -> HostKey:
    """The host key the guest's sshd presents (key exchange only, no authentication). Raises ConnectError."""
    paramiko = _import_paramiko()
    target = f"{cfg.host}:{cfg.port}"
    try:
        sock = socket.create_connection((cfg.host, cfg.port), timeout=min(timeout, cfg.connect_timeout))
    except OSError as e:
        raise ConnectError(f"{target}: cannot connect: {e.strerror or e}") from None
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=timeout)
        return HostKey(_known_hosts_name(cfg.host, cfg.port), t.get_remote_server_key())
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise ConnectError(f"{target}: no SSH host key received: {e}") from None
    finally:
        t.close()


def known(path: str, hk: HostKey) -> str | None:
    """'same' if `path` already trusts this key for the guest, 'other' if it has another key of the
    same type for it (changed: refused), None if it has none."""
    paramiko = _import_paramiko()
    if not os.path.exists(path):
        return None
    try:
        keys = paramiko.HostKeys(path)
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise HookError(f"{path}: cannot read: {e}") from None
    entry = keys.lookup(hk.name) or {}
    have = entry.get(hk.key.get_name())
    if have is None:
        return None
    return "same" if have.asbytes() == hk.key.asbytes() else "other"


def add(path: str, hk: HostKey) -> None:
    """Append the key's line to `path` (created 0600 if missing)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write("\n")
        f.write(hk.line)
        f.flush()
        os.fsync(f.fileno())
