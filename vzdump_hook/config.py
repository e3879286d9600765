"""Configuration: TOML read once, validated into frozen dataclasses; every problem names its key path.

Layout (see examples/config.toml):
    [hook]              host-side settings (state directories, per-phase deadline)
    [defaults]          per-guest settings that every [guests.VMID] table inherits
    [guests.VMID]       one table per guest; keys override [defaults], sub-tables merge key by key
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import ConfigError
from .resident.client import DEFAULT_RUN_DIR

# The stack kinds: stacks/__init__.py is the registry, stacks/KIND_table.py a kind's config table (and its
# marker record), stacks/KIND.py its driver (never imported here).
from .stacks import Kind, kind_module, kinds_in
from .stacks.checks import Problems, boolean, num, string, token_file_problem, unknown
from .stacks.table import StackSpec, stack_list
from .transports.tables import AgentConfig, PctConfig, SshConfig, agent_table, pct_table, ssh_table

DEFAULT_CONFIG_PATH = "/etc/vzdump-hook/config.toml"
CONFIG_ENV = "VZDUMP_HOOK_CONFIG"
TRANSPORTS = ("ssh", "pct", "agent", "none")  # none: no way into the guest (every stack is a controller reached by url)
TAG_TRANSPORTS = {"lxc": "pct", "qemu": "agent"}  # transport of a guest opted in by PVE tag, by guest type
DEFAULT_TAG = "vzdump-hook"
_TAG = r"[a-z0-9_][a-z0-9_+.-]*"  # a PVE tag; compiled on first use by re (every phase imports this module)
COMPOSE_COMMANDS = {"auto": None, "docker compose": ("docker", "compose"), "docker-compose": ("docker-compose",)}


class QuiescePolicy(str, Enum):
    """What a failed quiesce (stack would not stop, was killed, guest unreachable) does to the backup."""

    CONTINUE = "continue"  # back up crash-consistent, with a loud warning
    ABORT = "abort"  # start again what was stopped, then fail this guest's backup


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
    # QEMU: start the stacks once the backup job has started (qemu/watcher.py), not at backup-end
    early_resume: bool = True
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
            via = "pvesh" if self.agent.api == "local" else f"https://{self.agent.host}:{self.agent.port}"
            return f"agent {self.vmid} via {via}"
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
    # other hook scripts, run with vzdump's arguments and environment (phase/runner.py: chain)
    chain: tuple[str, ...] = ()
    chain_timeout: float = 3600.0  # bound for one chained script in one phase; killed after it
    metrics_file: str = ""  # node_exporter textfile written at job-end (node/report.py); "" = off
    notify: NotifyConfig | None = None  # webhook at job-end (node/report.py)
    ledger_dir: str = ""  # "": pve_dir/priv/vzdump-hook/ledger on a PVE node, else state_dir/ledger (node/ledger.py)
    # one process per guest from the stop to the start (resident/process.py); false: the phases alone
    resident: bool = True


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


def _name_list(p: Problems, path: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        p.add(path, f"must be a list of compose project names (got {v!r})")
        return ()
    return tuple(v)


def _chain(p: Problems, path: str, v: Any) -> tuple[str, ...] | None:
    if not isinstance(v, list):
        p.add(path, f"must be a list of absolute paths of hook scripts (got {v!r})")
        return None
    out: list[str] = []
    for i, item in enumerate(v):
        exe = string(p, f"{path}[{i}]", item, absolute=True)
        if exe is None:
            return None
        if os.path.basename(exe) == "vzdump-hook" or exe in out:
            p.add(f"{path}[{i}]", f"{exe} would run twice in every phase" if exe in out
                                  else f"{exe} is this hook itself: it would call itself")
            return None
        out.append(exe)
    return tuple(out)


def _notify(p: Problems, path: str, v: Any) -> NotifyConfig | None:
    if not isinstance(v, dict):
        p.add(path, "must be a table (url, format, token_file, timeout)")
        return None
    before = len(p.items)
    unknown(p, path, v, {"url", "format", "token_file", "timeout"})
    url = string(p, f"{path}.url", v.get("url"))
    if url is not None and not url.startswith(("http://", "https://")):
        p.add(f"{path}.url", f"must be an http:// or https:// URL (got {url!r})")
    fmt = string(p, f"{path}.format", v["format"], choices=NOTIFY_FORMATS) if "format" in v else "json"
    token = string(p, f"{path}.token_file", v["token_file"], absolute=True) if "token_file" in v else ""
    if token and (problem := token_file_problem(token)):
        p.add(f"{path}.token_file", problem)
    timeout = num(p, f"{path}.timeout", v["timeout"], lo=1, hi=60) if "timeout" in v else 10.0
    if len(p.items) != before or url is None or fmt is None or token is None or timeout is None:
        return None
    return NotifyConfig(url, fmt, token, float(timeout))


_GUEST_KEYS: dict[str, Callable[[Problems, str, Any], Any]] = {
    "enabled": boolean,
    "transport": lambda p, path, v: string(p, path, v, choices=TRANSPORTS),
    "stacks": stack_list,
    "exclude": _name_list,
    "compose_command": lambda p, path, v: string(p, path, v, choices=tuple(COMPOSE_COMMANDS)),
    "stop_timeout": lambda p, path, v: num(p, path, v, lo=1, hi=3600),
    "parallel": boolean,
    "on_quiesce_error": lambda p, path, v: string(p, path, v, choices=tuple(q.value for q in QuiescePolicy)),
    "max_downtime": lambda p, path, v: num(p, path, v, lo=10, hi=7 * 86400),
    "marker_path": lambda p, path, v: string(p, path, v, absolute=True),
    "command_timeout": lambda p, path, v: num(p, path, v, lo=1, hi=3600),
    "resume_wait": lambda p, path, v: num(p, path, v, lo=0, hi=3600),
    "early_resume": boolean,
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


def _guest(p: Problems, path: str, vmid: int, table: Mapping[str, Any],
           check_files: bool = False) -> GuestConfig | None:
    before = len(p.items)
    unknown(p, path, table, set(_GUEST_KEYS))
    values = {k: _GUEST_KEYS[k](p, f"{path}.{k}", v) for k, v in table.items() if k in _GUEST_KEYS}
    transport = values.get("transport") or "ssh"
    ways = _ways_in(p, path, table, transport, check_files)
    specs: tuple[StackSpec, ...] = values.get("stacks") or ()
    for kind in kinds_in(specs):
        p.extend(kind_module(kind).check_guest(f"{path}.stacks", specs, transport, check_files))
    if transport == "none" and (not specs or any(s.table.in_guest for s in specs)):
        p.add(f"{path}.transport", '"none" only for a guest whose stacks are all controllers reached by url '
              "(the hook cannot reach anything else in it)")
    if len(p.items) != before:
        return None
    cc = values.get("compose_command")
    repl: dict[str, Any] = {k: v for k, v in values.items()
                            if k not in {"transport", "ssh", "pct", "agent", "compose_command"}}
    if "exclude" in repl:
        repl["exclude"] = tuple(repl["exclude"])
    if "on_quiesce_error" in repl:
        repl["on_quiesce_error"] = QuiescePolicy(repl["on_quiesce_error"])
    for k in ("stop_timeout", "max_downtime", "command_timeout", "resume_wait"):
        if k in repl:
            repl[k] = float(repl[k])
    repl.setdefault("stacks", None)
    return GuestConfig(vmid=vmid, transport=transport, ssh=ways[0], table=dict(table), pct=ways[1], agent=ways[2],
                       compose_command=COMPOSE_COMMANDS[cc] if cc else None, **repl)


def _ways_in(p: Problems, path: str, table: Mapping[str, Any], transport: str,
             check_files: bool) -> tuple[SshConfig | None, PctConfig | None, AgentConfig | None]:
    """The guest's ssh, pct and agent tables: the one of its transport, and any other it gives."""
    ssh = None
    if transport == "ssh":
        if "ssh" not in table:
            p.add(f"{path}.ssh", "missing (transport is ssh: give at least ssh.host)")
        else:
            ssh = ssh_table(p, f"{path}.ssh", table["ssh"])
    pct = pct_table(p, f"{path}.pct", table.get("pct", {})) if transport == "pct" or "pct" in table else None
    agent = (agent_table(p, f"{path}.agent", table.get("agent", {}))
             if transport == "agent" or "agent" in table else None)
    if check_files and transport == "agent" and agent is not None and agent.api == "https":
        problem = token_file_problem(agent.token_file)
        if problem:
            p.add(f"{path}.agent.token_file", problem)
    return ssh, pct, agent


