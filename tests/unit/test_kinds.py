"""Stack kinds in the config and the marker: the registry (one config table module a kind, the same names
in each, imported only for what a config validates); systemd entries of `stacks`, every problem named by
its key path; records of kind systemd written and read back by the node (the guest's parser: tests/fuzz,
tests/corpus)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from typing import Any

import pytest

from vzdump_hook.errors import ConfigError, MarkerError
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.marker import Marker, StackRecord
from vzdump_hook.node.job import JobId
from vzdump_hook.node.state import GuestRecord
from vzdump_hook.stacks import Kind, KindTable, driver_module, kind_module, systemd_table
from vzdump_hook.stacks.table import COMMON_KEYS, StackSpec

from .test_config import parse, problems

GUEST = '[guests.101]\nssh = { host = "h" }\n'


# -- the registry --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_has_a_table_module_with_the_same_names_and_a_driver(kind: Kind) -> None:
    module = kind_module(kind)
    assert module.__name__ == f"vzdump_hook.stacks.{kind.value}_table"  # type: ignore[attr-defined]
    table = module.Table
    assert dataclasses.is_dataclass(table) and table.__dataclass_params__.frozen
    assert issubclass(table, KindTable) and table.kind is kind and table().kind is kind
    assert isinstance(module.KEYS, frozenset) and module.KEYS == {f.name for f in dataclasses.fields(table)}
    assert not module.KEYS & COMMON_KEYS
    assert all(callable(getattr(module, name)) for name in ("validate", "check_list", "check_guest"))
    drivers = {c for c in vars(importlib.import_module(f"vzdump_hook.stacks.{kind.value}")).values()
               if isinstance(c, type) and c.__name__.endswith("Driver") and getattr(c, "kind", None) is kind}
    assert len(drivers) == 1, drivers
    assert all(callable(getattr(module, name)) for name in ("record_dict", "record_fields"))
    assert driver_module(kind).Driver in drivers


@pytest.mark.parametrize(
    ("kind", "item", "expected"),
    [
        (Kind.SYSTEMD, {"units": []}, ["s.units: must be a list of 1-32 service unit names"]),
        (Kind.SYSTEMD, {"units": ["a.service"], "user": "root"}, ["s.user: must be the name of the user"]),
        (Kind.CONTAINER, {"containers": ["x"], "engine": "lxc"}, ["s.engine: must be one of 'docker', 'podman'"]),
        (Kind.CONTROLLER, {"url": "http://h", "token_file": "t"},
         ["s.url: must be https://HOST[:PORT]", "s.token_file: must be an absolute path", "s: give either ca_file"]),
    ],
)
def test_a_kinds_validate_raises_config_error_naming_every_key_path(kind: Kind, item: dict[str, Any],
                                                                     expected: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        kind_module(kind).validate("s", item)
    assert len(ei.value.problems) == len(expected)
    assert all(p.startswith(e) for p, e in zip(ei.value.problems, expected, strict=True)), ei.value.problems


def test_a_kinds_validate_returns_its_table() -> None:
    got = kind_module(Kind.SYSTEMD).validate("s", {"units": ["a.service"], "user": "alice"})
    assert got == systemd_table.Table(("a.service",), "alice")
    assert kind_module(Kind.COMPOSE).validate("s", {}) == StackSpec("x").table
    assert StackSpec("x").kind is Kind.COMPOSE
    assert StackSpec("x", table=systemd_table.Table(("a.service",))).kind is Kind.SYSTEMD


def test_a_stack_still_answers_for_the_keys_of_every_kind() -> None:
    """guest/shipped.py reads units, user, containers, label and controller through any stack (its kind's
    value, another kind's default) until it reads spec.table."""
    from vzdump_hook.stacks import container_table, controller_table

    specs = [StackSpec("a"), StackSpec("b", table=systemd_table.Table(("x.service",), "alice")),
             StackSpec("c", table=container_table.Table(("web",), "", "podman")),
             StackSpec("d", table=container_table.Table(label="k=v")),
             StackSpec("e", table=controller_table.Table(command=("ctl",)))]
    got = [(s.units, s.user, s.containers, s.label, s.controller) for s in specs]
    assert got == [((), "", (), "", None), (("x.service",), "alice", (), "", None), ((), "", ("web",), "", None),
                   ((), "", (), "k=v", None), ((), "", (), "", controller_table.Table(command=("ctl",)))]


_IMPORTS = """
import json, sys, tomllib
import vzdump_hook.config as config
imported = set(sys.modules)
config.parse(tomllib.loads(sys.argv[1]))
print(json.dumps({"import": sorted(imported), "parse": sorted(set(sys.modules))}))
"""
EVERY_KIND = (GUEST + 'stacks = ["web", { kind = "systemd", name = "pg", units = ["a.service"] },'
              ' { kind = "container", name = "c", containers = ["x"] },'
              ' { kind = "controller", name = "k", command = ["ctl"] }]\n')


@pytest.mark.parametrize("text", ["", EVERY_KIND])
def test_the_config_and_its_validation_import_no_driver_and_nothing_heavy(text: str) -> None:
    """Every vzdump phase imports config.py and validates the config: a kind's config table module is small
    and imports no driver (the drivers import the guest's marker, transports, logging, requests lazily)."""
    out = subprocess.run([sys.executable, "-c", _IMPORTS, text], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    drivers = {f"vzdump_hook.stacks.{k.value}" for k in Kind} | {"vzdump_hook.stacks.kinds", "vzdump_hook.stacks.base"}
    heavy = {"requests", "paramiko", "urllib3", "vzdump_hook.guest.marker", "vzdump_hook.transports.base",
             "vzdump_hook.httpio"}
    for when in ("import", "parse"):
        assert not (drivers | heavy) & set(got[when]), (when, sorted((drivers | heavy) & set(got[when])))


def test_systemd_and_compose_entries_side_by_side_in_stop_order() -> None:
    g = parse(GUEST + 'stacks = ["web", { kind = "systemd", name = "pg", units = ["postgresql@15-main.service"],'
                      ' stop_timeout = 90 }, { kind = "compose", name = "db" }]\n').guests[101]
    pg = StackSpec("pg", 90.0, systemd_table.Table(("postgresql@15-main.service",)))
    assert g.stacks == (StackSpec("web"), pg, StackSpec("db"))
    assert g.stop_timeout_of("pg") == 90.0


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('{ kind = "systemd", name = "pg" }', "guests.101.stacks[0].units: missing (the service units to stop"),
        ('{ kind = "systemd", units = ["a.service"] }', "guests.101.stacks[0].name: missing"),
        ('{ kind = "systemd", name = "PG", units = ["a.service"] }', "guests.101.stacks[0].name: not a stack name"),
        ('{ kind = "systemd", name = "pg", units = [] }',
         "guests.101.stacks[0].units: must be a list of 1-32 service unit names"),
        ('{ kind = "systemd", name = "pg", units = "a.service" }',
         "guests.101.stacks[0].units: must be a list of 1-32"),
        ('{ kind = "systemd", name = "pg", units = ["a.service", "postgresql"] }',
         "guests.101.stacks[0].units[1]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["pg.socket"] }',
         "guests.101.stacks[0].units[0]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["--now.service"] }',
         "guests.101.stacks[0].units[0]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["a\\\\x2db.service"] }',
         "guests.101.stacks[0].units[0]: not a service unit name"),
        ('{ kind = "systemd", name = "pg", units = ["a.service", "a.service"] }',
         "guests.101.stacks[0].units: a unit is listed twice"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = "Alice" }',
         "guests.101.stacks[0].user: must be the name of the user"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = "root" }',
         "guests.101.stacks[0].user: must be the name of the user"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = "-x" }',
         "guests.101.stacks[0].user: must be the name of the user"),
        ('{ kind = "systemd", name = "pg", units = ["a.service"], user = 5 }',
         "guests.101.stacks[0].user: must be the name of the user"),
        ('{ name = "db", user = "alice" }', "guests.101.stacks[0].user: unknown key"),
        ('{ kind = "podman", name = "pg" }', "guests.101.stacks[0].kind: must be one of 'compose', 'systemd'"),
        ('{ kind = "compose", name = "db", units = ["a.service"] }', "guests.101.stacks[0].units: unknown key"),
    ],
)
def test_a_bad_systemd_entry_is_named_by_its_key_path(entry: str, expected: str) -> None:
    got = problems(GUEST + f"stacks = [{entry}]\n")
    assert any(p.startswith(expected) for p in got), got


