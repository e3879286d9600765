"""Fuzzing the two marker parsers: marker.parse (the node) returns a valid Marker or raises MarkerError,
nothing else; and the guest's awk parser (vzdump-hook-recover, run by mawk and busybox awk) accepts
exactly the markers marker.parse accepts."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.corpus.generate import CID, SYSTEMD_STACK, container, doc, layout
from tests.fuzz.profile import budget
from tests.fuzz.strategies import marker_bytes
from vzdump_hook.errors import MarkerError
from vzdump_hook.guest import marker as markers
from vzdump_hook.stacks import Kind
from vzdump_hook.stacks.compose_table import ALLOWED_COMPOSE
from vzdump_hook.stacks.container_table import ENGINES, valid_container_name
from vzdump_hook.stacks.systemd_table import valid_unit
from vzdump_hook.stacks.table import valid_stack_name

RECOVER = Path(__file__).resolve().parents[2] / "examples" / "guest" / "vzdump-hook-recover"
PARSER = re.search(r"^PARSER='\n(.*?)^'$", RECOVER.read_text(), re.S | re.M).group(1)  # type: ignore[union-attr]


def node_verdict(data: bytes) -> markers.Marker | None:
    """The Marker, or None for a MarkerError; any other exception fails the test."""
    try:
        m = markers.parse(data)
    except MarkerError:
        return None
    assert 0 <= m.vmid < markers.MAX_INT and 0 <= m.job.pid < markers.MAX_INT and 0 <= m.job.start < markers.MAX_INT
    assert all(math.isfinite(t) and 0 <= t < markers.MAX_TIME for t in (m.written_at, m.deadline))
    assert m.state in ("stopping", "stopped")
    for s in m.stacks:
        assert valid_stack_name(s.name) and type(s.stopped) is bool
        if s.kind is Kind.SYSTEMD:
            assert 1 <= len(s.units) <= 32 and all(valid_unit(u) for u in s.units)
            assert all(type(t) is str and t.endswith((".socket", ".timer")) for t in s.triggers)
            continue
        if s.kind is Kind.CONTAINER:
            assert s.engine in ENGINES and 1 <= len(s.containers) == len(s.names) <= 64
            assert (all(valid_container_name(n) for n in s.names)
                    and all(re.fullmatch(r"[0-9a-f]{64}", c) for c in s.containers))
            continue
        assert s.compose in ALLOWED_COMPOSE and s.workdir.startswith("/")
        assert all(type(x) is str for x in (*s.files, *s.containers, *s.services))
    return m


@budget(300)
@given(marker_bytes())
def test_node_parser_returns_a_marker_or_a_marker_error(data: bytes) -> None:
    node_verdict(data)


@budget(300)
@given(st.binary(max_size=300))
def test_node_parser_on_random_bytes(data: bytes) -> None:
    node_verdict(data)


AWKS = {"mawk": ["mawk"], "busybox": ["busybox", "awk"]}


def awk_verdict(awk: list[str], data: bytes, tmp: Path) -> bool:
    """True when the guest's recovery program would use `data`: checked as it checks it first (size,
    NUL bytes, ASCII), then by its awk parser, then its tool."""
    if len(data) > 65536 or b"\0" in data or not data.isascii():
        return False
    f = tmp / "m.json"
    f.write_bytes(data)
    p = subprocess.run([*awk, PARSER, str(f)], capture_output=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    lines = p.stdout.split(b"\n")
    assert lines[0] == b"ok" or lines[0].startswith(b"error "), p
    # a marker of another tool is parsed, then left alone as FOREIGN (the node refuses it when parsing)
    return lines[0] == b"ok" and lines[1] in (b"tool -", b"tool vzdump-hook")


@pytest.mark.parametrize("awk", sorted(AWKS))
def test_both_parsers_accept_the_same_markers(awk: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    if shutil.which(AWKS[awk][0]) is None:
        pytest.skip(f"{awk} not installed")
    tmp = tmp_path_factory.mktemp("awk")
    seen = {True: 0, False: 0}

    @budget(250)
    @example(layout(doc()))  # (a control: a valid marker)
    @given(marker_bytes())
    def agree(data: bytes) -> None:
        valid = node_verdict(data) is not None
        assert valid == awk_verdict(AWKS[awk], data, tmp), data
        seen[valid] += 1

    agree()
    assert seen[True] >= 1 and seen[False] >= 50, seen  # (a control: both verdicts were exercised)


def _systemd(**over: object) -> bytes:
    d = doc()
    d["stacks"] = [{**SYSTEMD_STACK, **over}]
    return layout(d)


# systemd stacks at the bounds both parsers must draw in the same place
SYSTEMD_BOUNDS = {
    "longest-unit": (_systemd(units=["u" * 241 + ".service"]), True),
    "unit-one-longer": (_systemd(units=["u" * 242 + ".service"]), False),
    "longest-socket": (_systemd(triggers=["s" * 241 + ".socket"]), True),
    "socket-one-longer": (_systemd(triggers=["s" * 242 + ".socket"]), False),
    "longest-timer": (_systemd(triggers=["t" * 241 + ".timer"]), True),
    "timer-one-longer": (_systemd(triggers=["t" * 242 + ".timer"]), False),
    "shortest-names": (_systemd(units=["a.service"], triggers=["a.socket", "a.timer"]), True),
    "32-units": (_systemd(units=[f"u{i}.service" for i in range(32)]), True),
    "no-triggers": (_systemd(triggers=[]), True),
    "64-triggers": (_systemd(triggers=[f"t{i}.timer" for i in range(64)]), True),
    "template-instance": (_systemd(units=["postgresql@15-main.service", "getty@tty1.service"]), True),
    "user": (_systemd(user="alice"), True),
    "user-empty": (_systemd(user=""), True),
    "user-longest": (_systemd(user="_" + "a" * 31), True),
    "user-one-longer": (_systemd(user="_" + "a" * 32), False),
    "user-root": (_systemd(user="root"), False),
    "user-digit-first": (_systemd(user="1alice"), False),
}


# container stacks at the bounds both parsers must draw in the same place
CONTAINER_BOUNDS = {
    "podman": (container(engine="podman"), True),
    "longest-name": (container(names=["a" * 128]), True),
    "name-one-longer": (container(names=["a" * 129]), False),
    "shortest-name": (container(names=["a"]), True),
    "name-dots": (container(names=["db.app_1-x"]), True),
    "64-containers": (container(names=[f"c{i}" for i in range(64)], containers=[f"{i:064x}" for i in range(64)]), True),
    "65-containers": (container(names=[f"c{i}" for i in range(65)], containers=[f"{i:064x}" for i in range(65)]),
                      False),
    "id-63": (container(containers=[CID[:63]]), False),
    "id-65": (container(containers=[CID + "0"]), False),
    "more-ids-than-names": (container(containers=[CID, CID[::-1]]), False),
}

BOUNDS = {**{f"systemd-{k}": v for k, v in SYSTEMD_BOUNDS.items()},
          **{f"container-{k}": v for k, v in CONTAINER_BOUNDS.items()}}


@pytest.mark.parametrize("awk", sorted(AWKS))
@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_both_parsers_draw_the_bounds_of_each_kind_in_the_same_place(case: str, awk: str, tmp_path: Path) -> None:
    data, valid = BOUNDS[case]
    assert (node_verdict(data) is not None) == valid
    assert awk_verdict(AWKS[awk], data, tmp_path) == valid
