"""README.md is checked against the program: every sample output block in it is marked, either
`<!-- sample: NAME -->` (produced here by running the command against the test guest and compared
line by line, after the normalisation below) or `<!-- abridged: why -->` (an excerpt, not compared).

Normalisation, applied to the README's block and to the program's output alike: durations
(`0.4 s`) become `N s`; the test guest's address becomes the README's 192.0.2.10:22, the test's
config path /etc/vzdump-hook/config.toml, and the test's compose project names
(`vzdh-t-PID-N-db`) their short names; in `running stacks:` lines, projects of other test runs on
the shared Docker engine are left out and the rest sorted."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.integration.hookenv import HookSetup, installed_hook

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\S*)\s*$")
MARK = re.compile(r"<!-- (?P<kind>sample|abridged): ?(?P<name>[^>]*?) ?-->")


def blocks(text: str) -> list[tuple[str, str, list[str]]]:
    """(mark kind, mark name, lines) of every fenced block without a language: output blocks."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m["indent"], m["lang"]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if not lang:
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = MARK.search(prev)
            body = [line[len(indent):] for line in lines[i + 1:end]]
            out.append((mark["kind"] if mark else "", mark["name"] if mark else lines[i + 1][:60], body))
        i = end + 1
    return out


def normalise(lines: list[str], subst: dict[str, str] | None = None) -> list[str]:
    out = []
    for line in lines:
        for old, new in (subst or {}).items():
            line = line.replace(old, new)
        line = re.sub(r"\b\d+(\.\d+)? s\b", "N s", line)
        if line.strip().startswith("running stacks:") and subst is not None:
            # the engine may run anything else (other tests' projects, the machine's own): only the
            # sample's own projects, named by the substitutions, are the sample's
            own = set(subst.values())
            names = sorted(n.strip() for n in line.split(":", 1)[1].split(", ") if n.strip() in own)
            line = line.split(":", 1)[0] + ": " + ", ".join(names)
        out.append(line.rstrip())
    return out


def test_every_output_block_is_a_checked_sample_or_marked_abridged() -> None:
    unmarked = [name for kind, name, _ in blocks(README.read_text()) if not kind]
    assert unmarked == [], "output blocks in README.md without <!-- sample: --> or <!-- abridged: -->"
    samples = [name for kind, name, _ in blocks(README.read_text()) if kind == "sample"]
    assert sorted(samples) == sorted(SAMPLES), "each sample block needs a producer here, and each producer a block"


def run(setup: HookSetup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([installed_hook(), *args], env=setup.env | {"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)


def sample_check(tmp: Path, test_guest: Any, compose_project: Any) -> tuple[list[str], dict[str, str]]:
    projects = {name: compose_project(name, {"app": "sleeper"}) for name in ("db", "web", "monitoring")}
    for p in projects.values():
        compose.up(p)
    setup = HookSetup(tmp)
    setup.write({101: (test_guest, {"stacks": [projects["db"].name, {"name": projects["web"].name, "stop_timeout": 60}],
                                    "on_quiesce_error": "abort", "compose_command": "docker compose"})})
    r = run(setup, "check")
    assert r.returncode == 1, r.stdout + r.stderr  # as in the README's step: no recovery program in the guest yet
    subst = {p.name: short for short, p in projects.items()}
    subst |= {f"{test_guest.host}:{test_guest.port}": "192.0.2.10:22", str(setup.config): "/etc/vzdump-hook/config.toml"}
    return r.stdout.splitlines(), subst


def sample_check_tags(tmp: Path, test_guest: Any, compose_project: Any) -> tuple[list[str], dict[str, str]]:
    pve = tmp / "pve"
    for vmid, kind in ((201, "lxc"), (202, "qemu-server"), (203, "qemu-server")):
        (pve / "nodes" / "pve1" / kind).mkdir(parents=True, exist_ok=True)
        tags = "tags: vzdump-hook\n" if vmid != 203 else "tags: web\n"
        (pve / "nodes" / "pve1" / kind / f"{vmid}.conf").write_text(f"cores: 2\n{tags}" + ("agent: 1\n" if kind == "qemu-server" else ""))
    setup = HookSetup(tmp)
    setup.hook_table = {"pve_dir": str(pve)}
    setup.write({101: (test_guest, {})})
    r = run(setup, "check", "--no-connect")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines(), {str(setup.config): "/etc/vzdump-hook/config.toml"}


SAMPLES: dict[str, Callable[[Path, Any, Any], tuple[list[str], dict[str, str]]]] = {
    "check": sample_check,
    "check-tags": sample_check_tags,
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_output_is_what_the_program_prints(name: str, tmp_path: Path, test_guest: Any, compose_project: Any) -> None:
    (readme,) = [body for kind, n, body in blocks(README.read_text()) if kind == "sample" and n == name]
    actual, subst = SAMPLES[name](tmp_path, test_guest, compose_project)
    assert normalise(actual, subst) == normalise(readme)