def _valid_defaults(p: Problems, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Report problems of [defaults] once, under their own path; only the valid keys are inherited."""
    unknown(p, "defaults", defaults, set(_GUEST_KEYS))
    kept: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in _GUEST_KEYS:
            continue
        before = len(p.items)
        if key == "ssh":
            if isinstance(value, dict) and "host" in value:
                p.add("defaults.ssh.host", "a host is per guest: set it in [guests.VMID.ssh]")
            ssh_table(p, "defaults.ssh", {"host": "-", **value} if isinstance(value, dict) else value)
        elif key == "pct":
            pct_table(p, "defaults.pct", value)
        elif key == "agent":
            a = agent_table(p, "defaults.agent", value)
            if a is not None and a.api == "https" and (problem := token_file_problem(a.token_file)):
                p.add("defaults.agent.token_file", problem)
        else:
            _GUEST_KEYS[key](p, f"defaults.{key}", value)
        if len(p.items) == before:
            kept[key] = value
    return kept


def validate_guest(vmid: int, table: Mapping[str, Any], path: str | None = None) -> GuestConfig:
    """A GuestConfig from a merged guest table (defaults already applied). Raises ConfigError."""
    p = Problems()
    g = _guest(p, path or f"guests.{vmid}", vmid, table)
    if g is None:
        raise ConfigError(p.items)
    return g


def recorded_guest(vmid: int, table: Mapping[str, Any], where: str, what: str = "recorded settings",
                   then: str = "") -> GuestConfig | None:
    """The settings a record kept (a host record, a ledger entry), validated again: the file may have
    been edited since. None, with a WARNING naming `where` and `what` (and `then`), when unusable."""
    try:
        return validate_guest(vmid, table)
    except ConfigError as e:
        logging.getLogger("vzdump_hook").warning("%s: %s unusable (%s)%s", where, what, e, then)
        return None


def _vmid(key: str) -> int | None:
    if not key.isdigit() or key.startswith("0"):
        return None
    v = int(key)
    return v if 100 <= v <= 999_999_999 else None


def parse(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate a parsed TOML document. Raises ConfigError listing every problem with its key path."""
    p = Problems()
    unknown(p, "(top level)", data, {"hook", "defaults", "guests"})
    hook = _hook(p, data.get("hook", {}))
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        p.add("defaults", "must be a table")
        defaults = {}
    else:
        defaults = _valid_defaults(p, defaults)
    guests = _guests(p, data.get("guests", {}), defaults)
    if p.items:
        raise ConfigError(p.items, source)
    return Config(hook=hook, guests=guests, source=source, defaults=defaults)


_HOOK_KEYS = {"state_dir", "run_dir", "phase_timeout", "sweep_timeout", "pve_dir", "tag", "qmp_dir", "chain",
              "chain_timeout", "metrics_file", "notify", "ledger_dir", "resident"}


def _hook(p: Problems, raw: Any) -> HookSettings:
    """[hook]; its defaults where it has a problem (reported)."""
    if not isinstance(raw, dict):
        p.add("hook", "must be a table")
        return HookSettings()
    unknown(p, "hook", raw, _HOOK_KEYS)
    vals: dict[str, Any] = {}
    if "resident" in raw:
        vals["resident"] = boolean(p, "hook.resident", raw["resident"])
    if "chain" in raw:
        vals["chain"] = _chain(p, "hook.chain", raw["chain"])
    if "metrics_file" in raw:
        mf = raw["metrics_file"]
        vals["metrics_file"] = mf if mf == "" else string(p, "hook.metrics_file", mf, absolute=True)
    if "notify" in raw:
        vals["notify"] = _notify(p, "hook.notify", raw["notify"])
    if "chain_timeout" in raw:
        n = num(p, "hook.chain_timeout", raw["chain_timeout"], lo=1, hi=7 * 86400)
        vals["chain_timeout"] = None if n is None else float(n)
    if "tag" in raw:
        tag = raw["tag"]
        if not isinstance(tag, str) or (tag and not re.fullmatch(_TAG, tag)):
            p.add("hook.tag", 'must be a PVE tag (lowercase letters, digits, "_", "-", "+", ".") or "" '
                  f"for no opt-in by tag (got {tag!r})")
            vals["tag"] = None
        else:
            vals["tag"] = tag
    for k in ("state_dir", "run_dir", "pve_dir", "qmp_dir", "ledger_dir"):
        if k in raw:
            vals[k] = string(p, f"hook.{k}", raw[k], absolute=True)
    for k in ("phase_timeout", "sweep_timeout"):
        if k in raw:
            n = num(p, f"hook.{k}", raw[k], lo=5, hi=86400)
            vals[k] = None if n is None else float(n)
    return HookSettings(**vals) if None not in vals.values() else HookSettings()


def _guests(p: Problems, raw: Any, defaults: Mapping[str, Any]) -> dict[int, GuestConfig]:
    """[guests.VMID], each merged onto the valid [defaults]; the valid ones."""
    guests: dict[int, GuestConfig] = {}
    if not isinstance(raw, dict):
        p.add("guests", "must be a table of [guests.VMID] tables")
        return guests
    for key, table in raw.items():
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
    return guests


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
        raise ConfigError([f"no such file (set {CONFIG_ENV} or --config, "
                           "or create it from examples/config.toml)"], path) from None
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
        timeouts = [s.table.stop_bound(g.stop_timeout_of(s.name)) for s in specs] or [g.stop_timeout]
        worst = max(timeouts) if g.parallel else sum(timeouts)
        if worst > g.max_downtime:
            what = ("the stop timeouts of its stacks add up to" if len(timeouts) > 1 and not g.parallel
                    else "a stop may take")
            out.append(f"{path}.stop_timeout: {what} {worst:g} s, longer than max_downtime ({g.max_downtime:g} s): "
                       "the guest's recovery may start stacks while the backup still needs them down")
        if g.stacks is not None and g.exclude:
            out.append(f"{path}.exclude: ignored: stacks is an explicit list "
                       "(exclude only applies to stacks = \"auto\")")
    return out
