"""Stack kinds in the config and the marker: systemd entries of `stacks`, every problem named by its key
path; records of kind systemd written and read back by the node (the guest's parser: tests/fuzz,
tests/corpus)."""

from __future__ import annotations

import pytest

from vzdump_hook.config import Kind, StackSpec
from vzdump_hook.errors import MarkerError
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.marker import Marker, StackRecord
from vzdump_hook.node.job import JobId
from vzdump_hook.node.state import GuestRecord

from .test_config import parse, problems

GUEST = '[guests.101]\nssh = { host = "h" }\n'


def test_systemd_and_compose_entries_side_by_side_in_stop_order() -> None:
    g = parse(GUEST + 'stacks = ["web", { kind = "systemd", name = "pg", units = ["postgresql@15-main.service"], stop_timeout = 90 },'
                      ' { kind = "compose", name = "db" }]\n').guests[101]
    assert g.stacks == (StackSpec("web"), StackSpec("pg", 90.0, Kind.SYSTEMD, ("postgresql@15-main.service",)), StackSpec("db"))
    assert g.stop_timeout_of("pg") == 90.0


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('{ kind = "systemd", name = "pg" }', "guests.101.stacks[0].units: missing (the service units to stop"),
        ('{ kind = "systemd", units = ["a.service"] }', "guests.101.stacks[0].name: missing"),
        ('{ kind = "systemd", name = "PG", units = ["a.service"] }', "guests.101.stacks[0].name: not a stack name"),
        ('{ kind = "systemd", name = "pg", units = [] }', "guests.101.stacks[0].units: must be a list of 1-32 service unit names"),
        ('{ kind = "systemd", name = "pg", units = "a.service" }', "guests.101.stacks[0].units: must be a list of 1-32"),
        ('{ kind = "systemd", name = "pg", units = ["a.service", "postgresql"] }', "guests.101.stacks[0].units[1]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["pg.socket"] }', "guests.101.stacks[0].units[0]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["--now.service"] }', "guests.101.stacks[0].units[0]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["a\\\\x2db.service"] }', "guests.101.stacks[0].units[0]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["a.service", "a.service"] }', "guests.101.stacks[0].units: a unit is listed twice"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = "Alice" }', "guests.101.stacks[0].user: must be the name of the user"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = "root" }', "guests.101.stacks[0].user: must be the name of the user"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = "-x" }', "guests.101.stacks[0].user: must be the name of the user"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = 5 }', "guests.101.stacks[0].user: must be the name of the user"),
        ('{ name = "db", user = "alice" }', "guests.101.stacks[0].user: unknown key"),
        ('{ kind = "podman", name = "pg" }', "guests.101.stacks[0].kind: must be one of 'compose', 'systemd'"),
        ('{ kind = "compose", name = "db", units = ["a.service"] }', "guests.101.stacks[0].units: unknown key"),
    ],
)
def test_a_bad_systemd_entry_is_named_by_its_key_path(entry: str, expected: str) -> None:
    got = problems(GUEST + f"stacks = [{entry}]\n")
    assert any(p.startswith(expected) for p in got), got


def test_user_units_of_one_user_beside_system_units() -> None:
    g = parse(GUEST + 'stacks = [{ kind = "systemd", name = "a", units = ["x.service"] }, { kind = "systemd", name = "b", units = ["x.service"], user = "alice" }]\n').guests[101]
    assert [(s.name, s.user) for s in g.stacks or ()] == [("a", ""), ("b", "alice")]  # the same unit name, two managers
    got = problems(GUEST + 'stacks = [{ kind = "systemd", name = "a", units = ["x.service"], user = "bob" }, { kind = "systemd", name = "b", units = ["y.service"], user = "alice" }]\n')
    assert got == ["guests.101.stacks: --user units of one user only (got alice, bob)"]


def test_one_unit_in_two_stacks_is_refused() -> None:
    got = problems(GUEST + 'stacks = [{ kind = "systemd", name = "a", units = ["x.service"] }, { kind = "systemd", name = "b", units = ["x.service"] }]\n')
    assert got == ["guests.101.stacks: unit x.service is in stacks 'a' and 'b'"]


def test_a_systemd_record_round_trips_through_the_marker_and_the_host_state() -> None:
    rec = StackRecord.systemd("pg", ("postgresql@15-main.service",), ("pg.socket", "backup.timer"), stopped=True)
    user = StackRecord.systemd("app", ("app.service",), (), stopped=True, user="alice")
    compose = StackRecord("web", ("docker", "compose"), "/srv/web", ("/srv/web/compose.yaml",), ("ab" * 32,), True, ("app",))
    m = Marker(JobId("n", "b", 1, 2), 101, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped", (compose, rec, user))
    back = markers.parse(m.to_json())
    assert back.stacks == (compose, rec, user) and back.stacks[1].kind is Kind.SYSTEMD and back.stacks[2].user == "alice"
    line = [ln for ln in m.to_json().decode().splitlines() if '"pg"' in ln][0]
    assert '"driver": "systemd"' in line and '"units": ["postgresql@15-main.service"]' in line  # one stack per line
    gr = GuestRecord(101, "lxc", "snapshot", {}, stacks=[compose, rec, user])
    assert GuestRecord.from_json(gr.to_json()).stacks == [compose, rec, user]


def test_a_marker_of_an_unknown_kind_is_refused() -> None:
    m = Marker(JobId("n", "b", 1, 2), 101, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped",
               (StackRecord.systemd("pg", ("a.service",)),))
    data = m.to_json().replace(b'"driver": "systemd"', b'"driver": "quadlet"')
    with pytest.raises(MarkerError, match=r"stacks\[0\]\.driver 'quadlet' unknown"):
        markers.parse(data)
