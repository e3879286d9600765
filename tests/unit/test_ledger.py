"""The ledger of outstanding markers (ledger.py) and how the phases keep it: in-process, the guests
being FakeGuests behind a patched open_transport (tests/unit/fakes.py), the cluster file system
played by a directory with pmxcfs's rules (tests/infra/pmxcfs.py)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from unittest.mock import patch

import pytest
from pytest_mock import MockerFixture

from tests.infra.pmxcfs import ClusterFs, cluster_fs
from vzdump_hook import config as configuration
from vzdump_hook.errors import ConfigError
from vzdump_hook.guest.session import GuestSession
from vzdump_hook.node import ledger as ledgers
from vzdump_hook.node.job import JobId, node_name
from vzdump_hook.node.ledger import FOUND, QUIESCE, Ledger
from vzdump_hook.phase.runner import HARD_GRACE, PhaseRunner, settings_with_env
from vzdump_hook.vzdump.phases import GuestType, Mode, Phase

from .fakes import FakeGuest
from .test_phase import ALL_UP, APP_DOWN, MARKER, Hook, dead_job, hook, lines_about, running_job, stale_marker  # noqa: F401

LXC = GuestType.LXC
NODE_B = "node-b"


def ledger_of(h: Hook) -> Ledger:
    cfg = configuration.load(str(h.cfg_path))
    s = settings_with_env(cfg.hook, h.env)
    return Ledger.for_settings(s, node_name(), s.phase_timeout + HARD_GRACE)


def asked(h: Hook) -> list[int]:
    """VMIDs the hook opened a transport to, in call order (the tests reset the mock between jobs)."""
    return [c.args[0].vmid for c in h.open.call_args_list]


def many_guests(h: Hook, vmids: range) -> None:
    """Guests 101 (three stacks, as in test_phase.py) and `vmids`, each with one stack `app`, all configured."""
    text = h.cfg_path.read_text().split("[guests.102]")[0]
    for v in vmids:
        g = FakeGuest()
        g.add_project("app", 1)
        h.guests[v] = g
        text += f'\n[guests.{v}]\nssh = {{ host = "10.0.1.{v % 250}" }}\nstacks = ["app"]\n'
    h.cfg_path.write_text(text)


def job_start(h: Hook) -> list[int]:
    h.open.reset_mock()
    assert h("job-start") == 0
    return sorted(set(asked(h)))


@pytest.fixture
def pve(hook: Hook, monkeypatch: pytest.MonkeyPatch) -> ClusterFs:  # noqa: F811
    """This node is a PVE node: guest 101 (and 103-105) live here and run (QEMU pid files name a
    live process); the ledger is on the cluster file system, played with pmxcfs's rules."""
    for v in (101, 103, 104, 105):
        conf = hook.pve_dir / "nodes" / node_name() / "qemu-server" / f"{v}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("")
        hook.qmp_dir.mkdir(exist_ok=True)
        (hook.qmp_dir / f"{v}.pid").write_text(f"{os.getpid()}\n")
    with cluster_fs(hook.pve_dir / "priv", monkeypatch) as fs:
        yield fs


# -- the module ----------------------------------------------------------------------------------


def test_location_is_the_cluster_file_system_on_a_pve_node(tmp_path: Path) -> None:
    s = configuration.HookSettings(state_dir=str(tmp_path / "state"), pve_dir=str(tmp_path / "pve"))
    assert ledgers.ledger_dir(s) == str(tmp_path / "state" / "ledger")
    (tmp_path / "pve" / "nodes").mkdir(parents=True)
    assert ledgers.ledger_dir(s) == str(tmp_path / "pve" / "priv" / "vzdump-hook" / "ledger")
    assert ledgers.ledger_dir(configuration.HookSettings(ledger_dir="/srv/l",
                                                         pve_dir=str(tmp_path / "pve"))) == "/srv/l"


def test_ledger_dir_setting_is_validated_with_its_key_path() -> None:
    assert configuration.parse({"hook": {"ledger_dir": "/srv/ledger"}}).hook.ledger_dir == "/srv/ledger"
    with pytest.raises(ConfigError) as e:
        configuration.parse({"hook": {"ledger_dir": "var/ledger"}})
    assert e.value.problems[0].startswith("hook.ledger_dir: must be an absolute path")


