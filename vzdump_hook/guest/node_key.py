"""The node's SSH key as a guest's authorized_keys lists it: its public half (read from the `.pub`
file next to the node's identity file, else derived from the private key), and the authorized_keys
text with that key's line restricted to the wrapper (`command=`, `restrict`; a `from=` kept). Text
only: `vzdump-hook guest install` (install.py) reads and writes the file in the guest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .shipped import InstallError

if TYPE_CHECKING:
    from ..config import GuestConfig

AUTHORIZED_KEYS = ".ssh/authorized_keys"  # relative: in the SSH user's home, as sshd's default

_KEY_TYPE = re.compile(r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp\d+|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
                       r"(-cert-v01@openssh\.com)?")


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


def split_options(line: str) -> tuple[list[str], str]:
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
            opts, rest = split_options(line)
            keep = [o for o in opts if o.lower().startswith("from=")]
            if not found:
                out.append(",".join(want_opts + keep) + " " + rest)
            found = True  # later duplicates of the key are dropped: sshd would use the first anyway
            continue
        out.append(line)
    if not found:
        out.append(",".join(want_opts) + f" {key_type} {blob} vzdump-hook")
    return "\n".join(out) + "\n"
