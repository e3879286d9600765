"""`vzdump-hook status` and `recover --all` with one guest's marker hostile (issue 9): the other
guests' lines and the exit status are as without it, and nothing raises a traceback."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from pytest_mock import MockerFixture

from vzdump_hook.admin.cli import cli
from vzdump_hook.errors import TransportError
from vzdump_hook.node.job import JobId

from .test_phase import MARKER, Hook, dead_job, stale_marker

HOSTILE = {
    "services-int": (b'"services": []', b'"services": 5'),
    "deadline-400-digits": (b'"deadline": ', b'"deadline": ' + b"9" * 400 + b", \"x\": "),
    "node-escape": (b'"node": "', b'"node": "\\u001b[2Jvzdump-hook: ok\\n'),
}


@pytest.fixture
def two(tmp_path: Path, mocker: MockerFixture, monkeypatch: pytest.MonkeyPatch) -> Hook:
    h = Hook(tmp_path, mocker)
    h.configure(extra='[guests.102]\nssh = { host = "10.0.0.102" }\nstacks = ["app"]\n'.replace("102", "103"))
    for k, v in h.env.items():
        monkeypatch.setenv(k, v)
    stale_marker(h.g, dead_job())
    return h


def _hostile_103(h: Hook, case: str) -> None:
    from .fakes import FakeGuest

    g = FakeGuest()
    g.add_project("web", 1)
    h.guests[103] = g
    stale_marker(g, dead_job(), names=("web",))
    old, new = HOSTILE[case]
    g.files[MARKER] = re.sub(rb'"services": \[[^]]*\]', b'"services": []', g.files[MARKER]).replace(old, new, 1)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_status_and_recover_all_with_a_hostile_marker(two: Hook, case: str) -> None:
    _hostile_103(two, case)
    runner = CliRunner()
    res = runner.invoke(cli, ["status", "--config", str(two.cfg_path)])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 1, res.output  # something is down (101) and unknown (103): no traceback
    lines = res.output.splitlines()
    assert [ln for ln in lines if ln.startswith("101: MARKER of job")], res.output
    assert [ln for ln in lines if ln.startswith("103: marker unknown: marker:")], res.output
    assert all(ln.isprintable() for ln in lines)
    res = runner.invoke(cli, ["recover", "--all", "--config", str(two.cfg_path)])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, (res.exception, res.output)
    lines = res.output.splitlines()
    assert [ln for ln in lines if ln.startswith("101: marker of job") and "started db, web" in ln], res.output
    assert [ln for ln in lines if ln.startswith("103: marker:")], res.output
    assert all(ln.isprintable() for ln in lines)
    assert two.g.running_stacks() == ["db", "monitoring", "web"]


# -- what the admin's terminal shows of a guest (security issue 20, finding 5) ----------------------

# NEL, CSI, LINE SEPARATOR and RLO pass the marker's parser (JSON \u escapes): the node reads them
NODE = "x\x85\x9b2J\u2028vzdump-hook: ok\u202e"
SHOWN = "x\\x85\\x9b2J\\u2028vzdump-hook: ok\\u202e"
RAW = "\x85\x9b\u2028\u202e\x1b\r"


@pytest.fixture
def one(tmp_path: Path, mocker: MockerFixture, monkeypatch: pytest.MonkeyPatch) -> Hook:
    h = Hook(tmp_path, mocker)
    for k, v in h.env.items():
        monkeypatch.setenv(k, v)
    return h


def _shown_escaped(output: str) -> None:
    assert not [c for c in output if c in RAW], output
    assert all(len(line.splitlines()) <= 1 for line in output.split("\n")), output  # no other line break


def test_status_check_and_recover_show_a_hostile_marker_escaped(one: Hook) -> None:
    stale_marker(one.g, JobId(NODE, "b", 4242, 1), deadline=time.time() - 1)  # another node's, past its deadline
    runner = CliRunner()
    res = runner.invoke(cli, ["status", "--config", str(one.cfg_path)])
    _shown_escaped(res.output)
    assert f"101: MARKER of job {SHOWN}/4242 (job of another node, expired)" in res.output, res.output
    res = runner.invoke(cli, ["check", "101", "--config", str(one.cfg_path)])
    _shown_escaped(res.output)
    assert f"MARKER present: job {SHOWN}/4242" in res.output, res.output
    res = runner.invoke(cli, ["recover", "101", "--config", str(one.cfg_path)])
    _shown_escaped(res.output)
    assert f"101: marker of job {SHOWN}/4242" in res.output and "started db, web" in res.output, res.output
    assert one.g.running_stacks() == ["db", "monitoring", "web"]


def test_an_error_quoting_the_guest_is_shown_escaped(one: Hook, mocker: MockerFixture) -> None:
    """What a guest said (a command's stderr) in the error a command ends with (click's `Error: ...`)."""
    said = "docker: \x1b]0;owned\x07\x1b[2J\x9b1G\u202e\r\nError: nothing\x85done"
    mocker.patch.object(one.g, "execute", side_effect=TransportError("docker ps failed", command="docker ps",
                                                                     exit_status=1, stderr=said))
    res = CliRunner().invoke(cli, ["simulate", "101", "--type", "qemu", "--dry-run", "--config", str(one.cfg_path)])
    assert res.exit_code == 1, res.output
    _shown_escaped(res.output)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b1G\\u202e" in res.output, res.output