def test_entries_appear_by_rename_and_no_link_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with cluster_fs(tmp_path / "pve", monkeypatch) as fs:
        led = Ledger(str(tmp_path / "pve" / "ledger"), "node-a", str(tmp_path / "state"), settle=60)
        e = led.add(101, QUIESCE, running_job(), {"transport": "ssh"}, "qemu")
        led.mark_known([101, 102])
        assert fs.files() == ["ledger/" + e.name, "ledger/known-node-a.json"]
        assert fs.written_in_place() == [] and fs.refused == []
        assert sorted(dst for _, dst in fs.renamed) == fs.files()
    # the rule is real: a hard link there fails as on pmxcfs
    with cluster_fs(tmp_path / "pve", monkeypatch), pytest.raises(PermissionError):
        os.link(tmp_path / "pve" / "ledger" / "known-node-a.json", tmp_path / "pve" / "ledger" / "x")


def test_entry_round_trip_and_unreadable_entry_still_counts(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "l"), "node-a", str(tmp_path / "s"), settle=60)
    job = running_job()
    e = led.add(101, QUIESCE, job, {"transport": "ssh", "ssh": {"host": "h"}}, "lxc")
    (tmp_path / "l" / "102.node-b-1-1.json").write_text("{not json")
    got = led.entries()
    assert [(x.vmid, x.kind, x.job, x.vmtype, dict(x.guest_table)) for x in got[101]] == [
        (101, QUIESCE, job, "lxc", {"transport": "ssh", "ssh": {"host": "h"}})]
    assert got[101][0].name == e.name
    assert [(x.vmid, x.kind, x.job) for x in got[102]] == [(102, FOUND, None)]


@pytest.mark.parametrize(("writer", "age", "removed"), [
    ("this job", 0, True),  # the caller holds the guest's lock and wrote it: its marker write is done
    ("job over", 0, True),
    ("job running", 0, False),  # its marker may be written right now
    ("job running", 1000, True),  # older than the writer's phase can last (watchdog)
    ("other node", 0, False),
    ("other node", 1000, True),
    ("found", 0, True),  # no marker write follows a FOUND entry
])
def test_clear_removes_only_settled_entries(tmp_path: Path, writer: str, age: float, removed: bool) -> None:
    led = Ledger(str(tmp_path / "l"), "node-a", str(tmp_path / "s"), settle=615)
    me = JobId(node_name(), "boot", 1, 1)
    job = {"this job": me, "job over": dead_job(), "job running": running_job(), "other node": JobId(NODE_B, "b", 9, 9),
           "found": None}[writer]
    e = led.add(101, FOUND if writer == "found" else QUIESCE, job, {})
    path = tmp_path / "l" / e.name
    if age:
        data = json.loads(path.read_text())
        data["written_at"] -= age
        data["settles_at"] -= age
        path.write_text(json.dumps(data))
    kept = led.clear(led.of(101), me)
    assert (led.of(101) == []) is removed
    assert (kept == []) is removed


def test_an_entry_written_after_the_reading_survives_a_clear(tmp_path: Path) -> None:
    """A removal deletes only what it read: a second node's entry written meanwhile is never lost."""
    a = Ledger(str(tmp_path / "l"), "node-a", str(tmp_path / "sa"), settle=60)
    b = Ledger(str(tmp_path / "l"), NODE_B, str(tmp_path / "sb"), settle=60)
    a.add(101, FOUND, None, {})
    seen = a.of(101)
    newer = [b.add(101, QUIESCE, JobId(NODE_B, "b", 9, 9), {}), b.add(101, FOUND, None, {})]  # unsettled, settled
    a.clear(seen, dead_job())
    assert sorted(e.name for e in a.of(101)) == sorted(e.name for e in newer)


