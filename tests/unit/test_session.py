"""guest/session.py (GuestSession) with FakeTransport: selection, marker before stop, order, parallel, killed, resume,
fallbacks, inherited stacks, unreachable and hanging guests, deadlines."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pytest_mock import MockerFixture

from vzdump_hook import config
from vzdump_hook.errors import CommandTimeout, ConnectError, HookError, MarkerError, TransportError
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest import ready, stops
from vzdump_hook.guest import session as controller
from vzdump_hook.guest.marker import Marker, StackRecord
from vzdump_hook.guest.session import GuestSession, NothingStopped
from vzdump_hook.node.job import JobId
from vzdump_hook.stacks import compose as compose_mod

from .fakes import FakeGuest, FakeTransport, container_id

JOB = JobId("pve1", "boot-a", 4242, 1000)
OLD_JOB = JobId("pve1", "boot-old", 17, 5)
MARKER = "/var/lib/vzdump-hook/marker.json"


def guest_cfg(**over: Any) -> config.GuestConfig:
    table: dict[str, Any] = {"ssh": {"host": "10.0.0.1"}, "resume_wait": 0, "command_timeout": 20}
    table.update(over)
    return config.validate_guest(101, table)


def ctl(g: FakeGuest, **over: Any) -> GuestSession:
    return GuestSession(guest_cfg(**over), JOB, transport=FakeTransport(g))


def soon(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def marker_in(g: FakeGuest, path: str = MARKER) -> Marker:
    return markers.parse(g.files[path])


@pytest.fixture
def g() -> FakeGuest:
    g = FakeGuest()
    g.add_project("db", 2)
    g.add_project("web", 1)
    g.add_project("monitoring", 1)
    return g


# -- preflight and selection --------------------------------------------------------------------


def test_preflight_reports_and_changes_nothing(g: FakeGuest) -> None:
    p = ctl(g, stacks=["web", "db", "cache"]).preflight(soon())
    assert p.compose == ("docker", "compose")
    assert p.running == ("db", "monitoring", "web")
    assert p.selected == ("web", "db")
    assert p.missing == ()  # cache has no container at all: it does not exist
    assert len(p.absent) == 1 and p.absent[0].startswith("guests.101.stacks[2].name: compose project 'cache'"), p
    assert p.marker is None
    assert {v for v, _ in g.calls} <= {"connect", "ps", "ps-all", "detect", "read", "inspect"}
    assert g.running_stacks() == ["db", "monitoring", "web"] and g.files == {}


def test_a_listed_project_that_exists_and_is_stopped_is_left_alone_not_absent(g: FakeGuest) -> None:
    g.add_project("cache", 1, running=False)
    p = ctl(g, stacks=["web", "cache"]).preflight(soon())
    assert p.selected == ("web",) and p.missing == ("cache",) and p.absent == ()


def test_preflight_reads_the_marker(g: FakeGuest) -> None:
    m = Marker(OLD_JOB, 101, "lxc", "snapshot", 1.0, 2.0, "stopped", ())
    g.files[MARKER] = m.to_json()
    assert ctl(g).preflight(soon()).marker == m


def test_preflight_with_invalid_marker_raises(g: FakeGuest) -> None:
    g.files[MARKER] = b"{not json"
    with pytest.raises(MarkerError):
        ctl(g).preflight(soon())


def test_auto_selects_every_running_stack_minus_exclude_sorted(g: FakeGuest) -> None:
    g.add_project("app", 1)
    c = ctl(g, exclude=["monitoring"])
    assert c.preflight(soon()).selected == ("app", "db", "web")
    q = c.quiesce("qemu", "snapshot", soon())
    assert [s.name for s in q.stacks] == ["app", "db", "web"]
    assert g.stops() == ["app", "db", "web"]
    assert g.running_stacks() == ["monitoring"]


def test_explicit_list_keeps_its_order_and_leaves_others_alone(g: FakeGuest) -> None:
    g.add_project("cache", 1, running=False)
    c = ctl(g, stacks=["web", "cache", "db"])
    q = c.quiesce("qemu", "snapshot", soon())
    assert [s.name for s in q.stacks] == ["web", "db"]
    assert g.stops() == ["web", "db"]
    assert g.running_stacks() == ["monitoring"]
    c.resume(soon())
    assert g.starts() == ["db", "web"]
    assert "cache" not in g.starts()
    assert g.down_stacks() == ["cache"]  # listed, but down before the backup: stays down


def test_listed_stack_not_running_is_logged(g: FakeGuest, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="vzdump_hook")
    ctl(g, stacks=["db", "cache"]).quiesce("qemu", "snapshot", soon())
    assert "quiesce 101: cache is not running, left alone" in caplog.messages


def test_nothing_selected_writes_no_marker(g: FakeGuest) -> None:
    q = ctl(g, stacks=["nope"]).quiesce("qemu", "snapshot", soon())
    assert q.stacks == () and q.outcomes == ()
    assert g.files == {} and g.stops() == []


# -- quiesce: marker first, then stop ----------------------------------------------------------


def test_marker_is_written_with_the_stacks_before_the_first_stop(g: FakeGuest) -> None:
    before = time.time()
    q = ctl(g, stacks=["web", "db"], max_downtime=300).quiesce("lxc", "suspend", soon())
    first_write = g.first("write", MARKER)
    first_stop = g.first("compose-stop")
    assert 0 <= first_write < first_stop
    assert g.writes[0][0] == MARKER
    m = markers.parse(g.writes[0][1])
    assert m.state == "stopping"
    assert [s.name for s in m.stacks] == ["web", "db"]
    assert all(s.stopped for s in m.stacks)
    assert m.stacks[1].containers == (container_id("db", 0), container_id("db", 1))
    assert (m.job, m.vmid, m.vmtype, m.mode) == (JOB, 101, "lxc", "suspend")
    assert before - 1 <= m.written_at <= time.time() + 1
    assert m.deadline == pytest.approx(m.written_at + 300, abs=0.01)
    # written once, before the first stop: no rewrite between the stop and the point in time
    first_stop = min(i for i, (v, _) in enumerate(g.calls) if v == "compose-stop")
    assert [i for i, (v, _) in enumerate(g.calls) if v == "write"] == [min(i for i, (v, _) in enumerate(g.calls)
                                                                           if v == "write")]
    assert min(i for i, (v, _) in enumerate(g.calls) if v == "write") < first_stop
    final = marker_in(g)
    assert final.state == "stopping" and final.stacks == m.stacks
    assert q.stacks == m.stacks
    assert q.started <= q.ended


def test_stops_in_listed_order_and_reports_clean(g: FakeGuest) -> None:
    q = ctl(g, stacks=["monitoring", "web", "db"]).quiesce("qemu", "snapshot", soon())
    assert g.stops() == ["monitoring", "web", "db"]
    assert [o.name for o in q.outcomes] == ["monitoring", "web", "db"]
    assert all(o.clean for o in q.outcomes)
    assert q.killed == () and q.errors == ()
    assert g.running_stacks() == []


def test_per_stack_stop_timeout(g: FakeGuest) -> None:
    ctl(g, stacks=["web", {"name": "db", "stop_timeout": 90}], stop_timeout=12).quiesce("qemu", "snapshot", soon(200))
    tails = {a[8]: a[-1] for a in g.argvs if a[:3] == ["sh", "-c", compose_mod._IN_DIR] and a[-3:-1] == ["stop", "-t"]}
    assert tails == {"web": "12", "db": "90"}


def test_parallel_stops_at_the_same_time(g: FakeGuest) -> None:
    g.stop_delay = 0.15
    start = time.monotonic()
    q = ctl(g, parallel=True).quiesce("qemu", "snapshot", soon())
    assert g.max_parallel_stops >= 2
    assert time.monotonic() - start < 0.15 * 3
    assert sorted(g.stops()) == ["db", "monitoring", "web"]
    assert [o.name for o in q.outcomes] == ["db", "monitoring", "web"]  # outcomes in stop order
    assert g.first("write") < min(g.first("compose-stop", n) for n in ("db", "monitoring", "web"))
    ctl(g, parallel=True).resume(soon())
    assert g.running_stacks() == ["db", "monitoring", "web"] and MARKER not in g.files


def test_serial_stops_one_after_another(g: FakeGuest) -> None:
    g.stop_delay = 0.02
    ctl(g).quiesce("qemu", "snapshot", soon())
    assert g.max_parallel_stops == 1


def test_killed_container_makes_the_outcome_unclean(g: FakeGuest) -> None:
    g.projects["db"].stubborn = True
    q = ctl(g, stacks=["web", "db"]).quiesce("qemu", "snapshot", soon())
    assert q.killed == (f"db:{container_id('db', 0)[:12]}", f"db:{container_id('db', 1)[:12]}")
    by_name = {o.name: o for o in q.outcomes}
    assert by_name["web"].clean and not by_name["db"].clean
    assert [s.name for s in q.stacks] == ["web", "db"]  # both must be started again


def test_stop_errors_are_collected(g: FakeGuest) -> None:
    g.projects["web"].stop_hangs = True
    q = ctl(g, stacks=["web", "db"]).quiesce("qemu", "snapshot", soon())
    assert len(q.errors) == 1 and q.errors[0].startswith("web: ")
    assert g.stops() == ["web", "db"]  # a failing stack does not keep the others running
    assert [s.name for s in marker_in(g).stacks] == ["web", "db"]


# -- inherited stacks -------------------------------------------------------------------------


def test_inherited_stacks_from_an_older_marker_are_kept(g: FakeGuest) -> None:
    legacy = StackRecord("legacy", ("docker", "compose"), "/srv/legacy", (), (container_id("legacy", 0),), True)
    g.add_project("legacy", 1, running=False)
    old_db = StackRecord("db", ("docker", "compose"), "/srv/db", (), (container_id("db", 9),), True)
    q = ctl(g, stacks=["db"]).quiesce("qemu", "snapshot", soon(), inherited=(legacy, old_db))
    names = [s.name for s in marker_in(g).stacks]
    assert names == ["legacy", "db"]  # db is not listed twice: the running one replaces the old record
    assert marker_in(g).stacks[1].containers == (container_id("db", 0), container_id("db", 1))
    assert [s.name for s in q.stacks] == ["legacy", "db"]
    assert g.stops() == ["db"]
    r = ctl(g, stacks=["db"]).resume(soon())
    assert r.started == ("db", "legacy") and r.marker_removed
    assert g.projects["legacy"].all_running


def test_inherited_only_still_writes_the_marker(g: FakeGuest) -> None:
    legacy = StackRecord("legacy", ("docker", "compose"), "/srv/legacy", (), (), True)
    q = ctl(g, stacks=["nope"]).quiesce("qemu", "snapshot", soon(), inherited=(legacy,))
    assert [s.name for s in q.stacks] == ["legacy"]
    assert [s.name for s in marker_in(g).stacks] == ["legacy"]
    assert g.stops() == []


# -- quiesce failures before anything is stopped -----------------------------------------------


@pytest.mark.parametrize("knob", ["unreachable", "hang", "docker_down"])
def test_quiesce_on_an_unusable_guest_raises_nothing_stopped(g: FakeGuest, knob: str) -> None:
    setattr(g, knob, True)
    with pytest.raises(NothingStopped) as ei:
        ctl(g).quiesce("qemu", "snapshot", soon())
    assert isinstance(ei.value, HookError)
    assert g.stops() == [] and g.writes == []
    g.unreachable = g.hang = g.docker_down = False
    assert g.running_stacks() == ["db", "monitoring", "web"]


def test_quiesce_unreachable_cause_is_kept(g: FakeGuest) -> None:
    g.hang = True
    with pytest.raises(NothingStopped) as ei:
        ctl(g).quiesce("qemu", "snapshot", soon())
    assert isinstance(ei.value.__cause__, CommandTimeout)


def test_marker_not_written_because_guest_went_away_stops_nothing(g: FakeGuest) -> None:
    def refuse_write(verb: str, detail: str) -> None:
        if verb == "write":
            raise ConnectError("connection reset")

    g.on_call = refuse_write
    with pytest.raises(NothingStopped, match="marker not written"):
        ctl(g).quiesce("qemu", "snapshot", soon())
    assert g.stops() == []


def test_marker_write_failing_in_the_guest_stops_nothing(g: FakeGuest) -> None:
    g.fail_writes = True
    with pytest.raises(TransportError) as ei:
        ctl(g).quiesce("qemu", "snapshot", soon())
    assert "No space left" in str(ei.value) and f"cannot write {MARKER}" in str(ei.value)
    assert g.stops() == []
    assert g.running_stacks() == ["db", "monitoring", "web"]


# -- resume ---------------------------------------------------------------------------------------


def test_resume_starts_in_reverse_order_and_removes_the_marker(g: FakeGuest) -> None:
    ctl(g, stacks=["web", "db", "monitoring"]).quiesce("qemu", "snapshot", soon())
    g.calls.clear()
    r = ctl(g).resume(soon())
    assert g.starts() == ["monitoring", "db", "web"]
    assert r.started == ("monitoring", "db", "web") and r.failed == () and r.problems == ()
    assert r.marker_removed and MARKER not in g.files
    assert g.first("remove", MARKER) > max(i for i, (v, _) in enumerate(g.calls) if v == "compose-start")
    assert g.running_stacks() == ["db", "monitoring", "web"]


def test_resume_uses_the_marker_not_the_config(g: FakeGuest) -> None:
    """The marker lists what was stopped: a config edited since does not change what is started."""
    ctl(g, stacks=["web", "db"]).quiesce("qemu", "snapshot", soon())
    r = ctl(g, stacks=["monitoring"]).resume(soon())
    assert r.started == ("db", "web")


def test_resume_with_a_stopping_marker_starts_everything_listed(g: FakeGuest) -> None:
    """A hook killed between the marker write and the stops leaves a "stopping" marker."""
    d = ctl(g, stacks=["web", "db"])
    running = d.driver.running(10)
    m = Marker(
        JOB,
        101,
        "qemu",
        "snapshot",
        time.time(),
        time.time() + 600,
        "stopping",
        tuple(StackRecord(s.name, s.compose, s.workdir, s.files, s.containers, True)
              for s in (running["web"], running["db"])),
    )
    g.files[MARKER] = m.to_json()
    g.projects["web"].containers[container_id("web", 0)].running = False
    r = ctl(g).resume(soon())
    assert r.started == ("db", "web") and r.marker_removed
    assert g.running_stacks() == ["db", "monitoring", "web"]


def test_stack_failing_to_start_stays_in_the_rewritten_marker(g: FakeGuest) -> None:
    ctl(g, stacks=["web", "db", "monitoring"]).quiesce("qemu", "snapshot", soon())
    g.projects["db"].start_fails = True
    r = ctl(g).resume(soon())
    assert r.started == ("monitoring", "web") and r.failed == ("db",)
    assert len(r.problems) == 1 and r.problems[0].startswith("db: stack db: not running after start")
    assert not r.marker_removed
    left = marker_in(g)
    assert [s.name for s in left.stacks] == ["db"]
    assert left.stacks[0].containers == (container_id("db", 0), container_id("db", 1))
    assert left.job == JOB and left.state == "stopping"
    # once it can start, the next resume finishes the job
    g.projects["db"].start_fails = False
    g.calls.clear()
    r2 = ctl(g).resume(soon())
    assert r2.started == ("db",) and r2.marker_removed and g.starts() == ["db"]
    assert g.running_stacks() == ["db", "monitoring", "web"]


def test_resume_marker_rewrite_failure_is_a_problem_not_an_exception(g: FakeGuest) -> None:
    ctl(g, stacks=["web", "db"]).quiesce("qemu", "snapshot", soon())
    g.projects["db"].start_fails = True
    g.fail_writes = True
    r = ctl(g).resume(soon())
    assert r.failed == ("db",)
    assert any(p.startswith("marker not updated") for p in r.problems)
    assert [s.name for s in marker_in(g).stacks] == ["web", "db"]  # the old marker still lists all


def _records(g: FakeGuest, *names: str) -> tuple[StackRecord, ...]:
    running = ctl(g).driver.running(10)
    return tuple(StackRecord(n, running[n].compose, running[n].workdir, running[n].files, running[n].containers, True)
                 for n in names)


@pytest.mark.parametrize("bad", [b"garbage", b"{}", b'{"schema": 99}', b"x" * (markers.MAX_SIZE + 10)])
def test_invalid_marker_falls_back_to_the_host_record_and_is_left_in_place(g: FakeGuest, bad: bytes) -> None:
    fallback = _records(g, "web", "db")
    ctl(g, stacks=["web", "db"]).quiesce("qemu", "snapshot", soon())
    g.files[MARKER] = bad
    r = ctl(g).resume(soon(), fallback=fallback)
    assert r.started == ("db", "web") and r.failed == ()
    assert not r.marker_removed and g.files[MARKER] == bad
    assert len(r.problems) == 1 and "left in place, starting what the node recorded instead" in r.problems[0]
    assert g.running_stacks() == ["db", "monitoring", "web"]


def test_missing_marker_falls_back_to_the_host_record(g: FakeGuest) -> None:
    fallback = _records(g, "web", "db")
    ctl(g, stacks=["web", "db"]).quiesce("qemu", "snapshot", soon())
    del g.files[MARKER]
    r = ctl(g).resume(soon(), fallback=fallback)
    assert r.started == ("db", "web") and not r.marker_removed and r.problems == ()
    assert g.running_stacks() == ["db", "monitoring", "web"]


def test_resume_with_nothing_to_do(g: FakeGuest) -> None:
    r = ctl(g).resume(soon())
    assert r == controller.Resume((), (), (), False)
    assert g.starts() == []


def test_resume_parallel(g: FakeGuest) -> None:
    ctl(g, parallel=True).quiesce("qemu", "snapshot", soon())
    r = ctl(g, parallel=True).resume(soon())
    assert sorted(r.started) == ["db", "monitoring", "web"] and r.marker_removed


def test_resume_on_an_unreachable_guest_raises(g: FakeGuest) -> None:
    ctl(g).quiesce("qemu", "snapshot", soon())
    g.unreachable = True
    with pytest.raises(ConnectError):
        ctl(g).resume(soon())
    g.unreachable = False
    assert MARKER in g.files  # nothing lost


def test_empty_marker_is_removed(g: FakeGuest) -> None:
    g.files[MARKER] = Marker(OLD_JOB, 101, "qemu", "snapshot", 1.0, 2.0, "stopped", ()).to_json()
    r = ctl(g).resume(soon())
    assert r.failed == ()
    assert MARKER not in g.files


# -- wait_ready --------------------------------------------------------------------------------


class _Clock:
    """Stands in for the time module inside guest/ready.py: sleep advances monotonic at once."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.offset += s


