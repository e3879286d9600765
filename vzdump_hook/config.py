"""Configuration: TOML read once, validated into frozen dataclasses; every problem names its key path.

Layout (see examples/config.toml):
    [hook]              host-side settings (state directories, per-phase deadline)
    [defaults]          per-guest settings that every [guests.VMID] table inherits
    [guests.VMID]       one table per guest; keys override [defaults], sub-tables merge key by key
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import ConfigError
from .resident.client import DEFAULT_RUN_DIR

DEFAULT_CONFIG_PATH = "/etc/vzdump-hook/config.toml"
CONFIG_ENV = "VZDUMP_HOOK_CONFIG"
TRANSPORTS = ("ssh", "pct", "agent", "none")  # none: no way into the guest (every stack is a controller reached by url)
TAG_TRANSPORTS = {"lxc": "pct", "qemu": "agent"}  # transport of a guest opted in by PVE tag, by guest type
DEFAULT_TAG = "vzdump-hook"
COMPOSE_COMMANDS = {"auto": None, "docker compose": ("docker", "compose"), "docker-compose": ("docker-compose",)}


class QuiescePolicy(str, Enum):
    """What a failed quiesce (stack would not stop, was killed, guest unreachable) does to the backup."""

    CONTINUE = "continue"  # back up crash-consistent, with a loud warning
    ABORT = "abort"  # start again what was stopped, then fail this guest's backup


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


class Kind(str, Enum):
    """What a stack is: how the hook finds, stops and starts it (one module per kind in stacks/)."""

    COMPOSE = "compose"  # a docker compose project, found by its labels
    SYSTEMD = "systemd"  # listed systemd service units (never discovered: see README)
    CONTROLLER = "controller"  # the guest's own controller, told the backup's phases (docs/controller-api.md)
    CONTAINER = "container"  # plain docker or podman containers, by name or by label


@dataclass(frozen=True)
class ControllerSpec:
    """How to reach a guest's controller (stacks/controller.py): a command run in the guest over
    its transport (carrier A), or its HTTPS API (carrier B), verified by a CA file or a pinned
    certificate fingerprint, with a bearer token read from a root-only file."""

    command: tuple[str, ...] = ()  # carrier A: the controller's command in the guest, e.g. ("vzdump-controller",)
    url: str = ""  # carrier B: https://HOST:PORT
    token_file: str = ""
    ca_file: str = ""
    fingerprint: str = ""  # SHA-256 of the certificate (DER), 64 hex digits
    answer_within: float | None = None  # bound for the answer to quiesce; None: the stack's stop timeout + 30 s


@dataclass(frozen=True)
class ReadySpec:
    """How to know a stack's app is back after its start (`ready`): one of a command in the guest that
    exits 0, an http(s) URL the node gets a 2xx/3xx answer from, or (compose) every started container
    with a healthcheck reporting healthy."""

    command: tuple[str, ...] = ()
    url: str = ""
    healthy: bool = False

    def describe(self) -> str:
        return f"`{' '.join(self.command)}` exits 0" if self.command else f"{self.url} answers" if self.url else "its containers are healthy"


@dataclass(frozen=True)
class StackSpec:
    name: str
    stop_timeout: float | None = None  # None: the guest's stop_timeout
    kind: Kind = Kind.COMPOSE
    units: tuple[str, ...] = ()  # systemd: the service units, in stop order
    user: str = ""  # systemd: "" for system units, else the user whose `systemctl --user` units they are
    controller: ControllerSpec | None = None  # controller: how to reach it
    before_stop: tuple[str, ...] = ()  # a command run in the guest right before the stop (not downtime), e.g. a CHECKPOINT
    before_stop_timeout: float = 60.0
    ready: ReadySpec | None = None  # the app is back when this says so (the downtime ends then)
    ready_timeout: float = 60.0
    group: int | None = None  # stop order: groups ascending, the stacks of a group in parallel; start: the reverse
    containers: tuple[str, ...] = ()  # container: the container names, in stop order
    label: str = ""  # container: "KEY" or "KEY=VALUE": the running containers carrying it (by name)
    engine: str = ""  # container: "docker" or "podman"; "": detected in the guest


@dataclass(frozen=True)
class GuestConfig:
    vmid: int
    transport: str
    ssh: SshConfig | None
    stacks: tuple[StackSpec, ...] | None  # None: "auto", every running compose project
    exclude: tuple[str, ...] = ()
    compose_command: tuple[str, ...] | None = None  # None: detect in the guest
    stop_timeout: float = 30.0
    parallel: bool = False
    on_quiesce_error: QuiescePolicy = QuiescePolicy.CONTINUE
    max_downtime: float = 600.0
    marker_path: str = "/var/lib/vzdump-hook/marker.json"
    command_timeout: float = 60.0
    resume_wait: float = 180.0
    enabled: bool = True
    early_resume: bool = True  # QEMU: start the stacks once the backup job has started (qemu/watcher.py), not at backup-end
    pct: PctConfig | None = None
    agent: AgentConfig | None = None
    # The merged table this was validated from: kept in host state so that a resume can run with the
    # settings of the quiesce even if the config file changed or broke in between.
    table: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_controllers(self) -> bool:
        return any(s.kind is Kind.CONTROLLER for s in self.stacks or ())

    def stop_timeout_of(self, stack: str) -> float:
        for spec in self.stacks or ():
            if spec.name == stack and spec.stop_timeout is not None:
                return spec.stop_timeout
        return self.stop_timeout

    def describe_target(self) -> str:
        if self.transport == "ssh" and self.ssh is not None:
            return f"ssh {self.ssh.user}@{self.ssh.host}:{self.ssh.port}"
        if self.transport == "agent" and self.agent is not None:
            return f"agent {self.vmid} via " + ("pvesh" if self.agent.api == "local" else f"https://{self.agent.host}:{self.agent.port}")
        if self.transport == "pct":
            return f"pct {self.vmid}"
        return self.transport


@dataclass(frozen=True)
class NotifyConfig:
    """[hook.notify]: a webhook told at job-end (node/report.py)."""

    url: str
    format: str = "json"  # json | ntfy | gotify | healthchecks
    token_file: str = ""  # ntfy: a Bearer token, gotify: the app token; root-only file
    timeout: float = 10.0
    # Settings remembered from an earlier config (state.remembered_settings) keep no url, which is the
    # webhook's secret (a healthchecks or ntfy url): only its hash, and url is "".
    url_sha256: str = ""

    def key(self) -> str:
        """The SHA-256 of the url (hex): what a queued message and the remembered settings keep of it."""
        if self.url_sha256:
            return self.url_sha256
        import hashlib

        return hashlib.sha256(self.url.encode()).hexdigest()


NOTIFY_FORMATS = ("json", "ntfy", "gotify", "healthchecks")


@dataclass(frozen=True)
class HookSettings:
    state_dir: str = "/var/lib/vzdump-hook"
    run_dir: str = DEFAULT_RUN_DIR
    phase_timeout: float = 600.0
    sweep_timeout: float = 60.0
    pve_dir: str = "/etc/pve"
    tag: str = DEFAULT_TAG  # guests with this PVE tag are handled with [defaults]; "" turns this off
    qmp_dir: str = "/var/run/qemu-server"  # QEMU's QMP sockets (VMID.qmp), asked for the backup job's start
    chain: tuple[str, ...] = ()  # other hook scripts, run with vzdump's arguments and environment (phase/runner.py: chain)
    chain_timeout: float = 3600.0  # bound for one chained script in one phase; killed after it
    metrics_file: str = ""  # node_exporter textfile written at job-end (node/report.py); "" = off
    notify: NotifyConfig | None = None  # webhook at job-end (node/report.py)
    ledger_dir: str = ""  # "": pve_dir/priv/vzdump-hook/ledger on a PVE node, else state_dir/ledger (node/ledger.py)
    resident: bool = True  # one process per guest from the stop to the start (resident/process.py); false: the phases alone


@dataclass(frozen=True)
class Config:
    hook: HookSettings
    guests: Mapping[int, GuestConfig]
    source: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the valid [defaults] keys, for tagged guests

    def guest(self, vmid: int) -> GuestConfig | None:
        g = self.guests.get(vmid)
        return g if g is not None and g.enabled else None


# ---------------------------------------------------------------------------------------------
# validation


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def _num(p: _Problems, path: str, v: Any, *, lo: float, hi: float, integer: bool = False) -> float | None:
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        p.add(path, f"must be {'an integer' if integer else 'a number'} (got {v!r})")
        return None
    if not lo <= v <= hi:
        p.add(path, f"must be {lo:g}-{hi:g} (got {v!r})")
        return None
    return float(v)


def _str(p: _Problems, path: str, v: Any, *, absolute: bool = False, choices: tuple[str, ...] = ()) -> str | None:
    if not isinstance(v, str) or not v:
        p.add(path, f"must be a non-empty string (got {v!r})")
        return None
    if absolute and not v.startswith("/"):
        p.add(path, f"must be an absolute path (got {v!r}): vzdump runs the hook with no working directory or HOME to resolve it")
        return None
    if choices and v not in choices:
        p.add(path, f"must be one of {', '.join(repr(c) for c in choices)} (got {v!r})")
        return None
    return v


def _bool(p: _Problems, path: str, v: Any) -> bool | None:
    if not isinstance(v, bool):
        p.add(path, f"must be true or false (got {v!r})")
        return None
    return v


def _unknown(p: _Problems, path: str, table: Mapping[str, Any], known: set[str]) -> None:
    for key in table:
        if key not in known:
            p.add(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(known))})")


_STACK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-.")


def valid_stack_name(name: str) -> bool:
    """Compose project names: lowercase letters, digits, '_', '-', '.'; must start with a letter or digit."""
    return bool(name) and len(name) <= 128 and set(name) <= _STACK_NAME_CHARS and name[0].isalnum()


# A systemd service unit name as the hook accepts it (no \\-escapes, no globs); the wrapper and the
# guest's recovery program check the same pattern.
_UNIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,240}\.service")
MAX_UNITS = 32
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def valid_user(name: str) -> bool:
    """A user name for --user units: lowercase letters, digits, '_', '-', not starting with a digit or '-'."""
    return _USER.fullmatch(name) is not None


def valid_unit(name: str) -> bool:
    """A service unit name: letters, digits, ':', '_', '.', '@', '-', ending in .service."""
    return _UNIT.fullmatch(name) is not None


# Container names as docker and podman accept them; labels as `KEY` or `KEY=VALUE` without spaces or
# quotes (the wrapper and the recovery program keep lists of both in guest.conf, split at spaces).
_CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}(=[A-Za-z0-9._/:@+-]{0,255})?")
MAX_CONTAINERS = 64
ENGINES = ("docker", "podman")


def valid_container_name(name: str) -> bool:
    """A container name: letters, digits, '_', '.', '-', starting with a letter or digit, at most 128."""
    return _CONTAINER_NAME.fullmatch(name) is not None


def valid_label(label: str) -> bool:
    """A label filter: KEY or KEY=VALUE (KEY: letters, digits, '.', '_', '/', '-'; VALUE also ':', '@', '+')."""
    return _LABEL.fullmatch(label) is not None


def _container_entry(p: _Problems, path: str, item: Mapping[str, Any]) -> tuple[tuple[str, ...], str, str] | None:
    """(names, label, engine) of a container stack entry; exactly one of `containers` and `label`."""
    if ("containers" in item) == ("label" in item):
        p.add(f"{path}.containers", 'give either containers (names, e.g. ["app", "db"]) or label ("KEY=VALUE"), not both, not neither')
        return None
    names: tuple[str, ...] = ()
    label = ""
    if "containers" in item:
        got = _distinct(p, f"{path}.containers", item["containers"], MAX_CONTAINERS, valid_container_name,
                        "container names", "a container name (letters, digits, '_', '.', '-')", "a container")
        if got is None:
            return None
        names = got
    else:
        label = item["label"]
        if not isinstance(label, str) or not valid_label(label):
            p.add(f"{path}.label", f'must be "KEY" or "KEY=VALUE" (letters, digits, ".", "_", "/", "-"; the value also ":", "@", "+") (got {label!r})')
            return None
    engine = item.get("engine", "")
    if "engine" in item and _str(p, f"{path}.engine", engine, choices=ENGINES) is None:
        return None
    return names, label, engine


def _distinct(p: _Problems, path: str, v: Any, most: int, ok: Callable[[str], bool], items: str, item: str, one: str) -> tuple[str, ...] | None:
    """A list of 1 to `most` distinct strings that `ok` accepts (`items`, each `item`); None after a problem."""
    if not isinstance(v, list) or not v or len(v) > most:
        p.add(path, f"must be a list of 1-{most} {items} (got {v!r})")
        return None
    for i, u in enumerate(v):
        if not isinstance(u, str) or not ok(u):
            p.add(f"{path}[{i}]", f"not {item}: {u!r}")
            return None
    if len(set(v)) != len(v):
        p.add(path, f"{one} is listed twice")
        return None
    return tuple(v)


def _units(p: _Problems, path: str, v: Any) -> tuple[str, ...] | None:
    return _distinct(p, path, v, MAX_UNITS, valid_unit, 'service unit names, e.g. ["postgresql.service"]',
                     "a service unit name (letters, digits, ':', '_', '.', '@', '-', ending in .service)", "a unit")
_STRATEGY_KEYS = {"before_stop", "before_stop_timeout", "ready", "ready_timeout", "group"}
MAX_GROUP = 99


def _argv(p: _Problems, path: str, v: Any, what: str) -> tuple[str, ...] | None:
    """A command as a list of words (no shell): what the guest runs."""
    if not isinstance(v, list) or not 1 <= len(v) <= 64 or not all(isinstance(w, str) and w and len(w) <= 4096 and "\0" not in w for w in v):
        p.add(path, f"must be a list of 1-64 non-empty strings, the command's words (run without a shell), e.g. {what} (got {v!r})")
        return None
    return tuple(v)


def _ready(p: _Problems, path: str, v: Any, kind: Kind) -> ReadySpec | None:
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in ("command", "url", "healthy"):
        p.add(path, f"must be a table with one of: command = [...] (exits 0 in the guest), url = \"http://...\" (answers 2xx/3xx to the node), healthy = true (compose healthchecks) (got {v!r})")
        return None
    key, value = next(iter(v.items()))
    if key == "command":
        argv = _argv(p, f"{path}.command", value, '["pg_isready", "-h", "127.0.0.1"]')
        return None if argv is None else ReadySpec(command=argv)
    if key == "url":
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", value):
            p.add(f"{path}.url", f"must be an http:// or https:// URL (got {value!r})")
            return None
        return ReadySpec(url=value)
    if value is not True or kind is not Kind.COMPOSE:
        p.add(f"{path}.healthy", "only `healthy = true`, and only for compose stacks (a systemd stack is ready when its units are active, which its start already waits for)")
        return None
    return ReadySpec(healthy=True)


def _strategies(p: _Problems, ipath: str, item: Mapping[str, Any], kind: Kind) -> dict[str, Any] | None:
    """before_stop, ready, group and their bounds of one stack table (README: Per-stack strategies)."""
    before = len(p.items)
    out: dict[str, Any] = {}
    if "before_stop" in item:
        out["before_stop"] = _argv(p, f"{ipath}.before_stop", item["before_stop"], '["docker", "exec", "db-postgres-1", "psql", "-U", "postgres", "-c", "CHECKPOINT"]')
    if "before_stop_timeout" in item:
        out["before_stop_timeout"] = _num(p, f"{ipath}.before_stop_timeout", item["before_stop_timeout"], lo=1, hi=3600)
        if "before_stop" not in item:
            p.add(f"{ipath}.before_stop_timeout", "without before_stop")
    if "ready" in item:
        out["ready"] = _ready(p, f"{ipath}.ready", item["ready"], kind)
    if "ready_timeout" in item:
        out["ready_timeout"] = _num(p, f"{ipath}.ready_timeout", item["ready_timeout"], lo=1, hi=3600)
        if "ready" not in item:
            p.add(f"{ipath}.ready_timeout", "without ready")
    if "group" in item:
        g = _num(p, f"{ipath}.group", item["group"], lo=1, hi=MAX_GROUP, integer=True)
        out["group"] = None if g is None else int(g)
    return out if len(p.items) == before else None


_KIND_KEYS = {Kind.SYSTEMD: {"units", "user"}, Kind.CONTROLLER: {"command", "url", "token_file", "ca_file", "fingerprint", "answer_within"},
              Kind.CONTAINER: {"containers", "label", "engine"}}
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{2}(:?[0-9A-Fa-f]{2}){31}")
# a controller command's words: no shell is involved, but the restricted wrapper matches them as words
_COMMAND_WORD = re.compile(r"[A-Za-z0-9/-][A-Za-z0-9_./@:+=-]{0,255}")


def _controller(p: _Problems, path: str, item: Mapping[str, Any]) -> ControllerSpec | None:
    """A controller stack's carrier: `command` (run in the guest) or `url` (HTTPS, with token_file and
    ca_file or fingerprint)."""
    before = len(p.items)
    if ("command" in item) == ("url" in item):
        p.add(path, "give either command (the controller's command in the guest, e.g. [\"vzdump-controller\"]) or url (its HTTPS API), not both")
        return None
    vals: dict[str, Any] = {}
    if "answer_within" in item:
        vals["answer_within"] = _num(p, f"{path}.answer_within", item["answer_within"], lo=1, hi=3600)
    if "command" in item:
        cmd = item["command"]
        if not isinstance(cmd, list) or not 1 <= len(cmd) <= 8 or not all(isinstance(w, str) and _COMMAND_WORD.fullmatch(w) for w in cmd) or cmd[0].startswith("-"):
            p.add(f"{path}.command", f"must be a list of 1-8 words (letters, digits, '_./@:+=-'), the controller's command without its arguments, e.g. [\"vzdump-controller\"] (got {cmd!r})")
        else:
            vals["command"] = tuple(cmd)
        for key in ("token_file", "ca_file", "fingerprint"):
            if key in item:
                p.add(f"{path}.{key}", "only for a controller reached by url")
    else:
        url = item["url"]
        if not isinstance(url, str) or not re.fullmatch(r"https://[A-Za-z0-9.:\[\]-]+(:[0-9]{1,5})?/?", url):
            p.add(f"{path}.url", f"must be https://HOST[:PORT] (TLS is required; the API's paths /v1/... are added) (got {url!r})")
        else:
            vals["url"] = url.rstrip("/")
        token = _str(p, f"{path}.token_file", item["token_file"], absolute=True) if "token_file" in item else None
        if "token_file" not in item:
            p.add(f"{path}.token_file", "missing (the file holding the controller's API token, mode 0600)")
        vals["token_file"] = token or ""
        if ("ca_file" in item) == ("fingerprint" in item):
            p.add(path, "give either ca_file (the CA, or the self-signed certificate, that the controller's certificate is checked against) or fingerprint (its SHA-256, pinned)")
        elif "ca_file" in item:
            vals["ca_file"] = _str(p, f"{path}.ca_file", item["ca_file"], absolute=True) or ""
        else:
            fp = item["fingerprint"]
            if not isinstance(fp, str) or not _FINGERPRINT.fullmatch(fp):
                p.add(f"{path}.fingerprint", f"must be the certificate's SHA-256 fingerprint, 64 hex digits (colons allowed), as `openssl x509 -noout -fingerprint -sha256` prints it (got {fp!r})")
            else:
                vals["fingerprint"] = fp.replace(":", "").lower()
    if len(p.items) != before:
        return None
    return ControllerSpec(**vals)


def _stack_list(p: _Problems, path: str, v: Any) -> tuple[StackSpec, ...] | None:
    if v == "auto":
        return None
    if not isinstance(v, list) or not v:
        p.add(path, f'must be "auto" or a non-empty list of compose project names or stack tables (got {v!r})')
        return None
    specs: list[StackSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(v):
        ipath = f"{path}[{i}]"
        stop_timeout: float | None = None
        kind = Kind.COMPOSE
        units: tuple[str, ...] = ()
        user = ""
        containers: tuple[str, ...] = ()
        label = engine = ""
        controller: ControllerSpec | None = None
        strategies: dict[str, Any] = {}
        if isinstance(item, dict):
            k = item.get("kind", "compose")
            if k not in tuple(x.value for x in Kind):
                p.add(f"{ipath}.kind", f"must be one of {', '.join(repr(x.value) for x in Kind)} (got {k!r})")
                continue
            kind = Kind(k)
            _unknown(p, ipath, item, {"name", "stop_timeout", "kind"} | _STRATEGY_KEYS | _KIND_KEYS.get(kind, set()))
            got_strategies = _strategies(p, ipath, item, kind)
            if got_strategies is None:
                continue
            strategies = got_strategies
            if "stop_timeout" in item:
                stop_timeout = _num(p, f"{ipath}.stop_timeout", item["stop_timeout"], lo=1, hi=3600)
            if kind is Kind.CONTROLLER:
                controller = _controller(p, ipath, item)
                if controller is None:
                    continue
            if kind is Kind.SYSTEMD:
                if "units" not in item:
                    p.add(f"{ipath}.units", 'missing (the service units to stop, e.g. ["postgresql.service"]: systemd units are never discovered)')
                    continue
                got = _units(p, f"{ipath}.units", item["units"])
                if got is None:
                    continue
                units = got
                if "user" in item:
                    u = item["user"]
                    if not isinstance(u, str) or not valid_user(u) or u == "root":
                        p.add(f"{ipath}.user", f"must be the name of the user whose --user units these are (lowercase letters, digits, '_', '-'; not root) (got {u!r})")
                        continue
                    user = u
            if kind is Kind.CONTAINER:
                got_c = _container_entry(p, ipath, item)
                if got_c is None:
                    continue
                containers, label, engine = got_c
            name = item.get("name")
            if name is None:
                p.add(f"{ipath}.name", "missing")
                continue
        else:
            name = item
        if not isinstance(name, str) or not valid_stack_name(name):
            what = "a compose project name" if kind is Kind.COMPOSE else "a stack name"
            p.add(f"{ipath}.name" if isinstance(item, dict) else ipath, f"not {what} (lowercase letters, digits, '_', '-', '.'): {name!r}")
            continue
        if name in seen:
            p.add(ipath, f"{name!r} is listed twice")
            continue
        seen.add(name)
        specs.append(StackSpec(name, stop_timeout, kind, units, user, controller, **strategies, containers=containers, label=label, engine=engine))
    held: dict[str, str] = {}
    for spec in specs:
        for what in (*(f"container {c}" for c in spec.containers), *([f"label {spec.label}"] if spec.label else [])):
            if what in held:
                p.add(path, f"{what} is in stacks {held[what]!r} and {spec.name!r}")
            held[what] = spec.name
    claimed: dict[tuple[str, str], str] = {}
    for spec in specs:
        for u in spec.units:
            if (spec.user, u) in claimed:
                p.add(path, f"unit {u} is in stacks {claimed[spec.user, u]!r} and {spec.name!r}")
            claimed[spec.user, u] = spec.name
    grouped = [s.group is not None for s in specs]
    if any(grouped) and not all(grouped):
        first = grouped.index(False)
        p.add(f"{path}[{first}].group", "missing: once one stack has a group, every stack needs one (groups stop in ascending order, a group's stacks in parallel)")
    users = sorted({s.user for s in specs if s.user})
    if len(users) > 1:
        p.add(path, f"--user units of one user only (got {', '.join(users)})")
    return tuple(specs)


def _name_list(p: _Problems, path: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        p.add(path, f"must be a list of compose project names (got {v!r})")
        return ()
    return tuple(v)


def _ssh(p: _Problems, path: str, v: Any) -> SshConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table")
        return None
    _unknown(p, path, v, {"host", "port", "user", "identity_file", "known_hosts", "connect_timeout"})
    if "password" in v:
        p.add(f"{path}.password", "passwords are not supported: use a key (identity_file)")
    d = SshConfig(host="")
    host = _str(p, f"{path}.host", v.get("host")) if "host" in v else None
    if "host" not in v:
        p.add(f"{path}.host", "missing (the guest's address or name, as reachable from the node)")
    port = _num(p, f"{path}.port", v["port"], lo=1, hi=65535, integer=True) if "port" in v else d.port
    user = _str(p, f"{path}.user", v["user"]) if "user" in v else d.user
    ident = _str(p, f"{path}.identity_file", v["identity_file"], absolute=True) if "identity_file" in v else d.identity_file
    kh = _str(p, f"{path}.known_hosts", v["known_hosts"], absolute=True) if "known_hosts" in v else d.known_hosts
    ct = _num(p, f"{path}.connect_timeout", v["connect_timeout"], lo=0.1, hi=300) if "connect_timeout" in v else d.connect_timeout
    if None in (host, port, user, ident, kh, ct):
        return None
    return SshConfig(str(host), int(port or 0), str(user), str(ident), str(kh), float(ct or 0))


_TOKEN_ID = re.compile(r"[^\s@!]+@[^\s@!]+![A-Za-z][A-Za-z0-9._-]*")
_NODE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?")
_TAG = re.compile(r"[a-z0-9_][a-z0-9_+.-]*")


def _pct(p: _Problems, path: str, v: Any) -> PctConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table")
        return None
    _unknown(p, path, v, {"path"})
    exe = _str(p, f"{path}.path", v["path"], absolute=True) if "path" in v else PctConfig.path
    return None if exe is None else PctConfig(exe)


def _agent(p: _Problems, path: str, v: Any) -> AgentConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table")
        return None
    before = len(p.items)
    _unknown(p, path, v, {"api", "pvesh", "host", "port", "token_id", "token_file", "verify", "node"})
    for secret in ("token", "token_value", "password", "secret"):
        if secret in v:
            p.add(f"{path}.{secret}", "secrets are not kept in the config: put the token's secret in token_file (mode 0600, owned by root)")
    d = AgentConfig()
    vals: dict[str, Any] = {}
    if "api" in v:
        vals["api"] = _str(p, f"{path}.api", v["api"], choices=("local", "https"))
    for key in ("pvesh", "token_file"):
        if key in v:
            vals[key] = _str(p, f"{path}.{key}", v[key], absolute=True)
    if "host" in v:
        vals["host"] = _str(p, f"{path}.host", v["host"])
    if "port" in v:
        port = _num(p, f"{path}.port", v["port"], lo=1, hi=65535, integer=True)
        vals["port"] = None if port is None else int(port)
    if "token_id" in v:
        tid = v["token_id"]
        if not isinstance(tid, str) or not _TOKEN_ID.fullmatch(tid):
            p.add(f"{path}.token_id", f"must be USER@REALM!TOKENNAME, e.g. 'root@pam!vzdump-hook' (got {tid!r})")
        vals["token_id"] = tid
    if "verify" in v:
        ver = v["verify"]
        if ver is False:
            p.add(f"{path}.verify", "TLS is always verified: give the CA file that signed the API's certificate (on a node: /etc/pve/pve-root-ca.pem), or true for the system's CAs")
        elif ver is not True:
            ver = _str(p, f"{path}.verify", ver, absolute=True)
        vals["verify"] = ver
    if "node" in v:
        node = v["node"]
        if not isinstance(node, str) or not _NODE.fullmatch(node):
            p.add(f"{path}.node", f"must be a PVE node name (got {node!r})")
        vals["node"] = node
    if vals.get("api", d.api) == "https" and "token_id" not in v:
        p.add(f"{path}.token_id", "missing (api is https: give the API token's id, USER@REALM!TOKENNAME)")
    if len(p.items) != before:
        return None
    return AgentConfig(**vals)


def _chain(p: _Problems, path: str, v: Any) -> tuple[str, ...] | None:
    if not isinstance(v, list):
        p.add(path, f"must be a list of absolute paths of hook scripts (got {v!r})")
        return None
    out: list[str] = []
    for i, item in enumerate(v):
        exe = _str(p, f"{path}[{i}]", item, absolute=True)
        if exe is None:
            return None
        if os.path.basename(exe) == "vzdump-hook" or exe in out:
            p.add(f"{path}[{i}]", f"{exe} would run twice in every phase" if exe in out else f"{exe} is this hook itself: it would call itself")
            return None
        out.append(exe)
    return tuple(out)


def _notify(p: _Problems, path: str, v: Any) -> NotifyConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table (url, format, token_file, timeout)")
        return None
    before = len(p.items)
    _unknown(p, path, v, {"url", "format", "token_file", "timeout"})
    url = _str(p, f"{path}.url", v.get("url"))
    if url is not None and not url.startswith(("http://", "https://")):
        p.add(f"{path}.url", f"must be an http:// or https:// URL (got {url!r})")
    fmt = _str(p, f"{path}.format", v["format"], choices=NOTIFY_FORMATS) if "format" in v else "json"
    token = _str(p, f"{path}.token_file", v["token_file"], absolute=True) if "token_file" in v else ""
    if token and (problem := token_file_problem(token)):
        p.add(f"{path}.token_file", problem)
    timeout = _num(p, f"{path}.timeout", v["timeout"], lo=1, hi=60) if "timeout" in v else 10.0
    if len(p.items) != before or url is None or fmt is None or token is None or timeout is None:
        return None
    return NotifyConfig(url, fmt, token, float(timeout))


def token_file_problem(path: str) -> str | None:
    """Why the API token file at `path` must not be used (absent, not a file, not root's alone), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist (put the API token's secret in it: install -m 600 -o root /dev/stdin {path})"
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != 0:
        return f"{path} must be owned by root (owner uid {st.st_uid}): chown root {path}"
    if st.st_mode & 0o077:
        return f"{path} must be readable by root alone (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}"
    return None


