"""Fuzzing the wrapper's argument checks (examples/guest/vzdump-hook-wrapper, dash and busybox sh): a
command line near one of the hook's (a word replaced, inserted or removed, a character edited, the
spaces between words doubled, leading or trailing, or tabs) is accepted only if it is exactly a line
the hook sends for this guest."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.fuzz.profile import budget
from tests.guest_sh.conftest import SHELLS, WRAPPER, Guest, make_guest
from tests.guest_sh.fakedocker import cid
from vzdump_hook.stacks import compose as compose_mod
from vzdump_hook.stacks import container as container_mod
from vzdump_hook.stacks.table import valid_stack_name
from vzdump_hook.transports import base
from vzdump_hook.transports.base import sh

PROJECTS = {  # name -> (workdir, files, services)
    "db": ("/srv/db", ("/srv/db/compose.yaml",), ("app", "worker")),
    "web": ("/srv/web", ("/srv/web/compose.yaml", "/srv/web/over ride.yaml"), ("app",)),
}
IDS = [cid(n, i) for n, (_, _, svcs) in PROJECTS.items() for i in range(len(svcs))]
INSPECT = "{{.Id}} {{.State.Running}} {{.State.Restarting}} {{.State.ExitCode}}"
SERVICES = '{{.Label "com.docker.compose.service"}}'
LIST = ["docker", "ps", "--no-trunc", "--filter", "label=com.docker.compose.project", "--filter", "status=running",
        "--format", compose_mod._LIST_FORMAT]
CLIS = (("docker", "compose"), ("docker-compose",))
# container stacks: one container by name (db's worker), and web's containers by a label
CONTAINERS, LABELS = ["db-worker-1"], ["com.docker.compose.project=web"]
CONTAINER_IDS = [cid("db", 1), cid("web", 0)]
ENGINES = ("docker", "podman")
# the guest's controller (kind controller): a stand-in that does nothing, at CTL under the guest's root
CTL = "ctl"
JOB = "pve1/0f0f0f0f-1111/4242/1000"
PHASES = ("quiesce", "snapshotted", "done", "failed", "abort", "status")


def _digits(w: str, n: int) -> bool:
    return w.isascii() and w.isdigit() and 1 <= len(w) <= n


def _ids(words: Sequence[str], known: bool) -> bool:
    """Container ids: of a compose project's containers, by full id, when `known` (a stop or start)."""
    ok = bool(words) and all(re.fullmatch(r"[0-9a-f]{12,64}", w) for w in words)
    return ok and (not known or all(w in IDS for w in words))


def controller_sends(words: list[str]) -> bool:
    """True when `CTL signal WORDS` is a message of the controller contract (docs/controller-api.md)."""
    if not words or words[0] not in PHASES:
        return False
    opts = words[1:]
    if len(opts) % 2 or len({opts[i] for i in range(0, len(opts), 2)}) != len(opts) // 2:
        return False
    given = dict(zip(opts[::2], opts[1::2], strict=True))
    checks = {"--job": lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]*", v) is not None and len(v) <= 200,
              "--vmid": lambda v: re.fullmatch(r"[1-9][0-9]{0,8}", v) is not None,
              "--mode": lambda v: v in ("snapshot", "suspend", "stop"),
              "--deadline": lambda v: re.fullmatch(r"[0-9]+(\.[0-9]*)?", v) is not None and len(v) <= 20,
              "--answer-within": lambda v: re.fullmatch(r"[0-9]+(\.[0-9]*)?", v) is not None and len(v) <= 20}
    if any(k not in checks or not checks[k](v) for k, v in given.items()):
        return False
    quiesce_only = {"--mode", "--deadline", "--answer-within"}
    if words[0] == "status":
        return not given
    if words[0] == "quiesce":
        return set(given) == set(checks)
    return {"--job", "--vmid"} <= set(given) and not quiesce_only & set(given)