def test_wait_ready_retries_until_the_guest_answers(g: FakeGuest, mocker: MockerFixture) -> None:
    clock = mocker.patch.object(ready, "time", _Clock())
    g.unreachable = True
    tries = []

    def boot_on_third_try(verb: str, detail: str) -> None:
        tries.append(verb)
        if len(tries) == 3:
            g.unreachable = False

    g.on_call = boot_on_third_try
    ctl(g).wait_ready(60, soon(600))
    assert tries == ["connect"] * 3 and clock.sleeps == [1.0, 1.0]


def test_wait_ready_gives_up_after_wait(g: FakeGuest, mocker: MockerFixture) -> None:
    clock = mocker.patch.object(ready, "time", _Clock())
    g.unreachable = True
    with pytest.raises(ConnectError):
        ctl(g).wait_ready(5, soon(600))
    assert 3 <= len(clock.sleeps) <= 5
    assert clock.offset <= 5


def test_wait_ready_bounded_by_the_phase_deadline(g: FakeGuest, mocker: MockerFixture) -> None:
    clock = mocker.patch.object(ready, "time", _Clock())
    g.unreachable = True
    with pytest.raises(ConnectError):
        ctl(g).wait_ready(600, time.monotonic() + 3)
    assert clock.offset <= 3


def test_wait_ready_zero_tries_once(g: FakeGuest) -> None:
    g.unreachable = True
    with pytest.raises(ConnectError):
        ctl(g).wait_ready(0, soon())
    assert g.verbs("connect") == [""]


