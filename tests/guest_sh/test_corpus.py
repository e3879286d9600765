"""One corpus of marker files (tests/corpus/), both parsers: the node's marker.parse and the guest's awk
parser (through vzdump-hook-recover, under dash and busybox sh) give every file its stated verdict:
valid, or refused for the stated reason (a regex both messages match)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.guest_sh.conftest import RECOVER, Guest, no_changing_calls
from tests.guest_sh.fakedocker import cid
from vzdump_hook.errors import MarkerError
from vzdump_hook.guest import marker as markers

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
VERDICTS: dict[str, dict[str, str]] = json.loads((CORPUS / "verdicts.json").read_text())


def test_every_corpus_file_has_a_verdict_and_both_kinds_are_there() -> None:
    assert sorted(p.stem for p in (CORPUS / "markers").glob("*.json")) == sorted(VERDICTS)
    kinds = [v["verdict"] for v in VERDICTS.values()]
    assert kinds.count("valid") >= 10 and kinds.count("refused") >= 80


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_the_node_parser(name: str) -> None:
    data = (CORPUS / "markers" / f"{name}.json").read_bytes()
    v = VERDICTS[name]
    if v["verdict"] == "valid":
        m = markers.parse(data)
        assert [s.name for s in m.stacks] == ["db"] and m.vmid == 101
        return
    with pytest.raises(MarkerError) as ei:
        markers.parse(data)
    assert re.search(v["reason"], str(ei.value)), str(ei.value)


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_the_guest_parser(name: str, guest: Guest) -> None:
    data = (CORPUS / "markers" / f"{name}.json").read_bytes()
    v = VERDICTS[name]
    guest.write_conf(MARKER=str(guest.marker), VMID="101", DEADLINE_GRACE="0", WAIT_DOCKER="1")
    guest.docker.add_project("db", ("app",), running=False)
    assert cid("db", 0) in data.decode("ascii", "replace") or v["verdict"] == "refused"
    guest.marker.write_bytes(data)
    guest.marker.chmod(0o600)
    p = guest.run(RECOVER, "--conf", str(guest.conf))
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    if v["verdict"] == "valid":
        assert p.returncode == 0 and "marker removed" in out, out
        assert guest.docker.running() == {"db": True}
        return
    assert p.returncode == 2, out
    assert re.search(v["reason"], out), out
    assert no_changing_calls(guest.docker.argvs()) and guest.marker.read_bytes() == data