def hook_sends(argv: list[str], marker: str, ctl: str = "") -> bool:
    """True when `argv` is a command line vzdump-hook sends to this guest (transports/base.py,
    stacks/compose.py, guest_install.py)."""
    if argv in (["true"], sh(compose_mod._DETECT), LIST, sh(base._WRITE_SCRIPT, marker),
                sh(base._REMOVE_SCRIPT, marker)):
        return True
    if argv[:-1] == sh(base._READ_SCRIPT, marker):
        return _digits(argv[-1], 9)
    if (len(argv) == 8 and argv[:3] == ["docker", "ps", "--filter"]
            and argv[4:] == ["--filter", "status=running", "--format", SERVICES]):
        return argv[3].startswith("label=com.docker.compose.project=") and valid_stack_name(argv[3].split("=", 2)[2])
    if argv[:4] == ["docker", "inspect", "--format", INSPECT]:
        return _ids(argv[4:], known=False)
    if argv[:3] == ["docker", "stop", "-t"] and len(argv) > 3:
        return _digits(argv[3], 6) and _ids(argv[4:], known=True)
    if argv[:2] == ["docker", "start"]:
        return _ids(argv[2:], known=True)
    for name, (wd, files, svcs) in PROJECTS.items():
        for cli in CLIS:
            head = sh(compose_mod._IN_DIR, wd, *cli, "-p", name, *[w for f in files for w in ("-f", f)])
            if argv[: len(head)] == head:
                tail = argv[len(head):]
                if tail[:2] == ["stop", "-t"] and len(tail) == 3:
                    return _digits(tail[2], 6)
                return tail[:1] == ["start"] and all(s in svcs for s in tail[1:])
    if argv == sh(container_mod.DETECT):
        return True
    if argv[:1] and argv[0] in ENGINES and argv[1:2] == ["container"]:
        return container_sends(argv[2:])
    if ctl and argv[:2] == [ctl, "signal"]:
        return controller_sends(argv[2:])
    if len(argv) in (2, 3) and argv[1] == "status" and re.fullmatch(r"(.*/)?vzdump-hook-wrapper", argv[0]):
        return all(re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", w) for w in argv)
    return False


def container_sends(rest: list[str]) -> bool:
    """True when `ENGINE container REST` is a command line of the container kind for this guest."""
    listing = ["ls", "--no-trunc", "--filter", "status=running"]
    if rest in ([*listing, "--format", container_mod.LIST_FORMAT],
                *([*listing, "--filter", f"label={lb}", "--format", container_mod.LIST_FORMAT] for lb in LABELS)):
        return True
    if rest[:3] == ["inspect", "--format", container_mod.INSPECT_FORMAT]:
        return bool(rest[3:]) and all(i in CONTAINER_IDS for i in rest[3:])
    if rest[:2] == ["stop", "-t"] and len(rest) == 4:
        return _digits(rest[2], 6) and rest[3] in CONTAINER_IDS
    return len(rest) == 2 and rest[0] == "start" and rest[1] in CONTAINER_IDS


EVIL = ["; id", "$(id)", "`id`", "\nid", "id", "-v", "--privileged", "-H", "tcp://evil", "/tmp/evil",
        "/srv/db/../../etc", "db", "DB", "db ", "\uff44b", "d\u200bb", "\u2028", "..", "*", "'", '"', "\\", "-t",
        "start", "stop", "down", "exec", "run", "-f", "-p", "0", "9" * 12, "/srv/db", "/srv/web/over ride.yaml", "app",
        "worker", cid("db", 0), cid("db", 0)[:12], "ab" * 32, cid("nope", 0), "status", "container", "podman", "rm",
        "ls", "-a", "label=com.docker.compose.project=db", "label=com.docker.compose.project"]


@st.composite
def base_argvs(draw: st.DrawFn, marker: str, ctl: str) -> list[str]:
    num = draw(st.sampled_from(["0", "5", "30", "65537", "123456", "1234567"]))
    ids = draw(st.lists(st.sampled_from([*IDS, cid("nope", 1), "ab" * 32]), min_size=1, max_size=3))
    name = draw(st.sampled_from(sorted(PROJECTS)))
    wd, files, svcs = PROJECTS[name]
    cli = draw(st.sampled_from(CLIS))
    compose_head = sh(compose_mod._IN_DIR, wd, *cli, "-p", name, *[w for f in files for w in ("-f", f)])
    return draw(st.sampled_from([
        ["true"], sh(compose_mod._DETECT), LIST, sh(base._WRITE_SCRIPT, marker), sh(base._READ_SCRIPT, marker, num),
        sh(base._REMOVE_SCRIPT, marker),
        ["docker", "ps", "--filter", f"label=com.docker.compose.project={name}", "--filter", "status=running",
         "--format", SERVICES],
        ["docker", "inspect", "--format", INSPECT, *ids], ["docker", "stop", "-t", num, *ids],
        ["docker", "start", *ids],
        [*compose_head, "stop", "-t", num],
        [*compose_head, "start", *draw(st.lists(st.sampled_from(svcs), max_size=2))],
        ["/usr/local/sbin/vzdump-hook-wrapper", "status", "/etc/vzdump-hook/guest.conf"],
        *container_argvs(draw, num, ids),
        [ctl, "signal", "quiesce", "--job", JOB, "--vmid", "101", "--mode", "snapshot", "--deadline", "1700000600.5",
         "--answer-within", num],
        [ctl, "signal", draw(st.sampled_from(PHASES[1:5])), "--job", JOB, "--vmid", "101"], [ctl, "signal", "status"],
    ]))


def container_argvs(draw: st.DrawFn, num: str, ids: list[str]) -> list[list[str]]:
    """The container kind's command lines (transports as the driver sends them), on a drawn engine."""
    e = draw(st.sampled_from(ENGINES))
    ids = [*ids, *draw(st.lists(st.sampled_from(CONTAINER_IDS), max_size=2))]
    label = draw(st.sampled_from([*LABELS, "com.docker.compose.project=db"]))
    return [sh(container_mod.DETECT), container_mod.list_argv(e), container_mod.list_argv(e, label),
            [e, "container", "inspect", "--format", container_mod.INSPECT_FORMAT, *ids],
            [e, "container", "stop", "-t", num, ids[-1]], [e, "container", "start", ids[-1]]]


@st.composite
def command_lines(draw: st.DrawFn, marker: str, ctl: str) -> str:
    argv = list(draw(base_argvs(marker, ctl)))
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "edit"]))
        i = draw(st.integers(0, len(argv) - 1)) if argv else 0
        word = draw(st.sampled_from(EVIL) | st.text(max_size=6))
        if op == "replace" and argv:
            argv[i] = word
        elif op == "insert":
            argv.insert(i, word)
        elif op == "delete" and argv:
            del argv[i]
        elif argv:
            w = argv[i]
            j = draw(st.integers(0, len(w)))
            argv[i] = w[:j] + draw(st.sampled_from(EVIL) | st.characters()) + w[j + draw(st.integers(0, 1)):]
    line = shlex.join(argv)
    if draw(st.integers(0, 4)) == 0:  # a raw edit of the line itself, outside any quoting
        j = draw(st.integers(0, len(line)))
        line = line[:j] + draw(st.sampled_from(["; id", " ", "'", "\n", "&", "|", "$", "`", "\\", "#"])) + line[j:]
    # whitespace that a shell splits the same way: a separator doubled or a tab, leading, trailing
    if draw(st.integers(0, 2)) == 0:
        line = draw(respaced(line))
    return line