def test_wait_ready_does_not_retry_a_hang(g: FakeGuest) -> None:
    g.hang = True
    with pytest.raises(CommandTimeout):
        ctl(g).wait_ready(60, soon())
    assert len(g.calls) == 1


# -- deadlines ---------------------------------------------------------------------------------


def test_hanging_guest_preflight_raises_command_timeout(g: FakeGuest) -> None:
    g.hang = True
    with pytest.raises(CommandTimeout):
        ctl(g).preflight(soon())


def test_hanging_guest_resume_raises_command_timeout(g: FakeGuest) -> None:
    ctl(g).quiesce("qemu", "snapshot", soon())
    g.hang = True
    with pytest.raises(CommandTimeout):
        ctl(g).resume(soon())


def test_past_deadline_sends_nothing(g: FakeGuest) -> None:
    past = time.monotonic() - 1
    with pytest.raises(CommandTimeout, match="no time left"):
        ctl(g).preflight(past)
    with pytest.raises(CommandTimeout, match="no time left"):
        ctl(g).resume(past)
    with pytest.raises(NothingStopped):
        ctl(g).quiesce("qemu", "snapshot", past)
    assert g.calls == []


def _assert_within(g: FakeGuest, deadline: float, cap: float) -> None:
    assert g.timed
    for verb, detail, timeout, at in g.timed:
        assert at + timeout <= deadline + 0.01, (verb, detail, timeout)
        assert timeout <= cap + 0.01, (verb, detail, timeout)