def test_user_units_of_one_user_beside_system_units() -> None:
    g = parse(GUEST + 'stacks = [{ kind = "systemd", name = "a", units = ["x.service"] },'
                      ' { kind = "systemd", name = "b", units = ["x.service"], user = "alice" }]\n').guests[101]
    assert [(s.name, s.user) for s in g.stacks or ()] == [("a", ""), ("b", "alice")]  # the same unit name, two managers
    got = problems(GUEST + 'stacks = [{ kind = "systemd", name = "a", units = ["x.service"], user = "bob" },'
                           ' { kind = "systemd", name = "b", units = ["y.service"], user = "alice" }]\n')
    assert got == ["guests.101.stacks: --user units of one user only (got alice, bob)"]


def test_one_unit_in_two_stacks_is_refused() -> None:
    got = problems(GUEST + 'stacks = [{ kind = "systemd", name = "a", units = ["x.service"] },'
                           ' { kind = "systemd", name = "b", units = ["x.service"] }]\n')
    assert got == ["guests.101.stacks: unit x.service is in stacks 'a' and 'b'"]


def test_a_systemd_record_round_trips_through_the_marker_and_the_host_state() -> None:
    rec = StackRecord.systemd("pg", ("postgresql@15-main.service",), ("pg.socket", "backup.timer"), stopped=True)
    user = StackRecord.systemd("app", ("app.service",), (), stopped=True, user="alice")
    compose = StackRecord("web", ("docker", "compose"), "/srv/web", ("/srv/web/compose.yaml",), ("ab" * 32,), True,
                          ("app",))
    m = Marker(JobId("n", "b", 1, 2), 101, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped",
               (compose, rec, user))
    back = markers.parse(m.to_json())
    assert (back.stacks == (compose, rec, user) and back.stacks[1].kind is Kind.SYSTEMD
            and back.stacks[2].user == "alice")
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
