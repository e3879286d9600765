"""`vzdump-hook setup`: what a node needs before the first guest is added, made where it is missing and
never changed where it exists: the config directory (0700), a config that handles no guest
(examples/node/config.toml), the node's SSH key and its known_hosts file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable

from ..transports.tables import SshConfig

SSH_KEYGEN = "/usr/bin/ssh-keygen"  # absolute: vzdump empties PATH, and setup may run from a unit or postinst


def initial_config() -> str | None:
    """examples/node/config.toml of this installation (checkout, pip source, or the Debian package), or None."""
    from ..guest.install import shipped_dirs

    return next((p for d in shipped_dirs("node") if d and os.path.isfile(p := os.path.join(d, "config.toml"))), None)


def key_paths(config_path: str) -> tuple[str, str]:
    """The node's key and known_hosts: those of [defaults].ssh in the config, else the defaults."""
    from ..config import load
    from ..errors import ConfigError

    key, known = SshConfig.identity_file, SshConfig.known_hosts
    try:
        ssh = load(config_path).defaults.get("ssh", {})
    except ConfigError:
        return key, known
    return ssh.get("identity_file", key), ssh.get("known_hosts", known)


def prepare(config_path: str, say: Callable[[str], None]) -> bool:
    """Make what is missing; say what was made or is there. False when something could not be made."""
    ok = True
    directory = os.path.dirname(os.path.abspath(config_path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
        say(f"made {directory} (mode 0700)")
    elif os.stat(directory).st_mode & 0o077:
        say(f"WARNING: {directory} is open to other users (mode {os.stat(directory).st_mode & 0o777:04o}): "
            f"chmod 0700 {directory}")
    if os.path.lexists(config_path):
        say(f"config {config_path}: there (not changed)")
    elif (source := initial_config()) is None:
        say(f"config {config_path}: missing, and no examples/node/config.toml to start it from")
        ok = False
    else:
        tmp = f"{config_path}.setup.{os.getpid()}"
        with open(source, "rb") as src, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, config_path)
        say(f"config {config_path}: written; it handles no guest until you add one")
    key, known = key_paths(config_path)
    if os.path.exists(key):
        say(f"key {key}: there (not changed)")
    else:
        os.makedirs(os.path.dirname(key), mode=0o700, exist_ok=True)
        comment = f"vzdump-hook@{socket.gethostname().split('.')[0]}"
        r = subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode != 0:
            say(f"key {key}: ssh-keygen failed: {(r.stderr or r.stdout).strip()}")
            ok = False
        else:
            say(f"key {key}: made; its public half ({key}.pub) goes into each guest's authorized_keys "
                "(`vzdump-hook guest install VMID` binds it to the wrapper)")
    if os.path.exists(known):
        say(f"known_hosts {known}: there (not changed)")
    else:
        os.close(os.open(known, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        say(f"known_hosts {known}: made (empty: `vzdump-hook trust VMID` adds a guest's host key)")
    return ok