def test_no_call_outlives_the_phase_deadline(g: FakeGuest) -> None:
    deadline = soon(4)
    c = ctl(g, command_timeout=3, stop_timeout=2)
    c.preflight(deadline)
    c.quiesce("qemu", "snapshot", deadline)
    c.resume(deadline)
    # stops get stop_timeout + STOP_MARGIN, everything else command_timeout, all within the deadline
    _assert_within(g, deadline, cap=2 + stops.STOP_MARGIN)
    others = [t for v, _, t, _ in g.timed if v not in ("compose-stop", "inspect", "docker-stop", "connect")]
    assert others and max(others) <= 3 + 0.01


def test_a_hanging_stop_cannot_stretch_the_phase(g: FakeGuest) -> None:
    g.hang_sleeps = True
    g.projects["web"].stop_hangs = True
    deadline = soon(0.4)
    start = time.monotonic()
    q = ctl(g, stacks=["web", "db"]).quiesce("qemu", "snapshot", deadline)
    took = time.monotonic() - start
    assert took < 1.0
    _assert_within(g, deadline, cap=30 + stops.STOP_MARGIN)
    errors = dict(e.split(": ", 1) for e in q.errors)
    assert set(errors) == {"web", "db"}
    assert "no time left" in errors["db"]
    # the marker written first still lists both
    assert [s.name for s in marker_in(g).stacks] == ["web", "db"]


def test_command_timeout_caps_every_command(g: FakeGuest) -> None:
    c = ctl(g, command_timeout=2)
    c.preflight(soon(600))
    c.quiesce("qemu", "snapshot", soon(600))
    c.resume(soon(600))
    for verb, _, timeout, _ in g.timed:
        if verb in ("read", "write", "remove", "compose-start", "ps", "detect"):
            assert timeout <= 2.01, verb


# -- misc ----------------------------------------------------------------------------------------


def test_close_closes_the_transport(g: FakeGuest) -> None:
    c = ctl(g)
    c.close()
    assert c.t.closed == 1  # type: ignore[attr-defined]


def test_controller_opens_its_transport_lazily_through_the_registry(g: FakeGuest, mocker: MockerFixture) -> None:
    opened = mocker.patch("vzdump_hook.guest.session.open_transport", return_value=FakeTransport(g))
    c = GuestSession(guest_cfg(), JOB)
    assert opened.call_count == 1 and c.t is opened.return_value
    assert g.calls == []  # nothing is sent before a verb is used


def test_describe() -> None:
    assert controller.describe(HookError("boom")) == "boom"
    assert controller.describe(ValueError("bad")) == "ValueError: bad"