@st.composite
def respaced(draw: st.DrawFn, line: str) -> str:
    where = draw(st.sampled_from(["separator", "leading", "trailing"]))
    ws = draw(st.sampled_from([" ", "  ", "\t", " \t", "\t "]))
    if where == "leading":
        return ws + line
    if where == "trailing":
        return line + ws
    spaces = [i for i, ch in enumerate(line) if ch == " "]
    if not spaces:
        return line + ws
    i = draw(st.sampled_from(spaces))
    return line[:i] + draw(st.sampled_from(["  ", "\t", " \t", "   "])) + line[i + 1:]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_wrapper_accepts_only_the_hooks_lines(shell: str, tmp_path_factory: pytest.TempPathFactory,
                                                  busybox_bin: Path) -> None:
    g: Guest = make_guest(shell, tmp_path_factory.mktemp(f"wrapper-{shell}"), busybox_bin)
    for name, (wd, files, svcs) in PROJECTS.items():
        g.docker.add_project(name, svcs, workdir=wd, files=list(files))
    ctl = g.root / CTL
    ctl.write_text("#!/bin/sh\nexit 0\n")
    ctl.chmod(0o755)
    g.write_conf(MARKER=str(g.marker), LOG=str(g.root / "wrapper.log"), ROOT=str(g.root),
                 KINDS="compose container controller", CONTAINERS=" ".join(CONTAINERS),
                 CONTAINER_LABELS=" ".join(LABELS), CONTROLLER=str(ctl))
    marker = str(g.marker)
    seen = {True: 0, False: 0}

    @budget(40)
    @example("true")  # (a control: a line that is accepted)
    @example(f"{ctl} signal  snapshotted --job {JOB} --vmid 101")  # issue 20: the words checked were not those run
    @example(f"docker start  {IDS[0]}")
    @given(command_lines(marker, str(ctl)))
    def only_hook_lines(line: str) -> None:
        assume("\0" not in line)  # an environment variable (sshd's SSH_ORIGINAL_COMMAND) cannot carry one
        p = g.run(WRAPPER, "--conf", str(g.conf), env={"SSH_ORIGINAL_COMMAND": line}, timeout=30)
        accepted = p.returncode != 126
        seen[accepted] += 1
        if accepted:
            try:
                argv = shlex.split(line)
            except ValueError:
                raise AssertionError(f"accepted a line that is no shell word list: {line!r}") from None
            assert shlex.join(argv) == line and hook_sends(argv, marker, str(ctl)), (line, p.returncode, p.stderr)
        else:
            assert b"refused" in p.stderr, p.stderr

    only_hook_lines()
    assert seen[True] >= 1 and seen[False] >= 10, seen  # (a control: both verdicts were exercised)
