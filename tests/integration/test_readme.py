"""README.md and docs/*.md are checked against the program: every sample output block in them is
marked, either `<!-- sample: NAME -->` (produced here by running the command against the test guest
and compared line by line, after the normalisation below) or `<!-- abridged: why -->` (an excerpt, not
compared). A sample may live in any of these files (README.md keeps the install steps' sample, the
configuration reference the rest); each name is one block in all of them together. The files in
NOT_OUTPUT are the exceptions: their plain blocks are not the program's output (diagrams, command
synopses), so they are not held to the marks.

README.md is the front door: at most 300 lines, none over 300 characters (long table cells belong in
docs/, as prose or lists). Every relative link in these files leads to a file that exists and, into a
Markdown file, to a heading it has.

Normalisation, applied to the document's block and to the program's output alike: durations
(`0.4 s`) become `N s`; the test guest's address becomes the documents' 192.0.2.10:22, the test's
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

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# docs whose plain fenced blocks are not the program's output, and why
NOT_OUTPUT = {
    "docs/controller-api.md": "the controller contract: a diagram and command synopses",
    "docs/design.md": "the design notes: vzdump's phase order drawn as a plain block",
}
README_MAX_LINES = 300
MAX_LINE = 300
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


def documents() -> list[Path]:
    """README.md and every Markdown file in docs/."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def all_blocks() -> list[tuple[str, str, str, list[str]]]:
    """(document, mark kind, mark name, lines) of every output block of every document."""
    return [(rel(doc), *block) for doc in documents() for block in blocks(doc.read_text())]


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
    unmarked = [(doc, name) for doc, kind, name, _ in all_blocks() if not kind and doc not in NOT_OUTPUT]
    assert unmarked == [], "output blocks in README.md or docs/ without <!-- sample: --> or <!-- abridged: -->"
    samples = [name for _, kind, name, _ in all_blocks() if kind == "sample"]
    assert sorted(samples) == sorted(SAMPLES), "each sample block needs a producer here, and each producer one block"


def test_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move details to docs/"
    long = [(n, len(line)) for n, line in enumerate(lines, 1) if len(line) > MAX_LINE]
    assert long == [], f"README.md lines over {MAX_LINE} characters (line, length): rewrite them as prose or lists"


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    out: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} +(.*?) *#* *$", line)):
            slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
            n = 0
            while (slug if n == 0 else f"{slug}-{n}") in out:
                n += 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(text: str) -> list[str]:
    """Targets of the Markdown links outside code blocks and code spans."""
    out = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out += [m["target"] for m in LINK.finditer(CODE_SPAN.sub("", line))]
    return out


def test_relative_links_lead_somewhere() -> None:
    broken = []
    for doc in documents():
        for target in links(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists() or not dest.is_relative_to(ROOT):
                broken.append((rel(doc), target, "no such file"))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                broken.append((rel(doc), target, "no such heading"))
    assert broken == []


def run(setup: HookSetup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([installed_hook(), *args], env=setup.env | {"PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


def sample_check(tmp: Path, test_guest: Any, compose_project: Any) -> tuple[list[str], dict[str, str]]:
    projects = {name: compose_project(name, {"app": "sleeper"}) for name in ("db", "web", "monitoring")}
    for p in projects.values():
        compose.up(p)
    setup = HookSetup(tmp)
    setup.write({101: (test_guest, {"stacks": [projects["db"].name, {"name": projects["web"].name, "stop_timeout": 60}],
                                    "on_quiesce_error": "abort", "compose_command": "docker compose"})})
    r = run(setup, "check")
    assert r.returncode == 1, r.stdout + r.stderr  # as in the README's step 3: no recovery program in the guest yet
    subst = {p.name: short for short, p in projects.items()}
    subst |= {f"{test_guest.host}:{test_guest.port}": "192.0.2.10:22",
              str(setup.config): "/etc/vzdump-hook/config.toml"}
    return r.stdout.splitlines(), subst


def sample_check_tags(tmp: Path, test_guest: Any, compose_project: Any) -> tuple[list[str], dict[str, str]]:
    pve = tmp / "pve"
    for vmid, kind in ((201, "lxc"), (202, "qemu-server"), (203, "qemu-server")):
        (pve / "nodes" / "pve1" / kind).mkdir(parents=True, exist_ok=True)
        tags = "tags: vzdump-hook\n" if vmid != 203 else "tags: web\n"
        (pve / "nodes" / "pve1" / kind / f"{vmid}.conf").write_text(f"cores: 2\n{tags}"
                                                                     + ("agent: 1\n" if kind == "qemu-server" else ""))
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


@pytest.mark.engine_alone  # sample_check_tags: a guest with no stacks list ("auto")
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_output_is_what_the_program_prints(name: str, tmp_path: Path, test_guest: Any,
                                                  compose_project: Any) -> None:
    (documented,) = [body for _, kind, n, body in all_blocks() if kind == "sample" and n == name]
    actual, subst = SAMPLES[name](tmp_path, test_guest, compose_project)
    assert normalise(actual, subst) == normalise(documented)