_GUEST_KEYS: dict[str, Callable[[_Problems, str, Any], Any]] = {
    "enabled": _bool,
    "transport": lambda p, path, v: _str(p, path, v, choices=TRANSPORTS),
    "stacks": _stack_list,
    "exclude": _name_list,
    "compose_command": lambda p, path, v: _str(p, path, v, choices=tuple(COMPOSE_COMMANDS)),
    "stop_timeout": lambda p, path, v: _num(p, path, v, lo=1, hi=3600),
    "parallel": _bool,
    "on_quiesce_error": lambda p, path, v: _str(p, path, v, choices=tuple(q.value for q in QuiescePolicy)),
    "max_downtime": lambda p, path, v: _num(p, path, v, lo=10, hi=7 * 86400),
    "marker_path": lambda p, path, v: _str(p, path, v, absolute=True),
    "command_timeout": lambda p, path, v: _num(p, path, v, lo=1, hi=3600),
    "resume_wait": lambda p, path, v: _num(p, path, v, lo=0, hi=3600),
    "early_resume": _bool,
    "ssh": lambda p, path, v: None,  # validated after merging, see _guest
    "pct": lambda p, path, v: None,
    "agent": lambda p, path, v: None,
}


def _copy(v: Any) -> Any:
    """A copy of TOML data (tables, arrays, scalars): what deepcopy does for it, several times faster
    (every phase validates every guest table: this is per-guest cost)."""
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: _copy(v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = _copy(v)
    return out


def _guest(p: _Problems, path: str, vmid: int, table: Mapping[str, Any], check_files: bool = False) -> GuestConfig | None:
    before = len(p.items)
    _unknown(p, path, table, set(_GUEST_KEYS))
    values = {k: _GUEST_KEYS[k](p, f"{path}.{k}", v) for k, v in table.items() if k in _GUEST_KEYS}
    transport = values.get("transport") or "ssh"
    ssh = None
    if transport == "ssh":
        if "ssh" not in table:
            p.add(f"{path}.ssh", "missing (transport is ssh: give at least ssh.host)")
        else:
            ssh = _ssh(p, f"{path}.ssh", table["ssh"])
    pct = _pct(p, f"{path}.pct", table.get("pct", {})) if transport == "pct" or "pct" in table else None
    agent = _agent(p, f"{path}.agent", table.get("agent", {})) if transport == "agent" or "agent" in table else None
    if check_files and transport == "agent" and agent is not None and agent.api == "https":
        problem = token_file_problem(agent.token_file)
        if problem:
            p.add(f"{path}.agent.token_file", problem)
    specs = values.get("stacks") or ()
    for i, spec in enumerate(specs):
        c = spec.controller
        if c is None:
            continue
        if c.command and transport == "none":
            p.add(f"{path}.stacks[{i}].command", "needs a transport into the guest (transport is none): give the guest ssh, pct or agent, or reach the controller by url")
        if check_files and c.token_file and (problem := token_file_problem(c.token_file)):
            p.add(f"{path}.stacks[{i}].token_file", problem)
    commands = [i for i, spec in enumerate(specs) if spec.controller is not None and spec.controller.command]
    if len(commands) > 1:
        p.add(f"{path}.stacks[{commands[1]}].command", "one controller reached by a command per guest (the guest's restricted-key wrapper passes one)")
    if transport == "none" and (not specs or any(s.controller is None or s.controller.command for s in specs)):
        p.add(f"{path}.transport", '"none" only for a guest whose stacks are all controllers reached by url (the hook cannot reach anything else in it)')
    if len(p.items) != before:
        return None
    cc = values.get("compose_command")
    repl: dict[str, Any] = {k: v for k, v in values.items() if k not in {"transport", "ssh", "pct", "agent", "compose_command"}}
    if "exclude" in repl:
        repl["exclude"] = tuple(repl["exclude"])
    if "on_quiesce_error" in repl:
        repl["on_quiesce_error"] = QuiescePolicy(repl["on_quiesce_error"])
    for k in ("stop_timeout", "max_downtime", "command_timeout", "resume_wait"):
        if k in repl:
            repl[k] = float(repl[k])
    repl.setdefault("stacks", None)
    return GuestConfig(vmid=vmid, transport=transport, ssh=ssh, table=dict(table), pct=pct, agent=agent,
                       compose_command=COMPOSE_COMMANDS[cc] if cc else None, **repl)


def _valid_defaults(p: _Problems, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Report problems of [defaults] once, under their own path; only the valid keys are inherited."""
    _unknown(p, "defaults", defaults, set(_GUEST_KEYS))
    kept: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in _GUEST_KEYS:
            continue
        before = len(p.items)
        if key == "ssh":
            if isinstance(value, dict) and "host" in value:
                p.add("defaults.ssh.host", "a host is per guest: set it in [guests.VMID.ssh]")
            _ssh(p, "defaults.ssh", {"host": "-", **value} if isinstance(value, dict) else value)
        elif key == "pct":
            _pct(p, "defaults.pct", value)
        elif key == "agent":
            a = _agent(p, "defaults.agent", value)
            if a is not None and a.api == "https" and (problem := token_file_problem(a.token_file)):
                p.add("defaults.agent.token_file", problem)
        else:
            _GUEST_KEYS[key](p, f"defaults.{key}", value)
        if len(p.items) == before:
            kept[key] = value
    return kept


def validate_guest(vmid: int, table: Mapping[str, Any], path: str | None = None) -> GuestConfig:
    """A GuestConfig from a merged guest table (defaults already applied). Raises ConfigError."""
    p = _Problems()
    g = _guest(p, path or f"guests.{vmid}", vmid, table)
    if g is None:
        raise ConfigError(p.items)
    return g


def _vmid(key: str) -> int | None:
    if not key.isdigit() or key.startswith("0"):
        return None
    v = int(key)
    return v if 100 <= v <= 999_999_999 else None


def parse(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate a parsed TOML document. Raises ConfigError listing every problem with its key path."""
    p = _Problems()
    _unknown(p, "(top level)", data, {"hook", "defaults", "guests"})
    hook_raw = data.get("hook", {})
    hook = HookSettings()
    if not isinstance(hook_raw, dict):
        p.add("hook", "must be a table")
    else:
        _unknown(p, "hook", hook_raw, {"state_dir", "run_dir", "phase_timeout", "sweep_timeout", "pve_dir", "tag", "qmp_dir", "chain", "chain_timeout", "metrics_file", "notify", "ledger_dir", "resident"})
        vals: dict[str, Any] = {}
        if "resident" in hook_raw:
            vals["resident"] = _bool(p, "hook.resident", hook_raw["resident"])
        if "chain" in hook_raw:
            vals["chain"] = _chain(p, "hook.chain", hook_raw["chain"])
        if "metrics_file" in hook_raw:
            mf = hook_raw["metrics_file"]
            vals["metrics_file"] = mf if mf == "" else _str(p, "hook.metrics_file", mf, absolute=True)
        if "notify" in hook_raw:
            vals["notify"] = _notify(p, "hook.notify", hook_raw["notify"])
        if "chain_timeout" in hook_raw:
            n = _num(p, "hook.chain_timeout", hook_raw["chain_timeout"], lo=1, hi=7 * 86400)
            vals["chain_timeout"] = None if n is None else float(n)
        if "tag" in hook_raw:
            tag = hook_raw["tag"]
            if not isinstance(tag, str) or (tag and not _TAG.fullmatch(tag)):
                p.add("hook.tag", f'must be a PVE tag (lowercase letters, digits, "_", "-", "+", ".") or "" for no opt-in by tag (got {tag!r})')
                vals["tag"] = None
            else:
                vals["tag"] = tag
        for k in ("state_dir", "run_dir", "pve_dir", "qmp_dir", "ledger_dir"):
            if k in hook_raw:
                vals[k] = _str(p, f"hook.{k}", hook_raw[k], absolute=True)
        for k in ("phase_timeout", "sweep_timeout"):
            if k in hook_raw:
                n = _num(p, f"hook.{k}", hook_raw[k], lo=5, hi=86400)
                vals[k] = None if n is None else float(n)
        if None not in vals.values():
            hook = HookSettings(**vals)

    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        p.add("defaults", "must be a table")
        defaults = {}
    else:
        defaults = _valid_defaults(p, defaults)

    guests: dict[int, GuestConfig] = {}
    raw_guests = data.get("guests", {})
    if not isinstance(raw_guests, dict):
        p.add("guests", "must be a table of [guests.VMID] tables")
        raw_guests = {}
    for key, table in raw_guests.items():
        path = f"guests.{key}"
        vmid = _vmid(str(key))
        if vmid is None:
            p.add(path, "the key must be a VMID (an integer 100-999999999)")
            continue
        if not isinstance(table, dict):
            p.add(path, "must be a table")
            continue
        g = _guest(p, path, vmid, _merge(defaults, table), check_files=True)
        if g is not None:
            guests[vmid] = g
    if p.items:
        raise ConfigError(p.items, source)
    return Config(hook=hook, guests=guests, source=source, defaults=defaults)


def tagged_guest(cfg: Config, vmid: int, vmtype: str) -> GuestConfig | None:
    """The settings of a guest opted in by tag, not in the config: [defaults] with the transport of its
    type (pct for lxc, agent for qemu). None when that does not validate (reported at config load)."""
    transport = TAG_TRANSPORTS.get(vmtype)
    if transport is None:
        return None
    try:
        return validate_guest(vmid, _merge(cfg.defaults, {"transport": transport}))
    except ConfigError:
        return None


def config_path(explicit: str | None = None) -> str:
    """--config, else $VZDUMP_HOOK_CONFIG, else the default path."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


CACHE_FILE = "config-cache.json"


def _cached(key: str, cache_dir: str) -> Any:
    """The TOML data cached for the file content `key`, or None."""
    try:
        with open(os.path.join(cache_dir, CACHE_FILE)) as f:
            cached = json.load(f)
        return cached["data"] if cached["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache(key: str, data: Any, cache_dir: str) -> None:
    """Keep the TOML data as JSON for the next phase (a best effort: any failure only costs a parse)."""
    from .node import safefile

    try:
        safefile.write_atomic(os.path.join(cache_dir, CACHE_FILE), json.dumps({"key": key, "data": data}), 0o600)
    except (OSError, TypeError, ValueError, safefile.UnsafePath):  # TypeError: a TOML date, which JSON has not
        pass


def load(path: str | None = None, cache_dir: str | None = None) -> Config:
    """Read and validate the config file. Raises ConfigError (unreadable, not TOML, invalid).
    With `cache_dir` (the run dir: every phase of every job reads the same file), the parsed TOML is
    kept there as JSON next to the text it was parsed from (compared whole: no hash module to import
    in every phase): parsing TOML costs ~0.1 ms per guest table, reading the JSON a tenth of that.
    It is validated every time all the same."""
    path = config_path(path)
    try:
        with open(path, "rb") as f:
            key = f.read().decode()
        data = _cached(key, cache_dir) if cache_dir else None
        if data is None:
            data = tomllib.loads(key)
            if cache_dir:
                _cache(key, data, cache_dir)
    except FileNotFoundError:
        raise ConfigError([f"no such file (set {CONFIG_ENV} or --config, or create it from examples/config.toml)"], path) from None
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], path) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start}): not valid TOML"], path) from None
    return parse(data, path)


def warnings(cfg: Config) -> list[str]:
    """Settings that are valid one by one but contradict each other, as `key.path: why` lines.
    They do not stop a backup; `check` and `job-start` show them."""
    out: list[str] = []
    for vmid, g in sorted(cfg.guests.items()):
        if not g.enabled:
            continue
        path = f"guests.{vmid}"
        specs = g.stacks or ()
        # a container stack's containers stop one at a time, each within the stop timeout
        timeouts = [g.stop_timeout_of(s.name) * max(1, len(s.containers)) for s in specs] or [g.stop_timeout]
        worst = max(timeouts) if g.parallel else sum(timeouts)
        if worst > g.max_downtime:
            what = "the stop timeouts of its stacks add up to" if len(timeouts) > 1 and not g.parallel else "a stop may take"
            out.append(f"{path}.stop_timeout: {what} {worst:g} s, longer than max_downtime ({g.max_downtime:g} s): "
                       "the guest's recovery may start stacks while the backup still needs them down")
        if g.stacks is not None and g.exclude:
            out.append(f"{path}.exclude: ignored: stacks is an explicit list (exclude only applies to stacks = \"auto\")")
    return out