def test_known_is_the_union_of_every_nodes_list_minus_local_uncovered(tmp_path: Path) -> None:
    a = Ledger(str(tmp_path / "l"), "node-a", str(tmp_path / "sa"), settle=60)
    b = Ledger(str(tmp_path / "l"), NODE_B, str(tmp_path / "sb"), settle=60)
    a.mark_known([101, 102])
    b.mark_known([103])
    assert a.known() == b.known() == {101, 102, 103}
    a.mark_uncovered(102)
    assert a.known() == {101, 103} and b.known() == {101, 102, 103}
    a.mark_known([102])
    assert a.known() == {101, 102, 103}
    assert json.loads((tmp_path / "sa" / ledgers.INCOMPLETE_FILE).read_text()) == []


# -- the phases keep it --------------------------------------------------------------------------


def test_upgrade_asks_every_guest_once_then_only_ledger_entries(hook: Hook, pve: ClusterFs,  # noqa: F811
                                                                caplog: pytest.LogCaptureFixture) -> None:
    many_guests(hook, range(103, 106))
    assert job_start(hook) == [101, 103, 104, 105]  # no ledger yet: nothing is known
    assert ledger_of(hook).known() == {101, 103, 104, 105}
    assert job_start(hook) == []
    assert "none asked" in caplog.messages[-1]
    assert pve.written_in_place() == [] and pve.refused == []


def test_entry_is_written_before_the_marker_and_removed_after_the_resume(hook: Hook, pve: ClusterFs,  # noqa: F811
                                                                         mocker: MockerFixture) -> None:
    led = ledger_of(hook)
    entries_when_marker_written: list[int] = []
    real_write = GuestSession._write_marker

    def write_marker(ctl: GuestSession, m: object, deadline: float) -> None:
        entries_when_marker_written.append(len(led.of(ctl.guest.vmid)))
        real_write(ctl, m, deadline)  # type: ignore[arg-type]

    mocker.patch.object(GuestSession, "_write_marker", write_marker)
    job_start(hook)
    for step in ("backup-start", "pre-stop"):
        assert hook(step, Mode.SNAPSHOT, 101, LXC) == 0
    assert hook.g.running_stacks() == APP_DOWN
    assert entries_when_marker_written == [1]  # the entry came first
    (e,) = led.of(101)
    assert e.kind == QUIESCE and e.vmtype == "lxc"
    assert hook("post-restart", Mode.SNAPSHOT, 101, LXC) == 0
    assert hook.g.running_stacks() == ALL_UP and MARKER not in hook.g.files
    assert led.of(101) == []
    assert job_start(hook) == []


def test_nothing_to_stop_writes_no_entry(hook: Hook, pve: ClusterFs) -> None:  # noqa: F811
    job_start(hook)
    for p in hook.g.projects.values():
        for c in p.containers.values():
            c.running = False
    for step in ("backup-start", "pre-stop", "post-restart"):
        assert hook(step, Mode.SNAPSHOT, 101, LXC) == 0
    assert ledger_of(hook).entries() == {}


