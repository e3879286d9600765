"""The transports' config tables ([guests.N.ssh], .pct, .agent and their [defaults]): the frozen
dataclasses a transport is built from, and the functions that validate a TOML table into one (config.py
asks them; every problem names its key path)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..stacks.checks import Problems, num, string, unknown


@dataclass(frozen=True)
class SshConfig:
    host: str
    port: int = 22
    user: str = "root"
    identity_file: str = "/etc/vzdump-hook/id_ed25519"
    known_hosts: str = "/etc/vzdump-hook/known_hosts"
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class PctConfig:
    path: str = "/usr/sbin/pct"


@dataclass(frozen=True)
class AgentConfig:
    api: str = "local"  # "local": pvesh on the node as root; "https": an API token
    pvesh: str = "/usr/bin/pvesh"
    host: str = "127.0.0.1"
    port: int = 8006
    token_id: str = ""  # USER@REALM!TOKENNAME
    token_file: str = "/etc/vzdump-hook/pve-token"
    verify: str | bool = "/etc/pve/pve-root-ca.pem"  # a CA file, or True for the system's CAs
    node: str = ""  # "": this node


def ssh_table(p: Problems, path: str, v: Any) -> SshConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table")
        return None
    unknown(p, path, v, {"host", "port", "user", "identity_file", "known_hosts", "connect_timeout"})
    if "password" in v:
        p.add(f"{path}.password", "passwords are not supported: use a key (identity_file)")
    d = SshConfig(host="")
    host = string(p, f"{path}.host", v.get("host")) if "host" in v else None
    if "host" not in v:
        p.add(f"{path}.host", "missing (the guest's address or name, as reachable from the node)")
    port = num(p, f"{path}.port", v["port"], lo=1, hi=65535, integer=True) if "port" in v else d.port
    user = string(p, f"{path}.user", v["user"]) if "user" in v else d.user
    ident = (string(p, f"{path}.identity_file", v["identity_file"], absolute=True) if "identity_file" in v
             else d.identity_file)
    kh = string(p, f"{path}.known_hosts", v["known_hosts"], absolute=True) if "known_hosts" in v else d.known_hosts
    ct = (num(p, f"{path}.connect_timeout", v["connect_timeout"], lo=0.1, hi=300) if "connect_timeout" in v
          else d.connect_timeout)
    if None in (host, port, user, ident, kh, ct):
        return None
    return SshConfig(str(host), int(port or 0), str(user), str(ident), str(kh), float(ct or 0))


# patterns compiled on first use, by re (every phase imports this module)
_TOKEN_ID = r"[^\s@!]+@[^\s@!]+![A-Za-z][A-Za-z0-9._-]*"
_NODE = r"[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?"


def pct_table(p: Problems, path: str, v: Any) -> PctConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table")
        return None
    unknown(p, path, v, {"path"})
    exe = string(p, f"{path}.path", v["path"], absolute=True) if "path" in v else PctConfig.path
    return None if exe is None else PctConfig(exe)


def agent_table(p: Problems, path: str, v: Any) -> AgentConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table")
        return None
    before = len(p.items)
    unknown(p, path, v, {"api", "pvesh", "host", "port", "token_id", "token_file", "verify", "node"})
    for secret in ("token", "token_value", "password", "secret"):
        if secret in v:
            p.add(f"{path}.{secret}", "secrets are not kept in the config: "
                  "put the token's secret in token_file (mode 0600, owned by root)")
    d = AgentConfig()
    vals: dict[str, Any] = {}
    if "api" in v:
        vals["api"] = string(p, f"{path}.api", v["api"], choices=("local", "https"))
    for key in ("pvesh", "token_file"):
        if key in v:
            vals[key] = string(p, f"{path}.{key}", v[key], absolute=True)
    if "host" in v:
        vals["host"] = string(p, f"{path}.host", v["host"])
    if "port" in v:
        port = num(p, f"{path}.port", v["port"], lo=1, hi=65535, integer=True)
        vals["port"] = None if port is None else int(port)
    if "token_id" in v:
        tid = v["token_id"]
        if not isinstance(tid, str) or not re.fullmatch(_TOKEN_ID, tid):
            p.add(f"{path}.token_id", f"must be USER@REALM!TOKENNAME, e.g. 'root@pam!vzdump-hook' (got {tid!r})")
        vals["token_id"] = tid
    if "verify" in v:
        ver = v["verify"]
        if ver is False:
            p.add(f"{path}.verify", "TLS is always verified: give the CA file that signed the API's certificate "
                  "(on a node: /etc/pve/pve-root-ca.pem), or true for the system's CAs")
        elif ver is not True:
            ver = string(p, f"{path}.verify", ver, absolute=True)
        vals["verify"] = ver
    if "node" in v:
        node = v["node"]
        if not isinstance(node, str) or not re.fullmatch(_NODE, node):
            p.add(f"{path}.node", f"must be a PVE node name (got {node!r})")
        vals["node"] = node
    if vals.get("api", d.api) == "https" and "token_id" not in v:
        p.add(f"{path}.token_id", "missing (api is https: give the API token's id, USER@REALM!TOKENNAME)")
    if len(p.items) != before:
        return None
    return AgentConfig(**vals)
