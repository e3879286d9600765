"""The controller kind (stacks/controller.py) in the config, the node's records and the command
carrier's answer rules; the real peer is the reference controller (tests/controller/)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from vzdump_hook.errors import ConfigError, ConnectError
from vzdump_hook.guest.marker import StackRecord
from vzdump_hook.guest.session import _confirmed
from vzdump_hook.node.job import JobId
from vzdump_hook.node.state import GuestRecord
from vzdump_hook.stacks import Kind
from vzdump_hook.stacks.controller import CommandCarrier, ControllerDriver, Refused, check_answer, job_string, parse_job
from vzdump_hook.stacks.controller_table import ControllerSpec, with_current_ways
from vzdump_hook.stacks.conversation import Moment, message
from vzdump_hook.transports.base import Transport

from .test_config import parse, problems

FP = ":".join(["AB"] * 32)


def guest(stack: str, transport: str = 'ssh = { host = "h" }') -> str:
    return f"[guests.101]\n{transport}\nstacks = [{stack}]\n"


def test_command_and_https_controllers_parse(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("x" * 32)
    token.chmod(0o600)
    g = parse(guest('{ kind = "controller", name = "ctl", command = ["vzdump-controller", "--config", "/etc/c.json"],'
                    ' answer_within = 90 }')).guests[101]
    assert g.stacks is not None and g.stacks[0].kind is Kind.CONTROLLER
    assert g.stacks[0].table == ControllerSpec(command=("vzdump-controller", "--config", "/etc/c.json"),
                                               answer_within=90.0)
    g = parse(guest(f'{{ kind = "controller", name = "ctl", url = "https://10.0.0.5:8443/", token_file = "{token}",'
                    f' fingerprint = "{FP}" }}',
                    'transport = "none"')).guests[101]
    assert g.stacks is not None
    assert g.stacks[0].table == ControllerSpec(url="https://10.0.0.5:8443", token_file=str(token),
                                               fingerprint="ab" * 32)
    assert g.has_controllers


@pytest.mark.parametrize(
    ("stack", "transport", "expected"),
    [
        ('{ kind = "controller", name = "c" }', "", "guests.101.stacks[0]: give either command"),
        ('{ kind = "controller", name = "c", command = ["x"], url = "https://h" }', "",
         "guests.101.stacks[0]: give either command"),
        ('{ kind = "controller", name = "c", command = [] }', "",
         "guests.101.stacks[0].command: must be a list of 1-8 words"),
        ('{ kind = "controller", name = "c", command = ["--x"] }', "",
         "guests.101.stacks[0].command: must be a list of 1-8 words"),
        ('{ kind = "controller", name = "c", command = ["a b"] }', "",
         "guests.101.stacks[0].command: must be a list of 1-8 words"),
        ('{ kind = "controller", name = "c", command = ["x"], token_file = "/t" }', "",
         "guests.101.stacks[0].token_file: only for a controller reached by url"),
        ('{ kind = "controller", name = "c", url = "http://h", token_file = "/t", ca_file = "/c" }', "",
         "guests.101.stacks[0].url: must be https://HOST[:PORT]"),
        ('{ kind = "controller", name = "c", url = "https://h" , ca_file = "/c" }', "",
         "guests.101.stacks[0].token_file: missing"),
        ('{ kind = "controller", name = "c", url = "https://h", token_file = "t", ca_file = "/c" }', "",
         "guests.101.stacks[0].token_file: must be an absolute path"),
        ('{ kind = "controller", name = "c", url = "https://h", token_file = "/t" }', "",
         "guests.101.stacks[0]: give either ca_file"),
        ('{ kind = "controller", name = "c", url = "https://h", token_file = "/t", fingerprint = "abc" }', "",
         "guests.101.stacks[0].fingerprint: must be the certificate's SHA-256"),
        ('{ kind = "controller", name = "c", url = "https://h", token_file = "/t", ca_file = "/c", answer_within = 0 }',
         "", "guests.101.stacks[0].answer_within: must be 1-3600"),
        ('{ kind = "controller", name = "c", command = ["x"], units = ["a.service"] }', "",
         "guests.101.stacks[0].units: unknown key"),
        ('{ kind = "controller", name = "c", command = ["x"] }', 'transport = "none"',
         "guests.101.stacks[0].command: needs a transport into the guest"),
        ('"web"', 'transport = "none"',
         'guests.101.transport: "none" only for a guest whose stacks are all controllers reached by url'),
    ],
)
def test_controller_problems_name_their_key_path(stack: str, transport: str, expected: str) -> None:
    found = problems(guest(stack, transport or 'ssh = { host = "h" }'))
    assert any(p.startswith(expected) for p in found), found


def test_node_records_keep_the_controllers_job_and_the_closed_ones() -> None:
    rec = GuestRecord(101, "lxc", "snapshot", {}, stacks=[StackRecord.controller("ctl", "pve1:ab-cd:42-7", True)],
                      ended="done", closed=["ctl"])
    back = GuestRecord.from_json(rec.to_json())
    assert back == rec and back.stacks[0].kind is Kind.CONTROLLER and back.stacks[0].job == "pve1:ab-cd:42-7"
    old = rec.to_json().replace(', "ended": "done", "closed": ["ctl"]', "")  # a record written before these fields
    assert "closed" not in old and GuestRecord.from_json(old).closed == []


def test_job_strings_are_in_the_contracts_alphabet_and_read_back() -> None:
    job = JobId("pve-1", "3f2a9c1e-0b7d-4e55-9a61-2d3c4b5a6f70", 4242, 1000)
    text = job_string(job)
    assert text == "pve-1:3f2a9c1e-0b7d-4e55-9a61-2d3c4b5a6f70:4242-1000"
    assert parse_job(text) == job
    assert parse_job("someone-elses-job") is None and parse_job("a:b:c-d") is None


class Canned(Transport):
    """Answers every command with one canned (status, stdout, stderr); keeps the argv."""

    def __init__(self, status: int, out: str, err: str = "") -> None:
        super().__init__("canned")
        self.answer = (status, out.encode(), err.encode())
        self.argv: list[str] = []

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        self.argv = list(argv)
        return self.answer


OK = '{"api": 1, "ok": true, "phase": "quiesce", "job_state": "quiesced"}'
BUSY = '{"api": 1, "ok": false, "phase": "quiesce", "error": {"code": "busy", "message": "job x is open"}}'


@pytest.mark.parametrize(
    ("status", "out", "expected"),
    [
        (0, OK, None),
        (3, BUSY, "busy"),  # exit 3 goes with busy
        (4, BUSY, "internal"),  # exit and answer disagree
        (5, OK, "internal"),  # ok, but a failing exit
        (0, OK + "\n" + OK, ""),  # two lines
        (0, "", ""),
        (0, '{"api": 2, "ok": true}', ""),
        (0, "[1]", ""),
    ],
)
def test_command_carrier_takes_exactly_one_agreeing_answer(status: int, out: str, expected: str | None) -> None:
    t = Canned(status, out, "some log line\n")
    carrier = CommandCarrier(t, ControllerSpec(command=("vzdump-controller",)), "ctl")
    if expected is None:
        assert carrier.send("quiesce", {"job": "j", "vmid": 101, "answer_within": 30}, 10)["job_state"] == "quiesced"
        assert t.argv == ["vzdump-controller", "signal", "quiesce", "--job", "j", "--vmid", "101",
                          "--answer-within", "30"]
        return
    with pytest.raises(Refused) as ei:
        carrier.send("quiesce", {"job": "j", "vmid": 101}, 10)
    assert ei.value.code == expected


def test_check_answer_refusal_carries_the_code() -> None:
    with pytest.raises(Refused) as ei:
        check_answer(BUSY, "quiesce", "ctl")
    assert ei.value.code == "busy" and "job x is open" in str(ei.value)


class Down(Transport):
    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        raise ConnectError("no route to host")


def test_a_stop_that_cannot_reach_the_controller_is_an_error_outcome_not_an_exception(tmp_path: Path) -> None:
    g = parse(guest('{ kind = "controller", name = "ctl", command = ["c"] }')).guests[101]
    d = ControllerDriver(Down("down"), g, JobId("n", "b", 1, 2))
    recs = d.running(g.stacks or (), 1)
    assert list(recs) == ["ctl"] and recs["ctl"].job == "n:b:1-2"
    out = d.stop(recs["ctl"], 5, 30)
    assert not out.clean and "no route to host" in out.error


def test_https_token_file_must_be_root_only(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32)
    os.chmod(token, 0o644)
    text = guest(f'{{ kind = "controller", name = "c", url = "https://h", token_file = "{token}", ca_file = "/c" }}')
    assert any(p.startswith("guests.101.stacks[0].token_file:") and "chmod 600" in p for p in problems(text))


# -- per-stack strategies (config) -------------------------------------------------------------


def test_strategies_parse_for_any_kind() -> None:
    g = parse(guest('{ name = "db", group = 1, before_stop = ["psql", "-c", "CHECKPOINT"], before_stop_timeout = 20, '
                    'ready = { command = ["pg_isready"] }, ready_timeout = 30 }, '
                    '{ kind = "systemd", name = "pg", units = ["postgresql.service"], group = 2, '
                    'ready = { url = "http://10.0.0.5:8080/health" } }')).guests[101]
    assert g.stacks is not None
    db, pg = g.stacks
    assert (db.group, db.before_stop, db.before_stop_timeout, db.ready_timeout) == (1, ("psql", "-c", "CHECKPOINT"),
                                                                                    20.0, 30.0)
    assert db.ready is not None and db.ready.command == ("pg_isready",)
    assert pg.group == 2 and pg.ready is not None and pg.ready.url == "http://10.0.0.5:8080/health"


@pytest.mark.parametrize(
    ("stacks", "expected"),
    [
        ('{ name = "db", before_stop = "psql -c CHECKPOINT" }',
         "guests.101.stacks[0].before_stop: must be a list of 1-64 non-empty strings"),
        ('{ name = "db", before_stop = [] }', "guests.101.stacks[0].before_stop: must be a list"),
        ('{ name = "db", before_stop_timeout = 5 }', "guests.101.stacks[0].before_stop_timeout: without before_stop"),
        ('{ name = "db", ready = { command = ["a"], url = "http://h" } }',
         "guests.101.stacks[0].ready: must be a table with one of"),
        ('{ name = "db", ready = { tcp = 5432 } }', "guests.101.stacks[0].ready: must be a table with one of"),
        ('{ name = "db", ready = { url = "ftp://h" } }',
         "guests.101.stacks[0].ready.url: must be an http:// or https:// URL"),
        ('{ kind = "systemd", name = "pg", units = ["p.service"], ready = { healthy = true } }',
         "guests.101.stacks[0].ready.healthy: only `healthy = true`, and only for compose"),
        ('{ name = "db", ready_timeout = 5 }', "guests.101.stacks[0].ready_timeout: without ready"),
        ('{ name = "db", group = 0 }', "guests.101.stacks[0].group: must be 1-99"),
        ('{ name = "db", group = 1.5 }', "guests.101.stacks[0].group: must be an integer"),
        ('{ name = "db", group = 1 }, { name = "web" }',
         "guests.101.stacks[1].group: missing: once one stack has a group"),
    ],
)
def test_strategy_problems_name_their_key_path(stacks: str, expected: str) -> None:
    found = problems(guest(stacks))
    assert any(p.startswith(expected) for p in found), found


# -- the conversation (stacks/conversation.py) ---------------------------------------------------------


def test_after_an_unconfirmed_quiesce_the_table_has_only_abort() -> None:
    """The contract's rule (docs/controller-api.md, sections 1, 6, 10), read off the table: a controller that
    did not confirm its quiesce is told abort, and never snapshotted, done or failed."""
    unconfirmed = {message(m, False) for m in Moment if m is not Moment.QUIESCE}
    assert unconfirmed <= {"abort", ""} and "abort" in unconfirmed
    assert message(Moment.RESUME, True) == "snapshotted" and message(Moment.GIVE_UP, True) == "abort"
    # every message the hook sends after the quiesce is one the contract defines (section 1)
    assert {message(m, q) for m in Moment for q in (True, False)} - {""} <= {
        "quiesce", "snapshotted", "done", "failed", "abort"}


class Recording(Transport):
    """Answers each `signal PHASE` as the contract says (ok, job_state per phase); keeps the phases."""

    def __init__(self) -> None:
        super().__init__("recording")
        self.phases: list[str] = []

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        phase = argv[argv.index("signal") + 1]
        self.phases.append(phase)
        state = {"snapshotted": "resumed", "abort": "aborted"}.get(phase, phase)
        return 0, f'{{"api": 1, "ok": true, "phase": "{phase}", "job_state": "{state}"}}\n'.encode(), b""


@pytest.mark.parametrize(("quiesced", "give_up", "sent", "ended"), [
    (True, False, "snapshotted", set()),
    (False, False, "abort", {"ctl"}),
    (True, True, "abort", {"ctl"}),  # the hook gave up on the job: abort, not snapshotted
    (False, True, "abort", {"ctl"}),
])
def test_the_start_sends_what_the_table_says_and_an_abort_ends_the_job(quiesced: bool, give_up: bool, sent: str,
                                                                      ended: set[str]) -> None:
    g = parse(guest('{ kind = "controller", name = "ctl", command = ["c"] }')).guests[101]
    t = Recording()
    d = ControllerDriver(t, g, JobId("n", "b", 1, 2))
    if give_up:
        d.moment = Moment.GIVE_UP
    d.start(StackRecord.controller("ctl", "n:b:1-2", stopped=True, quiesced=quiesced), 10)
    assert t.phases == [sent] and d.ended == ended


def test_only_a_confirmed_quiesce_marks_the_record_quiesced() -> None:
    g = parse(guest('{ kind = "controller", name = "ctl", command = ["c"] }')).guests[101]
    ok = ControllerDriver(Canned(0, OK), g, JobId("n", "b", 1, 2))
    rec = ok.running(g.stacks or (), 1)["ctl"]
    outcomes = [ok.stop(rec, 5, 60), ControllerDriver(Canned(0, "not json"), g, JobId("n", "b", 1, 2)).stop(rec, 5, 60)]
    assert [o.error == "" for o in outcomes] == [True, False]
    assert [r.quiesced for r in _confirmed((rec,), outcomes[:1])] == [True]
    assert [r.quiesced for r in _confirmed((rec,), outcomes[1:])] == [False]


def test_a_refused_token_reads_as_a_config_error_in_the_sweep(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o600)
    g = parse(guest(f'{{ kind = "controller", name = "ctl", url = "https://h", token_file = "{token}", '
                    f'fingerprint = "{FP}" }}', 'transport = "none"')).guests[101]
    d = ControllerDriver(Down("down"), g, JobId("n", "b", 1, 2))

    class Refusing:
        def send(self, phase: str, fields: dict[str, object], timeout: float) -> dict[str, object]:
            raise ConfigError([f"controller ctl (https://h): {phase}: HTTP 403: the token in {token} is refused"])

    d._carriers["ctl"] = Refusing()  # type: ignore[assignment]
    ((name, text, down),) = d.end_stale(False, 5)
    assert name == "ctl" and down and text.startswith("CONFIG ERROR: ") and str(token) in text
    assert "not reachable" not in text


def test_a_recorded_guest_reaches_its_controllers_the_way_the_config_says_now(tmp_path: Path) -> None:
    """A token or pin fixed since the job is the one the sweep uses; a controller the config no longer
    has keeps its recorded way in; the other settings stay as recorded."""
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o600)

    def cfg(pin: str, extra: str = "") -> str:
        return guest(f'{{ kind = "controller", name = "ctl", url = "https://h", token_file = "{token}", '
                     f'fingerprint = "{pin}" }}{extra}', 'transport = "none"')

    recorded = parse(cfg(FP, f', {{ kind = "controller", name = "old", url = "https://o", token_file = "{token}", '
                             f'ca_file = "/c" }}') + "stop_timeout = 7\n").guests[101]
    current = parse(cfg(":".join(["CD"] * 32))).guests[101]
    merged = with_current_ways(recorded, current)
    assert merged.stacks is not None
    ways = {s.name: s.table for s in merged.stacks}
    assert ways["ctl"] == ControllerSpec(url="https://h", token_file=str(token), fingerprint="cd" * 32)
    assert ways["old"] == ControllerSpec(url="https://o", token_file=str(token), ca_file="/c")
    assert merged.stop_timeout == 7.0
    assert with_current_ways(recorded, None) is recorded