def test_crash_between_the_two_writes_costs_one_contact(hook: Hook, pve: ClusterFs, mocker: MockerFixture,  # noqa: F811
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A node crash (a job that is over) right after the entry, before the marker: the next
    job-start asks that guest once, finds no marker, removes the entry."""
    job_start(hook)

    class Crash(BaseException):
        pass

    with patch.object(GuestSession, "_write_marker", side_effect=Crash), pytest.raises(Crash):
        hook.runner(dead_job()).run(Phase.PRE_STOP, LXC, Mode.SNAPSHOT, 101)
    assert MARKER not in hook.g.files and hook.g.running_stacks() == ALL_UP
    assert len(ledger_of(hook).of(101)) == 1
    caplog.clear()
    assert job_start(hook) == [101]
    assert ledger_of(hook).entries() == {}
    assert job_start(hook) == []


def test_no_marker_without_an_entry_when_the_ledger_cannot_be_written(hook: Hook, pve: ClusterFs, mocker: MockerFixture,  # noqa: F811
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The order of writes rules out a marker without an entry: if neither the ledger nor the local
    note can be written, nothing is written to the guest and nothing is stopped."""
    job_start(hook)
    mocker.patch.object(Ledger, "add", side_effect=ledgers.LedgerError("ledger: read-only (no quorum)"))
    mocker.patch.object(Ledger, "mark_uncovered", side_effect=OSError(30, "Read-only file system"))
    assert hook("backup-start", Mode.SNAPSHOT, 101, LXC) == 0
    assert hook("pre-stop", Mode.SNAPSHOT, 101, LXC) == 0  # on_quiesce_error = continue: crash-consistent
    assert MARKER not in hook.g.files and hook.g.writes == [] and hook.g.stops() == []
    assert lines_about(caplog, "read-only (no quorum)")


def test_ledger_unwritable_the_guest_is_noted_locally_and_asked_next_time(hook: Hook, pve: ClusterFs,  # noqa: F811
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    job_start(hook)
    runner = hook.runner(dead_job())  # a job that then dies before its resume
    assert runner.run(Phase.BACKUP_START, LXC, Mode.SNAPSHOT, 101) == 0
    with patch.object(Ledger, "add", side_effect=ledgers.LedgerError("ledger: read-only (no quorum)")):
        assert runner.run(Phase.PRE_STOP, LXC, Mode.SNAPSHOT, 101) == 0
    assert hook.g.running_stacks() == APP_DOWN  # quiesced: the node noted the guest locally instead
    assert lines_about(caplog, "read-only (no quorum); the next job-start asks this guest")
    assert ledger_of(hook).entries() == {} and 101 not in ledger_of(hook).known()
    assert job_start(hook) == [101]
    assert hook.g.running_stacks() == ALL_UP
    assert job_start(hook) == []


def test_entry_of_a_job_that_is_over_resumes_only_that_guest(hook: Hook, pve: ClusterFs,  # noqa: F811
                                                             caplog: pytest.LogCaptureFixture) -> None:
    many_guests(hook, range(103, 106))
    job_start(hook)
    runner = hook.runner(dead_job())
    assert runner.run(Phase.BACKUP_START, LXC, Mode.SNAPSHOT, 104) == 0
    assert runner.run(Phase.PRE_STOP, LXC, Mode.SNAPSHOT, 104) == 0  # and then the node died
    assert hook.guests[104].running_stacks() == []
    assert job_start(hook) == [104]
    assert hook.guests[104].running_stacks() == ["app"] and MARKER not in hook.guests[104].files
    assert lines_about(caplog, "job-start 104: marker of job")
    assert ledger_of(hook).entries() == {}


def test_a_guest_that_is_not_running_is_not_asked(hook: Hook, pve: ClusterFs, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    job_start(hook)
    ledger_of(hook).add(101, FOUND, None, {})
    (hook.qmp_dir / "101.pid").unlink()  # the VM is off
    assert job_start(hook) == []
    assert lines_about(caplog, "job-start 101: not running (PVE), not asked: a marker in it waits for the guest-side "
                               "recovery at boot, or for its next backup's backup-start")
    assert len(ledger_of(hook).of(101)) == 1  # kept for when it runs again
    (hook.qmp_dir / "101.pid").write_text(f"{os.getpid()}\n")
    assert job_start(hook) == [101]
    assert ledger_of(hook).entries() == {}


def test_another_nodes_guest_is_left_to_that_node(hook: Hook, pve: ClusterFs) -> None:  # noqa: F811
    job_start(hook)
    (hook.pve_dir / "nodes" / node_name() / "qemu-server" / "101.conf").unlink()
    other = hook.pve_dir / "nodes" / NODE_B / "qemu-server" / "101.conf"
    other.parent.mkdir(parents=True)
    other.write_text("")
    ledger_of(hook).add(101, FOUND, None, {})
    assert job_start(hook) == []
    assert len(ledger_of(hook).of(101)) == 1


def test_a_marker_left_alone_gets_an_entry(hook: Hook, pve: ClusterFs) -> None:  # noqa: F811
    m = stale_marker(hook.g, JobId(NODE_B, "b", 1, 1))  # from before the upgrade; another node's job, deadline ahead
    assert job_start(hook) == [101]  # upgrade: asked once
    assert hook.g.files[MARKER] == m.to_json()  # left alone (that job may still run)
    assert [e.kind for e in ledger_of(hook).of(101)] == [FOUND]  # so the ledger covers it now
    assert job_start(hook) == [101]
    stale_marker(hook.g, JobId(NODE_B, "b", 1, 1), deadline=time.time() - 1)
    assert job_start(hook) == [101]
    assert hook.g.running_stacks() == ALL_UP and ledger_of(hook).entries() == {}
    assert job_start(hook) == []


def test_unreachable_guest_keeps_its_entry(hook: Hook, pve: ClusterFs, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    hook.g.unreachable = True
    assert job_start(hook) == [101]  # unknown: asked, does not answer
    assert [e.kind for e in ledger_of(hook).of(101)] == [FOUND]  # so it is asked again
    assert job_start(hook) == [101]
    hook.g.unreachable = False
    assert job_start(hook) == [101]
    assert ledger_of(hook).entries() == {} and job_start(hook) == []


def test_second_node_writes_the_ledger_while_this_one_sweeps(hook: Hook, pve: ClusterFs, mocker: MockerFixture) -> None:  # noqa: F811
    """Node B adds entries (one for the guest being swept, one for another guest) and its list of
    known guests while this node's sweep has read the ledger and is asking the guest: nothing B
    wrote is lost, and this node's removal touches only what it read."""
    many_guests(hook, range(103, 104))
    job_start(hook)
    led = ledger_of(hook)
    led.add(101, FOUND, None, {})
    b = Ledger(led.dir, NODE_B, str(hook.tmp / "state-b"), settle=615)
    written: list[str] = []
    real_read = GuestSession.read_marker

    def read_marker(ctl: GuestSession, deadline: float) -> object:
        if ctl.guest.vmid == 101 and not written:  # the sweep has read the ledger and asks 101 now
            written.append(b.add(101, QUIESCE, JobId(NODE_B, "b", 7, 7), {}).name)
            written.append(b.add(101, FOUND, None, {}).name)
            written.append(b.add(103, QUIESCE, JobId(NODE_B, "b", 7, 7), {}).name)
            b.mark_known([900])
        return real_read(ctl, deadline)

    mocker.patch.object(GuestSession, "read_marker", read_marker)
    assert job_start(hook) == [101]
    left = led.entries()
    assert sorted(e.name for es in left.values() for e in es) == sorted(written)
    assert led.known() >= {101, 103, 900}
    assert pve.written_in_place() == [] and pve.refused == []


def test_job_end_resumes_every_pending_guest_at_once(hook: Hook, pve: ClusterFs, mocker: MockerFixture) -> None:  # noqa: F811
    """No pool of 8: twelve guests whose resume each waits until all twelve have begun."""
    import threading

    vmids = range(103, 115)
    many_guests(hook, vmids)
    job_start(hook)
    for v in vmids:
        for step in ("backup-start", "pre-stop"):
            assert hook(step, Mode.SNAPSHOT, v, GuestType.QEMU) == 0
    barrier = threading.Barrier(len(vmids), timeout=20)
    real_resume = GuestSession.resume

    def resume(ctl: GuestSession, deadline: float, fallback: tuple = ()) -> object:  # type: ignore[type-arg]
        barrier.wait()  # breaks (and the resume fails) unless all of them run at the same time
        return real_resume(ctl, deadline, fallback)

    mocker.patch.object(GuestSession, "resume", resume)
    assert hook("job-end") == 0
    assert all(hook.guests[v].running_stacks() == ["app"] for v in vmids)
    assert ledger_of(hook).entries() == {}


def test_fanout_reports_late_calls_and_does_not_wait_for_them() -> None:
    import threading

    from vzdump_hook.guest import fanout

    release = threading.Event()
    seen: list[tuple[int, int]] = []

    def work(x: int) -> int:
        if x == 2:
            release.wait(30)  # hangs past the deadline
        return x

    out = fanout.run_all(work, [1, 2, 3], time.monotonic() + 0.5, lambda d, t: seen.append((d, t)))
    release.set()
    assert out == [1, None, 3]
    assert sorted(seen) == [(1, 3), (2, 3)]


def test_runner_ledger_uses_the_phase_deadline_to_settle(hook: Hook) -> None:  # noqa: F811
    cfg = configuration.load(str(hook.cfg_path))
    r = PhaseRunner(cfg, settings_with_env(cfg.hook, hook.env), running_job())
    assert r.ctx.ledger.settle == cfg.hook.phase_timeout + HARD_GRACE
    assert r.ctx.ledger.dir == str(hook.tmp / "state" / "ledger")


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vzdump_hook")
