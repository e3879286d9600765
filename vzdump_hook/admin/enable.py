"""`vzdump-hook enable`: name the hook in /etc/vzdump.conf. vzdump takes one `script:`; an existing
one is moved into `[hook] chain` of the config (chain.py runs it as before), never dropped."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

from ..errors import HookError

LAUNCHER = "/usr/local/bin/vzdump-hook"  # scripts/install.sh
PACKAGED_LAUNCHER = "/usr/bin/vzdump-hook"  # the Debian package
DEBIAN_SITE = "/usr/lib/python3/dist-packages/"


def default_launcher(module_file: str = __file__) -> str:
    """The launcher of this installation: the Debian package's when this module is Debian's system
    python3 package (dist-packages under /usr/lib), else scripts/install.sh's."""
    return PACKAGED_LAUNCHER if os.path.realpath(module_file).startswith(DEBIAN_SITE) else LAUNCHER
_SCRIPT = re.compile(r"^\s*script\s*:\s*(?P<path>\S.*?)\s*$")
_HOOK_TABLE = re.compile(r"^\s*\[\s*hook\s*\]\s*(#.*)?$")


@dataclass(frozen=True)
class Plan:
    vzdump_conf: str  # the new text of vzdump.conf
    moved: tuple[str, ...]  # scripts that go into [hook] chain
    already: bool  # vzdump.conf names the hook already, nothing else


def read(path: str) -> str:
    """The text of `path`, "" when it does not exist."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def script_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(index, path) of the `script:` lines of vzdump.conf's `lines`."""
    return [(i, m["path"]) for i, line in enumerate(lines) if (m := _SCRIPT.match(line))]


def plan(vzdump_conf: str, launcher: str = LAUNCHER) -> Plan:
    """What vzdump.conf becomes: its `script:` lines (there should be one) commented out and moved to
    the chain, one `script: LAUNCHER` line in place of the first."""
    lines = vzdump_conf.splitlines(keepends=True)
    scripts = script_lines(lines)
    others = tuple(dict.fromkeys(p for _, p in scripts if p != launcher))
    if [p for _, p in scripts] == [launcher]:
        return Plan(vzdump_conf, (), True)
    out = list(lines)
    for i, path in scripts:
        out[i] = "" if path == launcher else f"# script: {path}   # moved to [hook] chain by vzdump-hook enable\n"
    ours = f"script: {launcher}\n"
    if scripts:
        out[scripts[0][0]] = ours + out[scripts[0][0]]
    else:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(ours)
    return Plan("".join(out), others, False)


def with_chain(config_text: str, scripts: tuple[str, ...], source: str) -> str:
    """The config's text with `scripts` appended to [hook] chain. Raises HookError when that cannot be
    done by adding one line (the config has a chain already, or does not parse)."""
    try:
        data = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as e:
        raise HookError(f"{source}: not valid TOML ({e}): fix it first (vzdump-hook check)") from None
    hook = data.get("hook", {})
    if isinstance(hook, dict) and "chain" in hook:
        have = list(hook["chain"]) if isinstance(hook["chain"], list) else []
        todo = [s for s in scripts if s not in have]
        if not todo:
            return config_text
        raise HookError(f"{source}: [hook] chain exists already: add {', '.join(todo)} to it yourself")
    line = ("chain = [" + ", ".join(_toml_str(s) for s in scripts)
            + "]   # run after vzdump-hook, as vzdump would run them (vzdump-hook enable)\n")
    lines = config_text.splitlines(keepends=True)
    at = next((i for i, raw in enumerate(lines) if _HOOK_TABLE.match(raw)), None)
    if at is None:
        new = "[hook]\n" + line + "\n" + config_text
    else:
        new = "".join(lines[: at + 1]) + line + "".join(lines[at + 1 :])
    try:
        chain = tomllib.loads(new)["hook"]["chain"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise HookError(f"{source}: adding the chain would break the config ({e}): add it yourself") from None
    if chain != list(scripts) or any(not s.startswith("/") for s in scripts):
        raise HookError(f"{source}: the scripts must be absolute paths: {', '.join(scripts)}")
    return new


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(path: str, text: str) -> None:
    """Replace the file at `path` (a symlink's target, e.g. a config on /etc/pve) atomically, keeping its mode."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    from ..node import safefile

    safefile.write_atomic(real, text, mode)


def job_scripts(pve_dir: str) -> tuple[str, list[str]]:
    """jobs.cfg of `pve_dir` and the scripts its backup jobs set themselves (those jobs do not run vzdump.conf's)."""
    jobs = os.path.join(pve_dir, "jobs.cfg")
    try:
        with open(jobs) as f:
            own = [line.split(None, 1)[1].strip() for line in f if line.strip().startswith("script ")]
    except (OSError, IndexError):
        own = []
    return jobs, sorted(set(own))
