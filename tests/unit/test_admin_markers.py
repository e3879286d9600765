"""`vzdump-hook status` and `recover --all` with one guest's marker hostile (issue 9): the other
guests' lines and the exit status are as without it, and nothing raises a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from pytest_mock import MockerFixture

from vzdump_hook.admin import cli

from .test_hook import MARKER, Hook, dead_job, stale_marker

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
